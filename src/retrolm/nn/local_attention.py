"""Exact sliding-window attention in O(n · window) memory.

Each query at position p attends the keys k with ``p - window < k <= p`` (causal) or
``|p - k| < window`` (non-causal): exactly the mask of ``masks.sliding_window_mask``, but
computed block by block: the sequence is cut into blocks of ``block_size(window)`` positions
and each query block attends its own block and the ``ceil((window - 1) / block)`` blocks
before it (and as many after it when non-causal), so no (n, n) score matrix is ever built.
Blocks smaller than the window waste fewer scores on masked pairs: with window 128, blocks of
32 compute 160 scores a query where blocks of 128 computed 256.

Notation: b batch, h heads, n positions, nb blocks, c block size, kw keys a block sees, d dim.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from retrolm.nn.attention import attend, block_attend
from retrolm.nn.fused import window as fused_window

BLOCK = 32  # query block size for windows above it (measured best of 32/64/128, CPU, bf16)


def block_size(window: int) -> int:
    return min(window, BLOCK)


def neighbour_blocks(x: Tensor, c: int, back: int, forward: int, fill=0) -> Tensor:
    """(b, h, nb*c, ...) -> (b, h, nb, (back + 1 + forward)*c, ...): per block, the ``back``
    blocks before it, itself and the ``forward`` blocks after it (``fill`` outside)."""
    pad = [0, 0] * (x.dim() - 3) + [back * c, forward * c]
    xp = F.pad(x, pad, value=fill).unflatten(2, (-1, c))  # (b, h, back + nb + forward, c, ...)
    nb = xp.shape[2] - back - forward
    # a concatenation of shifted slices: its backward is a few slice additions (Tensor.unfold's
    # backward, unfold_backward, took 7 ms a call here, more than the attention itself)
    return torch.cat([xp[:, :, i : i + nb] for i in range(back + 1 + forward)], dim=3)


def block_offsets(window: int, causal: bool) -> tuple[int, int, int]:
    """(block size, blocks looked back, blocks looked forward) covering a window."""
    c = block_size(window)
    back = math.ceil((window - 1) / c)
    return c, back, 0 if causal else back


def relative_band(window: int, causal: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """For any block of ``neighbour_blocks``: the distance query - key (c, kw) between each
    of its c queries and kw candidate keys (positions, or places in a sorted order), and
    which of them lie inside the window (bool (c, kw))."""
    c, back, fwd = block_offsets(window, causal)
    dist = torch.arange(c, device=device)[:, None] - (
        torch.arange((back + 1 + fwd) * c, device=device) - back * c
    )
    allowed = ((dist >= 0) & (dist < window)) if causal else (dist.abs() < window)
    return dist, allowed


@functools.lru_cache(maxsize=16)
def _band(n: int, window: int, causal: bool, device: torch.device) -> Tensor:
    """(nb, c, kw) bool: which of its block's candidate keys each query may attend."""
    c, back, _ = block_offsets(window, causal)
    _, allowed = relative_band(window, causal, device)
    blk = torch.arange(-(-n // c), device=device)[:, None]
    kpos = (blk - back) * c + torch.arange(allowed.shape[1], device=device)  # (nb, kw)
    return allowed & ((kpos >= 0) & (kpos < n))[:, None, :]


def local_attend(
    q: Tensor,  # (b, h, n, d)
    k: Tensor,  # (b, g, n, d)
    v: Tensor,  # (b, g, n, dv)
    window: int,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,  # (b, n) bool, True = real token
    dropout_p: float = 0.0,
) -> Tensor:  # (b, h, n, dv)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    b, h, n, _ = q.shape
    if n <= window:  # one block: plain masked attention is cheaper
        from retrolm.nn.masks import combine, key_padding_mask, sliding_window_mask

        m = sliding_window_mask(n, n, window, causal=causal, device=q.device)
        km = key_padding_mask(key_mask) if key_mask is not None else None
        return attend(q, k, v, combine(m, km), dropout_p=dropout_p)
    if h != k.shape[1]:
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
    if key_mask is None and fused_window.applies(q, dropout_p):  # one C++ pass (bf16, CPU)
        return fused_window.window_attend(q, k, v, window, causal=causal)
    c, back, fwd = block_offsets(window, causal)
    pad = (-n) % c
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    kb = neighbour_blocks(k, c, back, fwd)  # (b, h, nb, kw, d)
    vb = neighbour_blocks(v, c, back, fwd)
    qb = q.unflatten(2, (-1, c))  # (b, h, nb, c, d)
    mask = _band(n, window, causal, q.device)  # (nb, c, kw)
    if key_mask is not None:
        km = F.pad(key_mask, (0, pad), value=False)[:, None, :]  # (b, 1, nb*c)
        km = neighbour_blocks(km, c, back, fwd, fill=False)  # (b, 1, nb, kw)
        mask = mask & km[:, :, :, None, :]  # (b, 1, nb, c, kw)
    out = block_attend(qb, kb, vb, mask, dropout_p=dropout_p)  # (b, h, nb, c, dv)
    return out.flatten(2, 3)[:, :, :n]
