"""Training precision: autocast, and ``auto``'s choice between fp32 and bf16 by timing
one step of each on this machine.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext

import torch
from torch import nn

from retrolm.models.registry import Batch

log = logging.getLogger(__name__)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def time_precisions(
    model: nn.Module, batch: Batch, loss_fn, device: torch.device, repeats: int = 2
) -> dict[str, float]:
    """Best seconds per forward+backward in fp32 and in bf16 autocast, on a copy of the model.

    The first call of each warms up kernels. RNG state is left untouched.
    """
    rng = torch.get_rng_state()
    probe = copy.deepcopy(model)
    precs = ("fp32", "bf16")
    times = dict.fromkeys(precs, math.inf)
    # warm-up, then the two in turn (best of each): a load spike on a shared machine
    # then hits one round of both rather than deciding the choice
    for rnd in range(repeats + 1):
        for prec in precs:
            t0 = time.perf_counter()
            with autocast(prec, device):
                loss = loss_fn(probe, batch)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rnd:
                times[prec] = min(times[prec], time.perf_counter() - t0)
            probe.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return times


def choose_precision(model: nn.Module, batch: Batch, loss_fn, device: torch.device) -> str:
    """Keep the faster of fp32 and bf16 autocast, timed on this machine.

    Machines of the same kind differ (DESIGN.md): bf16 is 3x faster on some CPUs and
    30% slower on others, so nothing is assumed.
    """
    times = time_precisions(model, batch, loss_fn, device)
    choice = min(times, key=times.get)
    log.info(
        "precision auto: fp32 %.3fs, bf16 %.3fs per step -> %s",
        times["fp32"],
        times["bf16"],
        choice,
    )
    return choice
