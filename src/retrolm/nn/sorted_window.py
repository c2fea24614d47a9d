"""Sorted-window attention: attention restricted to groups (clusters), over a sliding window
in the order (group, position). The strictly causal form of Routing Transformer attention.

Every token carries a group id (its k-means cluster; -1 = padding, which no real query ever
sees). A query at position p in group c may attend the keys of group c with the ``window``
latest positions <= p (causal), or the ``window - 1`` nearest of its group on each side
(non-causal), plus optional learned memory key/values that every query sees. Which keys a
query sees is thereby decided by the past alone; the balanced top-k routing of the reference
implementation ranks all positions against each centroid and so lets future tokens choose a
query's keys (research/attention-anchors.md §1.1, §1.6).

Three implementations of one definition:

* shared groups (queries and keys are the same tokens in the same groups, e.g. shared q/k):
  stable-sort by (group, position), cut the sorted sequence into blocks (``local_attention.
  block_offsets``: 32 for a window of 128) and let each block attend itself and the blocks
  within ``window`` sorted places before it (and after it when non-causal) with a same-group
  mask: O(n * window) time and memory, like exact local attention.
* separate key groups: keys sorted by (group, position); each query finds the end of its
  window with ``searchsorted`` and gathers ``window`` keys (chunked, recomputed in backward).
* ``dense_window_mask``: the (i, j) mask built from the definition: the oracle under
  ``attention_backend("reference")`` and the mask used for incremental (cached) decoding.

Notation: b batch, h heads, n positions, i queries, j keys, w window, d head dim, m memory kv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from retrolm.nn.attention import attend, block_attend, current_backend
from retrolm.nn.fused import window as fused_window
from retrolm.nn.local_attention import block_offsets, neighbour_blocks, relative_band
from retrolm.nn.norms import l2_normalize

MemKV = tuple[Tensor, Tensor]  # (h, m, d) keys and values


def dense_window_mask(
    q_group: Tensor,  # (b, h, i) int, -1 = padding
    k_group: Tensor,  # (b, h, j) int, -1 = padding; keys ordered by position
    window: int,
    *,
    causal: bool = True,
    q_pos: Tensor | None = None,  # (i,) positions; default: the last i of the j keys
    k_pos: Tensor | None = None,  # (j,)
    k_rank: Tensor | None = None,  # (b, h, j) same-group keys before each key (cached)
) -> Tensor:  # (b, h, i, j) bool, True = may attend
    i, j = q_group.shape[-1], k_group.shape[-1]
    dev = q_group.device
    k_pos = torch.arange(j, device=dev) if k_pos is None else k_pos
    q_pos = torch.arange(j - i, j, device=dev) if q_pos is None else q_pos
    same = (q_group[..., :, None] == k_group[..., None, :]) & (q_group >= 0)[..., None]
    if k_rank is None:
        kk = k_group[..., :, None] == k_group[..., None, :]  # (b, h, j, j)
        k_rank = (kk & torch.ones(j, j, dtype=torch.bool, device=dev).tril(-1)).sum(-1)
    before = k_pos[None, :] <= q_pos[:, None]  # (i, j)
    end = (same & before).sum(-1, keepdim=True)  # (b, h, i, 1) window end, in group ranks
    rank = k_rank[..., None, :]
    mask = same & (rank >= end - window)
    return mask & (before if causal else rank < end + window - 1)


def _exclude_self(mask: Tensor, is_self: Tensor, has_mem: bool) -> Tensor:
    """Shared q/k (Reformer, Kitaev et al. 2020): a token attends itself only when nothing
    else is allowed (q.q would dominate every other score)."""
    others = mask & ~is_self
    if has_mem:
        return others
    return others | (is_self & mask & ~others.any(-1, keepdim=True))


def attend_with_memory(
    q, k, v, mask, mem: MemKV | None, dropout_p: float, fn=attend, rows_have_keys: bool = False
) -> Tensor:
    """q (B, h, [nb,] i, d), k/v (B, h, [nb,] j, d), mask (B, h, [nb,] i, j); memory kv
    prepended, always visible.
    ``fn``: ``attend``, or ``block_attend`` for many small blocks. ``rows_have_keys``: the
    caller knows every row of ``mask`` allows a key (``attend``'s; memory implies it)."""
    if mem is not None:
        # (h, m, d) -> broadcast over the batch (and block) dims of k: (B, h, [nb,] m, d)
        mk, mv = (
            t.to(k.dtype).view(1, t.shape[0], *(1,) * (k.dim() - 4), *t.shape[1:]) for t in mem
        )
        k = torch.cat((mk.expand(*k.shape[:-2], -1, -1), k), dim=-2)
        v = torch.cat((mv.expand(*v.shape[:-2], -1, -1), v), dim=-2)
        ones = mask.new_ones(*mask.shape[:-1], mk.shape[-2])
        mask = torch.cat((ones, mask), dim=-1)
    if fn is attend and (rows_have_keys or mem is not None):
        return attend(q, k, v, mask, dropout_p=dropout_p, rows_have_keys=True)
    return fn(q, k, v, mask, dropout_p=dropout_p)


def _sort_key(group: Tensor, n: int) -> Tensor:
    pos = torch.arange(n, device=group.device)
    big = int(group.max()) + 1 if group.numel() else 0
    return torch.where(group < 0, big, group) * n + pos  # padding sorts last


def sorted_window_attend(
    q: Tensor,  # (b, h, n, d)
    k: Tensor,  # (b, h, n, d)
    v: Tensor,  # (b, h, n, dv)
    group: Tensor,  # (b, h, n) int: group of each query (and of each key unless k_group)
    window: int,
    *,
    k_group: Tensor | None = None,  # (b, h, n) keys' own groups (unshared q/k routing)
    causal: bool = True,
    mem_kv: MemKV | None = None,
    exclude_self: bool = False,
    dropout_p: float = 0.0,
    unit_keys: bool = False,
) -> Tensor:  # (b, h, n, dv)
    """``unit_keys``: the keys are ``norms.l2_normalize(k, fused=True)`` (shared q/k attention
    passes the queries), normalised inside the fused kernel where it runs."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if exclude_self and k_group is not None:
        raise ValueError("exclude_self needs shared groups (queries and keys are one token)")
    # (applies is False under the reference backend)
    fused = k_group is None and mem_kv is None and fused_window.applies(q, dropout_p)
    if unit_keys and not fused:
        k = l2_normalize(k, fused=True)
    if current_backend() == "reference":
        return _dense(q, k, v, group, window, k_group, causal, mem_kv, exclude_self, dropout_p)
    if fused:  # one C++ pass (bf16, CPU)
        # the kernel reads and writes the rows through the sort: no gathered copies
        order = _sort_key(group, q.shape[-2]).argsort(dim=-1)  # (b, h, n)
        return fused_window.window_attend(
            q, k, v, window, causal=causal, groups=group.gather(2, order), order=order,
            exclude_self=exclude_self, unit_keys=unit_keys,
        )  # fmt: skip
    if k_group is None:
        return _blocked(q, k, v, group, window, causal, mem_kv, exclude_self, dropout_p)
    return _gathered(q, k, v, group, k_group, window, causal, mem_kv, dropout_p)


def _dense(q, k, v, group, window, k_group, causal, mem_kv, exclude_self, dropout_p):
    n = q.shape[-2]
    mask = dense_window_mask(group, group if k_group is None else k_group, window, causal=causal)
    if exclude_self:
        mask = _exclude_self(
            mask, torch.eye(n, dtype=torch.bool, device=q.device), mem_kv is not None
        )
    return attend_with_memory(q, k, v, mask, mem_kv, dropout_p)


def _rows(x: Tensor, flat: Tensor) -> Tensor:
    """x (b, h, n, d) -> x[b, h, order[b, h, i]] given flat = order + (b*h row) * n: whole rows
    through index_select (gather reads one index per element, and costs ~3x more here)."""
    b, h, n, d = x.shape
    return x.reshape(b * h * n, d).index_select(0, flat).view(b, h, -1, d)


def _blocked(q, k, v, group, w, causal, mem_kv, exclude_self, dropout_p):
    b, h, n, d = q.shape
    order = _sort_key(group, n).argsort(dim=-1)  # (b, h, n)
    base = torch.arange(b * h, device=q.device).view(b, h, 1) * n
    flat = (order + base).flatten()
    qs, ks, vs = (_rows(t, flat) for t in (q, k, v))
    gs = group.gather(2, order)
    # blocks of c queries in sorted order, each seeing the `back` blocks before it (and as
    # many after it when non-causal): every key within w sorted places of its queries
    c, back, fwd = block_offsets(w, causal)
    pad = (-n) % c
    if pad:
        qs, ks, vs = (F.pad(t, (0, 0, 0, pad)) for t in (qs, ks, vs))
        gs = F.pad(gs, (0, pad), value=-2)
    kb, vb = neighbour_blocks(ks, c, back, fwd), neighbour_blocks(vs, c, back, fwd)
    gk = neighbour_blocks(gs, c, back, fwd, fill=-2)  # (b, h, nb, kw)
    gq = gs.unflatten(2, (-1, c))  # (b, h, nb, c)
    # distance in sorted order between a query and each of its block's candidate keys
    dist, allowed = relative_band(w, causal, q.device)  # (c, kw) each
    mask = (gq[..., :, None] == gk[..., None, :]) & (gq >= 0)[..., None] & allowed
    if exclude_self:
        mask = _exclude_self(mask, dist == 0, mem_kv is not None)
    qb = qs.unflatten(2, (-1, c))  # (b, h, nb, c, d)
    out = attend_with_memory(qb, kb, vb, mask, mem_kv, dropout_p, fn=block_attend)
    out = out.flatten(2, 3)[:, :, :n]  # (b, h, n, dv) in sorted order
    unsort = torch.empty_like(order).scatter_(
        2, order, torch.arange(n, device=q.device).expand_as(order)
    )
    return _rows(out, (unsort + base).flatten())


def _gathered(q, k, v, q_group, k_group, w, causal, mem_kv, dropout_p, chunk_elems=1 << 21):
    b, h, n, d = q.shape
    korder = _sort_key(k_group, n).argsort(dim=-1)
    kidx = korder[..., None]
    ks, vs = (t.gather(2, kidx.expand(-1, -1, -1, t.shape[-1])) for t in (k, v))
    skey = _sort_key(k_group, n).gather(2, korder)  # ascending
    sg = k_group.gather(2, korder)
    # (group, position) of each query; keys before it in sorted order end its window
    qkey = torch.where(q_group < 0, -1, q_group) * n + torch.arange(n, device=q.device)
    end = torch.searchsorted(skey.contiguous(), qkey.contiguous(), right=True)  # (b, h, n)
    span = w if causal else 2 * w - 1
    cand = end[..., None] - w + torch.arange(span, device=q.device)  # (b, h, n, span)
    valid = (cand >= 0) & (cand < n)
    cand = cand.clamp(0, n - 1)
    valid &= (
        sg.gather(2, rearrange(cand, "b h n s -> b h (n s)")).view_as(cand) == q_group[..., None]
    )
    valid &= (q_group >= 0)[..., None]
    if causal:
        valid &= cand < end[..., None]

    def run(qc, cc, vc):  # one chunk of queries: (b, h, c, d), (b, h, c, span), mask
        c = qc.shape[2]
        flat = rearrange(cc, "b h c s -> b h (c s)")[..., None]
        kc = ks.gather(2, flat.expand(-1, -1, -1, d)).view(b, h, c, span, d)
        vv = vs.gather(2, flat.expand(-1, -1, -1, vs.shape[-1])).view(b, h, c, span, -1)
        out = attend_with_memory(
            rearrange(qc, "b h c d -> (b c) h 1 d"),
            rearrange(kc, "b h c s d -> (b c) h s d"),
            rearrange(vv, "b h c s d -> (b c) h s d"),
            rearrange(vc, "b h c s -> (b c) h 1 s"),
            mem_kv,
            dropout_p,
        )
        return rearrange(out, "(b c) h 1 d -> b h c d", b=b)

    step = max(1, chunk_elems // max(1, b * h * span * d))
    outs = []
    for s in range(0, n, step):
        args = (q[:, :, s : s + step], cand[:, :, s : s + step], valid[:, :, s : s + step])
        if torch.is_grad_enabled() and dropout_p == 0.0:
            outs.append(checkpoint(run, *args, use_reentrant=False))
        else:
            outs.append(run(*args))
    return torch.cat(outs, dim=2)
