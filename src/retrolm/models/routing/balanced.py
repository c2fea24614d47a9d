"""Balanced routing, as the reference implementation (routing-transformer 1.x) routes.

Each centroid takes its w most similar tokens of the whole sequence (queries and keys
separately unless shared); outputs of a token routed to several clusters are averaged; a
token routed to none attends the memory only. NOT causal: future tokens change the top-w
sets (research/attention-anchors.md §1.1), which is why ``RoutingConfig`` asks for
``allow_future_leak=True`` before it runs with ``causal=True``. Kept for comparison; the
default is strict sorted-window routing (``nn.sorted_window``).

Notation: b batch, h routed heads, n positions, d head dim, k clusters, w window,
m memory key/values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from retrolm.nn.attention import attend

__all__ = ["balanced_attend"]


def balanced_attend(
    q: Tensor,  # (b, h, n, d)
    k: Tensor,  # (b, h, n, d)
    v: Tensor,  # (b, h, n, d)
    means: Tensor,  # (h, k, d) unit-norm centroids
    window: int,
    mem_kv: tuple[Tensor, Tensor],  # (h, m, d) each, m >= 1
    *,
    mask: Tensor | None = None,  # (b, n) True = real token
    causal: bool = False,
    shared_qk: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:  # (b, h, n, d)
    b, h, n, d = q.shape
    w = min(window, n)
    means = means.to(q.dtype)

    def top(x):  # (b, h, n, d) -> indices (b, h, k, w)
        sim = torch.einsum("bhnd,hkd->bhkn", F.normalize(x, dim=-1), means)
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], float("-inf"))
        return sim.topk(w, dim=-1).indices

    qi = top(q)
    ki = qi if shared_qk else top(k)

    def gather(x, idx):
        flat = rearrange(idx, "b h k w -> b h (k w)")[..., None].expand(-1, -1, -1, x.shape[-1])
        return rearrange(x.gather(2, flat), "b h (k w) d -> b h k w d", w=w)

    qc, kc, vc = gather(q, qi), gather(k, ki), gather(v, ki)
    allowed = torch.ones(*qi.shape, w, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= qi[..., :, None] >= ki[..., None, :]
    if mask is not None:
        km = mask[:, None, :].expand(b, h, n).gather(2, rearrange(ki, "b h k w -> b h (k w)"))
        allowed &= rearrange(km, "b h (k w) -> b h k w", w=w)[..., None, :]
    if shared_qk:
        allowed &= qi[..., :, None] != ki[..., None, :]
    mk, mv = mem_kv
    kk = torch.cat((mk[None, :, None].expand(b, -1, qi.shape[2], -1, -1).to(kc.dtype), kc), dim=-2)
    vv = torch.cat((mv[None, :, None].expand(b, -1, qi.shape[2], -1, -1).to(vc.dtype), vc), dim=-2)
    allowed = torch.cat((allowed.new_ones(*allowed.shape[:-1], mk.shape[-2]), allowed), dim=-1)
    oc = attend(
        rearrange(qc, "b h k w d -> (b k) h w d"),
        rearrange(kk, "b h k j d -> (b k) h j d"),
        rearrange(vv, "b h k j d -> (b k) h j d"),
        rearrange(allowed, "b h k w j -> (b k) h w j"),
        dropout_p=dropout_p,
    )
    oc = rearrange(oc, "(b k) h w d -> b h (k w) d", b=b)
    flat = rearrange(qi, "b h k w -> b h (k w)")
    total = q.new_zeros(b, h, n, d).scatter_add(2, flat[..., None].expand(-1, -1, -1, d), oc)
    count = q.new_zeros(b, h, n).scatter_add(2, flat, torch.ones_like(flat, dtype=q.dtype))
    mem_only = attend(
        q,
        mk[None].expand(b, -1, -1, -1).to(q.dtype),
        mv[None].expand(b, -1, -1, -1).to(q.dtype),
    )
    return torch.where(count[..., None] > 0, total / count.clamp(min=1)[..., None], mem_only)
