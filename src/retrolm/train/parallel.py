"""Data-parallel training under ``torchrun``: DDP, or fully sharded (``retrolm train --fsdp``).

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter, its
gradient and its optimizer state across the processes; each layer gathers its weights for
its forward and backward and frees them after, so a process holds about 1/world of the
model's training state plus one layer at a time. Nothing here is a home-made collective:
sharding, gathering and the state-dict conversions are ``torch.distributed``'s.

- :func:`shard_model`: one FSDP unit per layer, then the root (embeddings, final norm, tied
  output, and whatever else). A layer is a module with sub-modules held in an
  ``nn.ModuleList`` (nested lists looked through); a bare norm or linear in such a list
  stays with the root, since a fused path may read its weight without calling its forward
  (FSDP gathers a unit's weights when its forward starts).
- The run folder stays loadable by one process: a checkpoint holds the *full* (gathered)
  weights in the same ``model.safetensors`` as an unsharded run, written by rank 0 through a
  plain replica of the model, and the optimizer state as a full state dict keyed by
  parameter name (``torch.distributed.checkpoint.state_dict``), loaded back into the shards
  on resume. ``fsdp`` is part of the run's settings, so a run resumes the way it started.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from retrolm.train.config import TrainConfig
from retrolm.train.optim import param_groups

log = logging.getLogger(__name__)


def ddp(model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


def parallel(
    model: nn.Module, cfg: TrainConfig, opt_state: dict | None, unused: bool, device, world: int
) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """(the module the steps run: DDP, FSDP or the model itself; its optimizer, with
    ``opt_state`` loaded; whether it is sharded). FSDP shards ``model`` in place."""
    sharded = cfg.fsdp and world > 1
    if cfg.fsdp and world == 1:
        log.info("fsdp with one process: nothing to shard, training unsharded")
    if sharded:
        units = shard_model(model)
        log.info("fsdp: %d units sharded over %d processes", units, world)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    if opt_state is not None:
        if sharded:
            load_full_optimizer_state(model, opt, opt_state)
        else:
            opt.load_state_dict(opt_state)
    # without retrieval the encoder and cross-attention receive no gradient
    ddp_model = ddp(model, device, unused) if world > 1 and not sharded else model
    return ddp_model, opt, sharded


def shard_model(model: nn.Module) -> int:
    """Shard ``model`` in place with FSDP2; returns the number of FSDP units (root included)."""
    from torch.distributed.fsdp import fully_shard

    containers = (nn.ModuleList, nn.ModuleDict)  # no forward of their own: never a unit

    def units(module: nn.Module, in_list: bool = False) -> Iterator[nn.Module]:
        for child in module.children():
            if isinstance(child, containers):
                yield from units(child, in_list=True)
            elif in_list and type(child).forward is nn.Module.forward:
                yield from units(child)  # a holder whose children its parent calls: no unit
            elif in_list and any(True for _ in child.children()):
                yield child  # one of a family's layers: one unit, not looked into
            elif not in_list:
                yield from units(child)

    layers = list({id(u): u for u in units(model)}.values())  # a module held twice: one unit
    for unit in layers:
        fully_shard(unit)
    fully_shard(model)
    return len(layers) + 1


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Inside, a backward of a DDP or FSDP ``model`` synchronises gradients only if ``sync``
    (the last micro-batch of an accumulated step); a plain module is left alone."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def as_float(value: Any) -> float:
    """A scalar from a plain or distributed tensor (FSDP's gradient norm is a DTensor)."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) gathered whole on rank 0 (CPU); the other ranks get empty
    dicts. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt, options=_options())


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state saved by :func:`full_state` into the shards (every rank)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=_options())


__all__ = [
    "as_float",
    "ddp",
    "parallel",
    "full_state",
    "gradient_sync",
    "is_sharded",
    "load_full_optimizer_state",
    "shard_model",
]
