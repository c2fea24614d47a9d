"""Incremental decoding for the Routing Transformer: the cache and one cached routed step.

A routed head of a full forward (strict sorted-window routing, ``nn.sorted_window``) lets a
query attend the ``window`` latest keys of its own cluster at positions <= its own. So the
cache keeps, per cluster, only those: a ring buffer of the ``window`` latest keys/values of
each cluster and a count of the keys each cluster has seen. A decoded token writes its key
into its cluster's next slot and its query reads the ``window`` slots of its own cluster: a
step costs O(window), not O(cached length), and builds no mask over the cache. Attention
does not depend on the order of its keys, so the ring's order needs no bookkeeping. Local
heads keep only their last ``window - 1`` keys.

Notation: b batch, hr routed heads, L prefilled keys, t new tokens, k clusters, w window,
d head dim, m memory key/values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrolm.nn.kv_cache import KVCache
from retrolm.nn.sorted_window import attend_with_memory

__all__ = ["LayerCache", "RoutingCache", "ranks_in_group", "routed_decode_step"]


class LayerCache:
    """Incremental-decoding state of one self-attention layer."""

    def __init__(self) -> None:
        self.local = KVCache()  # last (local window - 1) keys of the local heads
        # routed heads: per (batch, head, cluster) the w latest keys, flat rows of a ring
        self.keys: Tensor | None = None  # (b * hr * k * w + 1, d); the last row: a sink
        self.values: Tensor | None = None  # (b * hr * k * w + 1, dv)
        self.counts: Tensor | None = None  # (b, hr, k) keys each cluster has seen
        self.window = 0
        self.shift: dict = {}  # token-shift state per sub-layer
        # views and constants of the rings, made once at prefill for the decoding step
        self._kring: Tensor | None = None  # (b * hr * k, w, d): self.keys' rings
        self._vring: Tensor | None = None  # (b * hr * k, w, dv)
        self._cnt: Tensor | None = None  # (b * hr * k,) self.counts, flat
        self._base: Tensor | None = None  # (b, hr, 1) first ring of each (batch, head)
        self._masks: dict[tuple[bool, bool], Tensor] = {}  # (shared_qk, memory) -> table

    @property
    def has_routed(self) -> bool:
        return self.counts is not None

    def fill_routed(
        self, keys: Tensor, values: Tensor, groups: Tensor, num_clusters: int, window: int
    ) -> None:
        """Prefill: keys/values (b, hr, L, d), their clusters (b, hr, L), -1 = padding."""
        b, h, _, d = keys.shape
        k, w = num_clusters, window
        self.window = w
        real = groups >= 0
        g = groups.clamp(min=0)
        self.counts = torch.zeros(b, h, k, dtype=torch.long, device=keys.device)
        self.counts.scatter_add_(-1, g, real.long())
        self._base = torch.arange(b * h, device=keys.device).view(b, h, 1) * k
        rank = ranks_in_group(groups)
        keep = real & (rank >= self.counts.gather(-1, g) - w)  # the w latest of each cluster
        rows = self._rows(g, rank)[keep]
        self.keys = keys.new_zeros(b * h * k * w + 1, d).index_copy_(0, rows, keys[keep])
        self.values = values.new_zeros(b * h * k * w + 1, values.shape[-1])
        self.values.index_copy_(0, rows, values[keep])
        self._kring = self.keys[:-1].view(b * h * k, w, d)
        self._vring = self.values[:-1].view(b * h * k, w, -1)
        self._cnt = self.counts.view(-1)
        self._masks = {}

    def _rows(self, g: Tensor, seen: Tensor) -> Tensor:
        """Flat ring row of a key of cluster g (b, hr, t) with `seen` earlier keys in it."""
        return (self._base + g) * self.window + seen % self.window

    def step_real(self, q, k_new, v_new, kg, qg, shared_qk: bool, mem_kv) -> Tensor:
        """``step`` for a token known to be real (no padding mask): every id is a cluster, so
        no clamp, no sink, and the mask is one row of a table (``_mask_table``). Reads and
        writes whole ring rows by (ring, slot) index: ~15 kernels instead of ~55."""
        b, h = kg.shape[:2]
        w = self.window
        # index tensors (b, hr, 1), as kg: they index k_new (b, hr, 1, d) without reshapes
        ring = self._base + kg  # the ring of the key's cluster
        seen = self._cnt.take(ring)  # keys that cluster has seen before this one
        slot = seen % w  # where this key goes: over the oldest once the ring is full
        self._kring.index_put_((ring, slot), k_new)
        self._vring.index_put_((ring, slot), v_new)
        nxt = seen + 1
        self._cnt.put_(ring, nxt)
        table = self._mask_table(shared_qk, mem_kv is not None)
        if shared_qk:  # the query's cluster is the key's: its row is (filled slots, self slot)
            row = torch.minimum(seen, slot + w)  # seen < w: seen; else w + slot
        else:
            ring = self._base + qg
            row = self._cnt.take(ring).clamp_(max=w)  # filled slots of the query's cluster
        flat = ring.view(-1)  # index_select + view: half the time of indexing by ring
        keys = self._kring.index_select(0, flat).view(b, h, w, -1)  # (b, hr, w, d)
        vals = self._vring.index_select(0, flat).view(b, h, w, -1)
        mask = table[row]  # (b, hr, 1, w)
        return attend_with_memory(q, keys, vals, mask, mem_kv, 0.0, rows_have_keys=True)

    def _mask_table(self, shared_qk: bool, has_mem: bool) -> Tensor:
        """(rows, w) bool, True = the slot may be attended. Not shared: row f <= w, the
        first f slots are filled. Shared q/k: row s < w, the ring holds s + 1 keys, the
        query's own in slot s; row w + s, the ring is full, its own key in slot s; its own
        key is allowed only when nothing else is (``sorted_window._exclude_self``)."""
        table = self._masks.get((shared_qk, has_mem))
        if table is not None:
            return table
        w, dev = self.window, self.counts.device
        slots = torch.arange(w, device=dev)
        if not shared_qk:
            table = slots < torch.arange(w + 1, device=dev)[:, None]  # (w + 1, w)
        else:
            rows = torch.arange(2 * w, device=dev)[:, None]
            filled = slots < torch.where(rows < w, rows + 1, w)
            is_self = slots == rows % w
            table = filled & ~is_self
            if not has_mem:
                table |= is_self & ~table.any(-1, keepdim=True)
        self._masks[(shared_qk, has_mem)] = table
        return table

    def step(self, q, k_new, v_new, kg, qg, shared_qk: bool, mem_kv) -> Tensor:
        """One token: q, k_new, v_new (b, hr, 1, d), clusters kg, qg (b, hr, 1); -1 =
        padding (its key goes to the sink row, its query sees nothing)."""
        b, h, _, d = q.shape
        w = self.window
        real = kg >= 0
        g = kg.clamp(min=0)
        rows = self._rows(g, self.counts.gather(-1, g))
        rows = rows.masked_fill_(~real, self.keys.shape[0] - 1).flatten()  # padding: the sink
        self.keys.index_copy_(0, rows, k_new.reshape(-1, d))
        self.values.index_copy_(0, rows, v_new.reshape(-1, v_new.shape[-1]))
        self.counts.scatter_add_(-1, g, real.long())
        cq = qg.clamp(min=0)
        seen = self.counts.gather(-1, cq)  # (b, hr, 1) keys of the query's cluster, itself too
        ring = (self._base + cq).flatten()
        keys = self._kring.index_select(0, ring).view(b, h, w, d)
        vals = self._vring.index_select(0, ring).view(b, h, w, -1)
        slot = torch.arange(w, device=q.device)
        mask = (slot < seen) & (qg >= 0)  # (b, hr, w): filled slots of a real query's cluster
        if shared_qk:  # itself only when it is alone (Reformer's shared-QK rule)
            is_self = slot == (seen - 1) % w
            alone = seen.clamp(max=w) == 1  # no other key in its window (w = 1: never)
            mask &= ~is_self if mem_kv is not None else ~is_self | alone
        return attend_with_memory(q, keys, vals, mask[..., None, :], mem_kv, 0.0)


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
    shared_qk: bool,
    mem_kv: tuple[Tensor, Tensor] | None,  # (hr, m, d) each
    real: bool = False,  # True: no padding among the new tokens (no input mask)
) -> Tensor:  # (b, hr, t, d)
    """Decode t new tokens against the cache with the same windows as a full forward: one
    token after the other (a token's window holds only earlier keys, so this is exact)."""
    step = cache.step_real if real else cache.step
    if q.shape[-2] == 1:
        return step(q, k_new, v_new, kg_new, qg, shared_qk, mem_kv)
    outs = [
        step(
            q[:, :, i : i + 1],
            k_new[:, :, i : i + 1],
            v_new[:, :, i : i + 1],
            kg_new[:, :, i : i + 1],
            qg[:, :, i : i + 1],
            shared_qk,
            mem_kv,
        )
        for i in range(q.shape[-2])
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
