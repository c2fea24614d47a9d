"""kNN-augmented attention (Wu et al., ICLR 2022, arXiv 2203.08913, §3) and the ordinary
layers' attention over the segment plus its Transformer-XL memory.

Both are multi-query (as the reference): ``h`` query heads share one key/value head of width
``d``, so a layer stores one ``(k, v)`` pair per token. Local keys are ``[XL | segment so far |
new]``: with ``L`` XL pairs, key ``j`` sits at position ``j`` and query ``t`` at ``L + t``, so
the T5 relative bias sees the true distance to every XL key (the reference puts the queries at
``0 .. n-1``, and every XL key within ``L`` back gets the bias of distance 0).

The kNN layer (``KNNAttention``): q and k l2-normalised, logits ``exp(s)·q·k`` with a learned
``s`` per head; each query also retrieves the top-k pairs of its row's external memory (searched
*before* this segment's pairs are written, which keeps the layer causal). Combination:
``sigmoid`` (the paper): ``out = σ(b)·A_mem + (1 − σ(b))·A_local`` with a learned per-head
``b``, A_mem a softmax over the valid retrieved pairs (0 when there are none);
``joint_softmax`` (the reference): one softmax over ``[memory | local]``.

Shapes: b batch, h heads, n new queries, J local keys, k retrieved, d head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrolm.nn.attention import attend
from retrolm.nn.knn_memory import KNNMemory
from retrolm.nn.norms import l2_normalize
from retrolm.nn.relative_bias import RelativePositionBias


def local_keys(
    kv: Tensor,  # (b, n, 2, d) the new pairs
    xl: Tensor | None,  # (b, L, 2, d)
    past: Tensor | None,  # (b, t, 2, d) this segment's earlier pairs
) -> Tensor:  # (b, J, 2, d)
    """The local keys ``[XL | segment so far | new]``."""
    return torch.cat([t.to(kv.dtype) for t in (xl, past) if t is not None] + [kv], dim=1)


class LocalGeometry:
    """Where the ``n`` new queries of a piece may look among its ``J`` local keys: each sees
    every valid XL pair and its causal prefix of the segment (query ``t`` at position
    ``J - n + t``, key ``j`` at ``j``). Built once per piece and shared by the layers with the
    same keys, so the T5 bias and the masks are not rebuilt per layer.

    ``mask (b, 1, n, J)`` bool, ``bias (1, h, n, J)``; ``sdpa(dtype)``: the bias with -inf
    where masked, for SDPA, and ``has_key (b, 1, n, 1)`` (None when every row has a key): an
    empty row attends everything there and is zeroed after."""

    def __init__(self, key_ok: Tensor, n: int, bias: RelativePositionBias) -> None:
        j = key_ok.shape[1]  # key_ok (b, J): keys that count (XL validity, not padding)
        k_pos = torch.arange(j, device=key_ok.device)
        causal = k_pos[None, :] <= k_pos[j - n :, None]  # (n, J)
        self.mask = causal[None, None] & key_ok[:, None, None, :]
        self.bias = bias.toeplitz(j - n, n, j)[None]
        self._sdpa: dict[torch.dtype, tuple[Tensor, Tensor | None]] = {}

    def sdpa(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        if dtype not in self._sdpa:
            has_key = self.mask.any(dim=-1, keepdim=True)  # (b, 1, n, 1)
            if bool(has_key.all()):
                ok, has_key = self.mask, None
            else:
                ok = self.mask | ~has_key
            self._sdpa[dtype] = (torch.where(ok, self.bias.to(dtype), float("-inf")), has_key)
        return self._sdpa[dtype]


def local_attend(q: Tensor, keys: Tensor, geo: LocalGeometry, drop: float, scale=None) -> Tensor:
    """Attention of ``q (b, h, n, d)`` over the shared local head ``keys (b, J, 2, d)``."""
    bias, has_key = geo.sdpa(q.dtype)
    k, v = keys[:, None, :, 0], keys[:, None, :, 1]  # (b, 1, J, d): one shared head
    out = attend(q, k, v, bias=bias, dropout_p=drop, scale=scale)
    return out if has_key is None else out * has_key.to(out.dtype)


class XLAttention(nn.Module):
    """The ordinary layers: causal multi-query attention over [XL | segment], T5 bias."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(
        self,
        x: Tensor,  # (b, n, dim)
        geo: LocalGeometry,
        xl: Tensor | None = None,
        past: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:  # (b, n, dim), the new pairs (b, n, 2, d)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        kv = rearrange(self.to_kv(x), "b n (two d) -> b n two d", two=2)
        drop = self.dropout if self.training else 0.0
        out = local_attend(q, local_keys(kv, xl, past), geo, drop)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), kv


class KNNAttention(nn.Module):
    """kNN-augmented attention: local [XL | segment] plus top-k pairs from the row's memory."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        num_retrieved_memories: int = 32,
        gate: str = "sigmoid",
        gate_init: float = 0.0,
        attn_scale_init: float = 20.0,
    ) -> None:
        super().__init__()
        self.heads, self.dropout, self.topk, self.gate = (
            heads,
            dropout,
            num_retrieved_memories,
            gate,
        )
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        # cosine-similarity attention needs a large temperature; learned in log space
        self.scale = nn.Parameter(torch.full((heads, 1, 1), math.log(attn_scale_init)))
        self.gate_bias = None
        if gate == "sigmoid":
            self.gate_bias = nn.Parameter(torch.full((heads, 1, 1), float(gate_init)))

    # signature twin of the local layer's forward (deliberate): a layer stack calls both alike
    def forward(
        self,
        x: Tensor,  # (b, n, dim)
        geo: LocalGeometry,
        xl: Tensor | None = None,
        past: Tensor | None = None,
        memory: KNNMemory | None = None,  # read only (writes come at the segment's end)
    ) -> tuple[Tensor, Tensor]:  # (b, n, dim), the new pairs (b, n, 2, d), k normalised
        q = l2_normalize(rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads))
        kv = rearrange(self.to_kv(x), "b n (two d) -> b n two d", two=2)
        kv = torch.stack([l2_normalize(kv[:, :, 0]), kv[:, :, 1]], dim=2)
        keys = local_keys(kv, xl, past)
        qs = q * self.scale.exp().to(q.dtype)  # (b, h, n, d)
        mem = None
        if memory is not None and len(memory) > 0:
            mem_kv, mem_ok = memory.search(q.detach(), self.topk)  # (b,h,n,k,2,d), (b,h,n,k)
            mem = (mem_kv.to(q.dtype), mem_ok)
        drop = self.dropout if self.training else 0.0
        if self.gate == "joint_softmax":
            out = self._joint(qs, keys, geo.mask, geo.bias, mem, drop)
        else:
            local = local_attend(qs, keys, geo, drop, scale=1.0)
            g = torch.sigmoid(self.gate_bias).to(q.dtype)  # (h, 1, 1): the memory's weight
            out = (1 - g) * local
            if mem is not None:
                out = out + g * self._memory(qs, *mem, drop)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), kv

    @staticmethod
    def _memory(qs: Tensor, mem_kv: Tensor, ok: Tensor, drop: float) -> Tensor:
        """Softmax attention over each query's own retrieved pairs (zero where none)."""
        sim = torch.einsum("bhnd,bhnkd->bhnk", qs, mem_kv[..., 0, :])
        p = sim.masked_fill(~ok, float("-inf")).softmax(-1, dtype=torch.float32)
        p = F.dropout(torch.nan_to_num(p, nan=0.0).to(qs.dtype), drop)
        return torch.einsum("bhnk,bhnkd->bhnd", p, mem_kv[..., 1, :])

    @staticmethod
    def _joint(
        qs: Tensor,
        keys: Tensor,  # (b, J, 2, d)
        mask: Tensor,  # (b, 1, n, J)
        bias: Tensor,  # (1, h, n, J)
        mem: tuple[Tensor, Tensor] | None,
        drop: float,
    ) -> Tensor:
        """The reference's hybrid attention: one softmax over [memory | local]."""
        local = torch.einsum("bhnd,bjd->bhnj", qs, keys[:, :, 0]) + bias
        local = local.masked_fill(~mask, float("-inf"))
        k = 0
        if mem is not None:
            mem_kv, ok = mem
            sim = torch.einsum("bhnd,bhnkd->bhnk", qs, mem_kv[..., 0, :])
            local = torch.cat([sim.masked_fill(~ok, float("-inf")), local], dim=-1)
            k = ok.shape[-1]
        p = torch.nan_to_num(local.softmax(-1, dtype=torch.float32), nan=0.0).to(qs.dtype)
        p = F.dropout(p, drop)
        out = torch.einsum("bhnj,bjd->bhnd", p[..., k:], keys[:, :, 1])
        if mem is not None:
            out = out + torch.einsum("bhnk,bhnkd->bhnd", p[..., :k], mem[0][..., 1, :])
        return out
