"""Product-key memory (Lample et al., NeurIPS 2019, arXiv 1907.05242).

A large key-value memory read with sparse attention: each query is split into two halves,
each half scores ``num_keys`` sub-keys, the top-k of each are combined into k² candidate
keys of the product set (``num_keys²`` slots), and the best ``topk`` candidates are read with
softmax weights. It replaces a feed-forward layer. The values are a sparse embedding table;
the paper (and the routing-transformer README) trains them with a higher learning rate, so
``pkm_param_groups`` splits them into their own optimizer group.

Shapes: b batch, n positions, h memory heads, k sub-keys per half, t = topk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class ProductKeyMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        num_keys: int = 128,
        *,
        heads: int = 4,
        topk: int = 32,
        dim_key: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_keys < 1 or topk < 1:
            raise ValueError(f"num_keys and topk must be >= 1, got {num_keys}, {topk}")
        dim_key = dim_key or max(2, dim // 2)
        if dim_key % 2:
            raise ValueError(f"dim_key must be even (it is split in halves), got {dim_key}")
        self.heads, self.num_keys, self.dim_key = heads, num_keys, dim_key
        self.topk = min(topk, num_keys)
        self.to_queries = nn.Linear(dim, heads * dim_key, bias=False)
        self.norm = nn.LayerNorm(dim_key)  # query normalisation (the paper uses batch norm)
        self.keys = nn.Parameter(torch.randn(heads, 2, num_keys, dim_key // 2) * dim_key**-0.5)
        self.values = nn.EmbeddingBag(num_keys**2, dim, mode="sum")
        nn.init.normal_(self.values.weight, std=dim**-0.5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (b, n, dim) -> (b, n, dim)
        b, n, _ = x.shape
        q = self.norm(rearrange(self.to_queries(x), "b n (h d) -> b n h d", h=self.heads))
        q = rearrange(q, "b n h (p d) -> p b n h d", p=2)  # two halves
        scores = torch.einsum("pbnhd,hpkd->pbnhk", q, self.keys)
        s, i = scores.topk(self.topk, dim=-1)  # (2, b, n, h, t)
        # candidate pairs: t x t combinations of the two halves' best sub-keys
        cs = s[0][..., :, None] + s[1][..., None, :]  # (b, n, h, t, t)
        ci = i[0][..., :, None] * self.num_keys + i[1][..., None, :]
        cs, ci = (
            rearrange(cs, "b n h s t -> b n h (s t)"),
            rearrange(ci, "b n h s t -> b n h (s t)"),
        )
        top_s, pos = cs.topk(self.topk, dim=-1)  # (b, n, h, t)
        idx = ci.gather(-1, pos)
        w = self.dropout(F.softmax(top_s.float(), dim=-1).to(x.dtype))
        out = self.values(
            rearrange(idx, "b n h t -> (b n) (h t)"),
            per_sample_weights=rearrange(w, "b n h t -> (b n) (h t)"),
        )
        return rearrange(out, "(b n) d -> b n d", b=b)


def pkm_param_groups(
    model: nn.Module, lr: float, pkm_value_lr: float = 1e-2, **group_kwargs
) -> list[dict]:
    """Optimizer parameter groups: PKM value tables at ``pkm_value_lr``, the rest at ``lr``."""
    values = {
        id(p)
        for m in model.modules()
        if isinstance(m, ProductKeyMemory)
        for p in m.values.parameters()
    }
    rest = [p for p in model.parameters() if id(p) not in values]
    pkm = [p for p in model.parameters() if id(p) in values]
    groups = [dict(params=rest, lr=lr, **group_kwargs)]
    if pkm:
        groups.append(dict(params=pkm, lr=pkm_value_lr, **group_kwargs))
    return groups
