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

    ``mask (b or 1, 1, n, J)`` bool (batch 1 when every row's keys all count), ``bias (1, h,
    n, J)``; ``sdpa(dtype)``: the bias with -inf where masked, for SDPA (batch 1 when every
    key counts: nothing is built per row), and ``has_key (b, 1, n, 1)`` (None when every
    query has a key): an empty row attends everything there and is zeroed after."""

    def __init__(self, key_ok: Tensor, n: int, bias: RelativePositionBias) -> None:
        j = key_ok.shape[1]  # key_ok (b, J): keys that count (XL validity, not padding)
        k_pos = torch.arange(j, device=key_ok.device)
        self.causal = k_pos[None, :] <= k_pos[j - n :, None]  # (n, J)
        self.key_ok, self.every = key_ok, bool(key_ok.all())
        self.bias = bias.toeplitz(j - n, n, j)[None]
        self._sdpa: dict[torch.dtype, tuple[Tensor, Tensor | None]] = {}

    def tail(self, t: int) -> LocalGeometry:
        """The same keys for only the last ``t`` queries."""
        geo = object.__new__(LocalGeometry)
        geo.causal, geo.key_ok, geo.every = self.causal[-t:], self.key_ok, self.every
        geo.bias, geo._sdpa = self.bias[:, :, -t:], {}
        return geo

    @property
    def mask(self) -> Tensor:
        causal = self.causal[None, None]
        return causal if self.every else causal & self.key_ok[:, None, None, :]

    def sdpa(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        if dtype not in self._sdpa:
            # the causal part once for every row: (1, h, n, J)
            shared = self.bias.to(dtype).masked_fill(~self.causal, float("-inf"))
            out: tuple[Tensor, Tensor | None] = (shared, None)
            if not self.every:  # a query sees a key iff one counts up to its own position
                j, n = self.key_ok.shape[1], self.causal.shape[0]
                has_key = (self.key_ok.cumsum(1) > 0)[:, j - n :, None][:, None]  # (b,1,n,1)
                if bool(has_key.all()):  # the usual case: one pass writes the rows' biases
                    out = (torch.where(self.key_ok[:, None, None, :], shared, float("-inf")), None)
                else:  # an empty row attends everything, then is zeroed
                    ok = self.mask | ~has_key
                    out = (torch.where(ok, self.bias.to(dtype), float("-inf")), has_key)
            self._sdpa[dtype] = out
        return self._sdpa[dtype]


def local_attend(q: Tensor, keys: Tensor, geo: LocalGeometry, drop: float, scale=None) -> Tensor:
    """Attention of ``q (b, h, n, d)`` over the shared local head ``keys (b, J, 2, d)``.

    The heads share one key/value head, so they are folded into the query axis: one SDPA
    call over ``(b, 1, h * n, d)`` queries (no per-head copy of the keys)."""
    bias, has_key = geo.sdpa(q.dtype)  # (b or 1, h, n, J)
    b, h, n, d = q.shape
    k, v = keys[:, None, :, 0], keys[:, None, :, 1]  # (b, 1, J, d): one shared head
    qf = q.reshape(b, 1, h * n, d)
    bf = bias.reshape(bias.shape[0], 1, h * n, bias.shape[-1])
    out = attend(qf, k, v, bias=bf, dropout_p=drop, scale=scale).reshape(b, h, n, -1)
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
        tail: int | None = None,
    ) -> tuple[Tensor, Tensor]:  # (b, n or tail, dim), the new pairs (b, n, 2, d)
        """``tail``: only the last ``tail`` queries (``geo`` built for them: ``geo.tail``);
        the pairs are always every token's."""
        q = rearrange(self.to_q(_last(x, tail)), "b n (h d) -> b h n d", h=self.heads)
        kv = self.pairs(x)
        drop = self.dropout if self.training else 0.0
        out = local_attend(q, local_keys(kv, xl, past), geo, drop)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), kv

    def pairs(self, x: Tensor) -> Tensor:  # (b, n, dim) -> (b, n, 2, d)
        """The layer's (key, value) pair per token (what its memories keep)."""
        return rearrange(self.to_kv(x), "b n (two d) -> b n two d", two=2)


def _last(x: Tensor, tail: int | None) -> Tensor:
    return x if tail is None else x[:, x.shape[1] - tail :]


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
        # cosine-similarity attention needs a large temperature; learned in log space.
        # Both are per-head vectors: the trainer's weight decay skips parameters of one
        # dimension (a decayed log-temperature drifts to exp(0) = 1: uniform attention).
        self.scale = nn.Parameter(torch.full((heads,), math.log(attn_scale_init)))
        self.gate_bias = None
        if gate == "sigmoid":
            self.gate_bias = nn.Parameter(torch.full((heads,), float(gate_init)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints saved before these became vectors hold them as (heads, 1, 1)
        for name in ("scale", "gate_bias"):
            t = state_dict.get(prefix + name)
            if t is not None and t.dim() == 3 and t.shape[1:] == (1, 1):
                state_dict[prefix + name] = t.reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # signature twin of the local layer's forward (deliberate): a layer stack calls both alike
    def forward(
        self,
        x: Tensor,  # (b, n, dim)
        geo: LocalGeometry,
        xl: Tensor | None = None,
        past: Tensor | None = None,
        memory: KNNMemory | None = None,  # read only (writes come at the segment's end)
        tail: int | None = None,  # only the last queries (as XLAttention)
    ) -> tuple[Tensor, Tensor]:  # (b, n or tail, dim), the new pairs (b, n, 2, d)
        q = rearrange(self.to_q(_last(x, tail)), "b n (h d) -> b h n d", h=self.heads)
        q = l2_normalize(q)
        kv = self.pairs(x)
        keys = local_keys(kv, xl, past)
        qs = q * self.scale.exp().to(q.dtype)[:, None, None]  # (b, h, n, d)
        mem = None
        if memory is not None and len(memory) > 0:
            mem = self._retrieve(q, qs, memory)
        drop = self.dropout if self.training else 0.0
        if self.gate == "joint_softmax":
            out = self._joint(qs, keys, geo.mask, geo.bias, mem, drop)
        else:
            local = local_attend(qs, keys, geo, drop, scale=1.0)
            g = torch.sigmoid(self.gate_bias).to(q.dtype)[:, None, None]  # (h, 1, 1)
            out = (1 - g) * local
            if mem is not None:
                out = out + g * self._memory(*mem, drop)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), kv

    def pairs(self, x: Tensor) -> Tensor:  # (b, n, dim) -> (b, n, 2, d), keys normalised
        """The layer's (key, value) pair per token (what its memories keep)."""
        kv = rearrange(self.to_kv(x), "b n (two d) -> b n two d", two=2)
        return torch.stack([l2_normalize(kv[:, :, 0]), kv[:, :, 1]], dim=2)

    def _retrieve(self, q: Tensor, qs: Tensor, memory: KNNMemory) -> tuple[Tensor, Tensor, Tensor]:
        """The retrieved pairs as ``(logits (b, h, n, k), values (b, h, n, k, d), ok)``.

        With a gradient to q or the scale the logits are ``qs·k`` over the gathered keys.
        Without one (generation, evaluation) they are the search's own products ``q·k``
        times ``exp(s)`` (the same numbers: q is the query searched with), and only the
        values are gathered."""
        if torch.is_grad_enabled() and (qs.requires_grad or self.scale.requires_grad):
            mem_kv, ok = memory.search(q.detach(), self.topk)  # (b,h,n,k,2,d), (b,h,n,k)
            mem_kv = mem_kv.to(q.dtype)
            sim = torch.einsum("bhnd,bhnkd->bhnk", qs, mem_kv[..., 0, :])
            return sim, mem_kv[..., 1, :], ok
        scores, values, ok = memory.search_scored(q, self.topk)
        temp = self.scale.exp().to(qs.dtype)[:, None, None]
        return scores.to(qs.dtype) * temp, values.to(qs.dtype), ok

    @staticmethod
    def _memory(sim: Tensor, values: Tensor, ok: Tensor, drop: float) -> Tensor:
        """Softmax attention over each query's own retrieved pairs (zero where none)."""
        p = sim.masked_fill(~ok, float("-inf")).softmax(-1, dtype=torch.float32)
        p = F.dropout(torch.nan_to_num(p, nan=0.0).to(values.dtype), drop)
        return torch.einsum("bhnk,bhnkd->bhnd", p, values)

    @staticmethod
    def _joint(
        qs: Tensor,
        keys: Tensor,  # (b, J, 2, d)
        mask: Tensor,  # (b, 1, n, J)
        bias: Tensor,  # (1, h, n, J)
        mem: tuple[Tensor, Tensor, Tensor] | None,  # logits, values, ok
        drop: float,
    ) -> Tensor:
        """The reference's hybrid attention: one softmax over [memory | local]."""
        local = torch.einsum("bhnd,bjd->bhnj", qs, keys[:, :, 0]) + bias
        local = local.masked_fill(~mask, float("-inf"))
        k = 0
        if mem is not None:
            sim, _, ok = mem
            local = torch.cat([sim.masked_fill(~ok, float("-inf")), local], dim=-1)
            k = ok.shape[-1]
        p = torch.nan_to_num(local.softmax(-1, dtype=torch.float32), nan=0.0).to(qs.dtype)
        p = F.dropout(p, drop)
        out = torch.einsum("bhnj,bjd->bhnd", p[..., k:], keys[:, :, 1])
        if mem is not None:
            out = out + torch.einsum("bhnk,bhnkd->bhnd", p[..., :k], mem[1])
        return out
