"""Mixture of experts feed-forward with top-k gating (Shazeer et al. 2017, arXiv 1701.06538)
and the load-balancing loss of Switch Transformer (Fedus et al. 2021, arXiv 2101.03961):

    aux = loss_coef * E * sum_e f_e * P_e

with f_e the fraction of tokens whose first choice is expert e and P_e the mean gate
probability of e. Each token is processed by its ``top_k`` experts, weighted by its
renormalised gate probabilities. ``forward`` returns ``(out, aux)``.

Shapes: b batch, n positions, E experts, t tokens routed to one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrolm.nn.feedforward import FeedForward


class MixtureOfExperts(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int = 4,
        *,
        top_k: int = 2,
        loss_coef: float = 1e-2,
        mult: float = 4.0,
        glu: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts, self.top_k = num_experts, min(top_k, num_experts)
        self.loss_coef = loss_coef
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(
            [FeedForward(dim, mult, glu=glu, dropout=dropout) for _ in range(num_experts)]
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (b, n, dim); mask (b, n) True = real token (padding is not routed)."""
        b, n, d = x.shape
        flat = rearrange(x, "b n d -> (b n) d")
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # ((b n), E)
        w, choice = probs.topk(self.top_k, dim=-1)  # ((b n), top_k)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        real = torch.ones(b * n, dtype=torch.bool, device=x.device)
        if mask is not None:
            real = rearrange(mask, "b n -> (b n)")
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = ((choice == e) & real[:, None]).nonzero(as_tuple=True)  # (t,)
            if tok.numel():
                out = out.index_add(0, tok, expert(flat[tok]) * w[tok, slot, None])
        # load balancing over real tokens
        r = real.float()
        denom = r.sum().clamp(min=1.0)
        frac = (F.one_hot(choice[:, 0], self.num_experts).float() * r[:, None]).sum(0) / denom
        mean_p = (probs * r[:, None]).sum(0) / denom
        aux = self.loss_coef * self.num_experts * (frac * mean_p).sum()
        return rearrange(out, "(b n) d -> b n d", b=b), aux
