"""Exact sliding-window attention in O(n · window) memory.

Each query at position p attends the keys k with ``p - window < k <= p`` (causal) or
``|p - k| < window`` (non-causal): exactly the mask of ``masks.sliding_window_mask``, but
computed block by block: the sequence is cut into blocks of ``window`` positions and each
query block attends its own block and the previous one (and the next one when non-causal),
so no (n, n) score matrix is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from retrolm.nn.attention import attend


def _blocks_with_neighbours(x: Tensor, w: int, look_forward: bool) -> Tensor:
    """(B, h, nb*w, d) -> (B, h, nb, (2|3)*w, d): previous, own (and next) block per block."""
    blocks = rearrange(x, "b h (nb w) d -> b h nb w d", w=w)
    prev = F.pad(blocks, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    parts = [prev, blocks]
    if look_forward:
        parts.append(F.pad(blocks, (0, 0, 0, 0, 0, 1))[:, :, 1:])
    return torch.cat(parts, dim=-2)


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
    w = window
    pad = (-n) % w
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    total = n + pad
    nb = total // w
    if h != k.shape[1]:
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
    kb = _blocks_with_neighbours(k, w, not causal)  # (b, h, nb, kw, d)
    vb = _blocks_with_neighbours(v, w, not causal)
    qb = rearrange(q, "b h (nb w) d -> b h nb w d", w=w)
    # absolute positions of queries and keys in every block
    blk = torch.arange(nb, device=q.device)[:, None]
    qpos = blk * w + torch.arange(w, device=q.device)  # (nb, w)
    kpos = (blk - 1) * w + torch.arange(kb.shape[-2], device=q.device)  # (nb, kw)
    dist = qpos[:, :, None] - kpos[:, None, :]  # (nb, w, kw)
    allowed = ((dist >= 0) & (dist < w)) if causal else (dist.abs() < w)
    valid_key = (kpos >= 0) & (kpos < n)  # (nb, kw): not outside the sequence
    mask = (allowed & valid_key[:, None, :])[None]  # (1, nb, w, kw)
    if key_mask is not None:
        km = F.pad(key_mask, (0, pad), value=False)[:, None, :, None].expand(b, 1, total, 1)
        km = _blocks_with_neighbours(km.float(), w, not causal)[:, 0, :, :, 0].bool()
        mask = mask & km[:, :, None, :]  # (b, nb, w, kw)
    if mask.shape[0] != b:  # no key mask: the same band for every batch row
        mask = mask.expand(b, -1, -1, -1)
    mask = rearrange(mask, "b nb w kw -> (b nb) 1 w kw")
    out = attend(
        rearrange(qb, "b h nb w d -> (b nb) h w d"),
        rearrange(kb, "b h nb kw d -> (b nb) h kw d"),
        rearrange(vb, "b h nb kw d -> (b nb) h kw d"),
        mask,
        dropout_p=dropout_p,
    )
    out = rearrange(out, "(b nb) h w d -> b h (nb w) d", b=b)
    return out[:, :, :n]
