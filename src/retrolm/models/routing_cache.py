"""Incremental decoding for the Routing Transformer: the cache and one cached routed step.

A routed head of a full forward (strict sorted-window routing, ``nn.sorted_window``) lets a
query attend the ``window`` latest keys of its own cluster at positions <= its own. To decode
with the same windows, the cache keeps every routed key with its cluster and its rank (how
many earlier keys share that cluster), plus per-cluster counts, so a new query's window is
found from ranks alone; local heads keep only their last ``window - 1`` keys.

Notation: b batch, hr routed heads, L cached keys, t new tokens, k clusters, d head dim,
m memory key/values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrolm.nn.attention import attend
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.sorted_window import dense_window_mask

__all__ = ["LayerCache", "RoutingCache", "ranks_in_group", "routed_decode_step"]


class LayerCache:
    """Incremental-decoding state of one self-attention layer."""

    def __init__(self) -> None:
        self.local = KVCache()  # last (local window - 1) keys of the local heads
        self.routed = KVCache()  # every key of the routed heads (any may be in a window)
        self.groups: Tensor | None = None  # (b, hr, L) cluster of each cached key
        self.ranks: Tensor | None = None  # (b, hr, L) same-cluster keys before it
        self.counts: Tensor | None = None  # (b, hr, k) cached keys per cluster
        self.shift: dict = {}  # token-shift state per sub-layer

    def fill_routed(self, keys: Tensor, values: Tensor, groups: Tensor, num_clusters: int) -> None:
        """Prefill: keep every key (b, hr, L, d) with its cluster (b, hr, L) and rank."""
        self.routed.update(keys, values)
        self.groups, self.ranks = groups, ranks_in_group(groups)
        self.counts = torch.zeros(
            *groups.shape[:2], num_clusters, dtype=torch.long, device=groups.device
        )
        self.counts.scatter_add_(-1, groups.clamp(min=0), (groups >= 0).long())


class RoutingCache:
    """What ``RoutingTransformerLM.init_cache`` returns: one ``LayerCache`` per layer."""

    def __init__(self, depth: int) -> None:
        self.layers = [LayerCache() for _ in range(depth)]
        self.length = 0


def ranks_in_group(groups: Tensor) -> Tensor:
    """(b, h, n) cluster ids -> number of earlier positions in the same cluster (O(n log n))."""
    n = groups.shape[-1]
    pos = torch.arange(n, device=groups.device)
    order = (groups * n + pos).argsort(dim=-1)
    sg = groups.gather(-1, order)
    first = torch.searchsorted(sg.contiguous(), sg.contiguous(), right=False)
    return torch.empty_like(groups).scatter_(-1, order, pos.expand_as(sg) - first)


def routed_decode_step(
    q: Tensor,  # (b, hr, t, d) new queries (rotary applied)
    k_new: Tensor,  # (b, hr, t, d) new keys
    v_new: Tensor,  # (b, hr, t, d)
    kg_new: Tensor,  # (b, hr, t) clusters of the new keys
    qg: Tensor,  # (b, hr, t) clusters of the new queries
    cache: LayerCache,
    *,
    window: int,
    shared_qk: bool,
    mem_kv: tuple[Tensor, Tensor] | None,  # (hr, m, d) each
) -> Tensor:  # (b, hr, t, d)
    """Decode t new tokens against the cache with the same windows as a full forward."""
    t = q.shape[-2]
    L = cache.routed.length
    same_new = (kg_new[..., :, None] == kg_new[..., None, :]) & torch.ones(
        t, t, dtype=torch.bool, device=q.device
    ).tril(-1)
    rank_new = cache.counts.gather(-1, kg_new.clamp(min=0)) + same_new.sum(-1)
    cache.counts.scatter_add_(-1, kg_new.clamp(min=0), (kg_new >= 0).long())
    cache.groups = torch.cat((cache.groups, kg_new), dim=-1)
    cache.ranks = torch.cat((cache.ranks, rank_new), dim=-1)
    k, v = cache.routed.update(k_new, v_new)
    mask = dense_window_mask(qg, cache.groups, window, causal=True, k_rank=cache.ranks)
    if shared_qk:
        pos = torch.arange(L + t, device=q.device)
        is_self = pos[None, :] == pos[L:, None]
        others = mask & ~is_self
        if mem_kv is None:
            others = others | (is_self & mask & ~others.any(-1, keepdim=True))
        mask = others
    if mem_kv is not None:
        mk, mv = mem_kv
        b = q.shape[0]
        k = torch.cat((mk.to(k.dtype).expand(b, -1, -1, -1), k), dim=-2)
        v = torch.cat((mv.to(v.dtype).expand(b, -1, -1, -1), v), dim=-2)
        mask = torch.cat((mask.new_ones(*mask.shape[:-1], mk.shape[-2]), mask), dim=-1)
    return attend(q, k, v, mask)
