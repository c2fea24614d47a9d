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
    key_ok: Tensor,  # (b, J) bool: keys that count (XL validity, not padding)
    bias: RelativePositionBias,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(keys (b, J, 2, d), mask (b, 1, n, J), bias (1, h, n, J))`` of the local attention:
    each query sees every XL pair and its causal prefix of the segment."""
    keys = torch.cat([t.to(kv.dtype) for t in (xl, past) if t is not None] + [kv], dim=1)
    j, n = keys.shape[1], kv.shape[1]
    k_pos = torch.arange(j, device=kv.device)
    q_pos = k_pos[j - n :]
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None] & key_ok[:, None, None, :]
    return keys, mask, bias(q_pos, k_pos)[None]


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
        bias: RelativePositionBias,
        key_ok: Tensor,  # (b, J)
        xl: Tensor | None = None,
        past: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:  # (b, n, dim), the new pairs (b, n, 2, d)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        kv = rearrange(self.to_kv(x), "b n (two d) -> b n two d", two=2)
        keys, mask, b = local_keys(kv, xl, past, key_ok, bias)
        k, v = keys[:, None, :, 0], keys[:, None, :, 1]  # (b, 1, J, d): one shared head
        drop = self.dropout if self.training else 0.0
        out = attend(q, k, v, mask, bias=b, dropout_p=drop)
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
        bias: RelativePositionBias,
        key_ok: Tensor,  # (b, J)
        xl: Tensor | None = None,
        past: Tensor | None = None,
        memory: KNNMemory | None = None,  # read only (writes come at the segment's end)
    ) -> tuple[Tensor, Tensor]:  # (b, n, dim), the new pairs (b, n, 2, d), k normalised
        q = l2_normalize(rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads))
        kv = rearrange(self.to_kv(x), "b n (two d) -> b n two d", two=2)
        kv = torch.stack([l2_normalize(kv[:, :, 0]), kv[:, :, 1]], dim=2)
        keys, mask, b = local_keys(kv, xl, past, key_ok, bias)
        qs = q * self.scale.exp().to(q.dtype)  # (b, h, n, d)
        mem = None
        if memory is not None and len(memory) > 0:
            mem_kv, mem_ok = memory.search(q.detach(), self.topk)  # (b,h,n,k,2,d), (b,h,n,k)
            mem = (mem_kv.to(q.dtype), mem_ok)
        drop = self.dropout if self.training else 0.0
        if self.gate == "joint_softmax":
            out = self._joint(qs, keys, mask, b, mem, drop)
        else:
            k, v = keys[:, None, :, 0], keys[:, None, :, 1]
            local = attend(qs, k, v, mask, scale=1.0, bias=b, dropout_p=drop)
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
