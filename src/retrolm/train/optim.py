"""Optimisation pieces: AdamW parameter groups (no decay for norms, biases, embeddings)
and the warmup + cosine learning-rate schedule.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from retrolm.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: no decay for norms, biases and embeddings.

    A parameter with a ``_retrolm_lr_scale`` attribute goes to a group of its own, without
    weight decay, whose ``lr_scale`` multiplies the scheduled learning rate: the generic hook
    for a model's special parameters (the RETRO copy head's small tables, Infini-attention's
    memory gates). Set it on the parameter where the module creates it.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = is_norm or isinstance(module, nn.Embedding) or p.ndim < 2 or "bias" in name
            scale = float(getattr(p, "_retrolm_lr_scale", 1.0))
            groups.setdefault((not skip and scale == 1.0, scale), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in groups.items()
        if params or scale == 1.0
    ]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
