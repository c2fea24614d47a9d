"""LayerDrop (Fan et al. 2019, arXiv 1909.11556): skip whole layers at random in training."""

from __future__ import annotations

import torch


def layer_drop_keep(
    num_layers: int, p: float, training: bool, generator: torch.Generator | None = None
) -> list[bool]:
    """Which layers run: each is dropped with probability ``p`` in training; at least one
    always runs; in eval every layer runs."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"layer dropout must be in [0, 1), got {p}")
    if not training or p == 0.0 or num_layers == 0:
        return [True] * num_layers
    keep = (torch.rand(num_layers, generator=generator) >= p).tolist()
    if not any(keep):
        keep[int(torch.randint(num_layers, (1,), generator=generator))] = True
    return keep
