"""Model families that ``retrolm train --model NAME`` can build and train.

A family is (config class, model class, how a batch becomes a loss). Classes are
named by import path and loaded on first use, so the registry never imports a
model (or its dependencies) it does not train. RETRO is the first entry; other
families register themselves with :func:`register_family`:

    register_family(ModelFamily(
        name="routing",
        config_cls="retrolm.models.routing:RoutingConfig",
        model_cls="retrolm.models.routing:RoutingTransformer",
        uses_retrieval=False,
    ))

Contract for the classes: ``config_cls.from_dict(d)`` / ``cfg.to_dict()`` (or a plain
dataclass), optionally ``config_cls.from_name(preset)``; ``model_cls(config=cfg)``;
``model.config``. The default loss calls ``model(seq, return_loss=True)``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One training batch. ``retrieved``/``neighbour_mask`` are None without retrieval."""

    seq: Tensor  # (b, n+1) int64: inputs seq[:, :-1], labels seq[:, 1:]
    retrieved: Tensor | None = None  # (b, l, k, 2m) int64
    neighbour_mask: Tensor | None = None  # (b, l, k) bool, True = a real neighbour

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.seq), mv(self.retrieved), mv(self.neighbour_mask))


def retro_loss(model: nn.Module, batch: Batch) -> Tensor:
    """RETRO: mean next-token cross-entropy; ``retrieved=None`` is the baseline decoder."""
    return model(batch.seq, batch.retrieved, neighbour_mask=batch.neighbour_mask, return_loss=True)


def plain_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Families without retrieval: the model computes its own loss from the sequence."""
    return model(batch.seq, return_loss=True)


def _load(path: str | type) -> Any:
    if not isinstance(path, str):
        return path
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _load_loss(path: str) -> Callable[[nn.Module, Batch], Tensor]:
    """A loss named by import path, imported on its first call (keeps the registry light)."""

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return _load(path)(model, batch)

    return loss


@dataclass(frozen=True)
class ModelFamily:
    """How to build and train one model family."""

    name: str
    """Name used on the command line (``--model``) and in ``config.json``."""
    config_cls: str | type
    """The config dataclass, or ``"module:Class"`` loaded on first use."""
    model_cls: str | type
    """The ``nn.Module`` built as ``model_cls(config=cfg)``, or ``"module:Class"``."""
    uses_retrieval: bool = False
    """Whether batches carry neighbours (only then is ``--no-retrieval`` meaningful)."""
    loss: Callable[[nn.Module, Batch], Tensor] = plain_loss
    """Maps (model, batch) to a scalar loss."""
    default_preset: str | None = None
    """Preset passed to ``config_cls.from_name`` when the user gives no model config."""

    def config_class(self) -> type:
        return _load(self.config_cls)

    def model_class(self) -> type:
        return _load(self.model_cls)

    def make_config(self, values: dict[str, Any] | None = None, preset: str | None = None) -> Any:
        """A config from an optional preset, overridden by ``values``."""
        cls = self.config_class()
        preset = preset or (None if values else self.default_preset)
        base: dict[str, Any] = {}
        if preset is not None:
            if not hasattr(cls, "from_name"):
                raise ValueError(f"model family {self.name!r} has no presets (got {preset!r})")
            base = config_to_dict(cls.from_name(preset))
        base.update(values or {})
        return config_from_dict(cls, base)

    def build(self, config: Any) -> nn.Module:
        return self.model_class()(config=config)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    return cls(**d)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> None:
    if family.name in FAMILIES and not replace:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family


def uses_retrieval(meta: dict[str, Any]) -> bool:
    """Whether a run (its checkpoint metadata) belongs to a family that reads neighbours;
    the others only use the run's database for its tokenizer."""
    return get_family(meta.get("family", "retro")).uses_retrieval


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}"
        ) from None


register_family(
    ModelFamily(
        name="retro",
        config_cls="retrolm.models.retro:RetroConfig",
        model_cls="retrolm.models.retro:RETRO",
        uses_retrieval=True,
        loss=retro_loss,
        default_preset="retro-tiny",
    )
)

register_family(
    ModelFamily(
        name="hierarchical",
        config_cls="retrolm.models.hierarchical_config:HierarchicalConfig",
        model_cls="retrolm.models.hierarchical:HierarchicalTransformer",
        uses_retrieval=False,
        loss=_load_loss("retrolm.models.hierarchical:hierarchical_loss"),
        default_preset="hier-tiny",
    )
)
