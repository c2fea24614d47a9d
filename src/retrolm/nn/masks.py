"""Mask builders. One convention everywhere in retrolm: boolean, True = may attend.

Shapes: i queries, j keys. Query positions are ``offset + arange(i)`` and key positions
``arange(j)``; by default the queries are the last ``i`` of the ``j`` keys (offset = j - i),
which is what a KV cache needs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(i: int, j: int, offset: int | None = None, device=None) -> Tensor:
    """(i, j) bool: key position <= query position."""
    offset = j - i if offset is None else offset
    q = torch.arange(i, device=device)[:, None] + offset
    k = torch.arange(j, device=device)[None, :]
    return k <= q


def sliding_window_mask(
    i: int, j: int, window: int, offset: int | None = None, causal: bool = True, device=None
) -> Tensor:
    """(i, j) bool: keys within ``window`` positions of the query (exact window).

    Causal: ``q - window < k <= q`` (the query plus its ``window - 1`` predecessors).
    Non-causal: ``|q - k| < window``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    offset = j - i if offset is None else offset
    q = torch.arange(i, device=device)[:, None] + offset
    k = torch.arange(j, device=device)[None, :]
    dist = q - k
    if causal:
        return (dist >= 0) & (dist < window)
    return dist.abs() < window


def key_padding_mask(keep: Tensor) -> Tensor:
    """(b, j) bool (True = real key) -> (b, 1, 1, j), broadcastable over heads and queries."""
    if keep.dtype != torch.bool:
        raise ValueError(f"key padding mask must be bool (True = keep), got {keep.dtype}")
    return keep[:, None, None, :]


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the given masks (None = no constraint)."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else out & m
    return out
