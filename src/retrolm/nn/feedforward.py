"""Position-wise feed-forward: plain MLP or GLU (Shazeer 2020), any activation.

``mult < 1`` gives a reduction FFN; ``hidden_dim`` overrides the width; ``chunks > 1``
processes the sequence in pieces to bound activation memory (same result); ``dim_out``
sets a different output width (default: ``dim``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.nn.decode_linear import DecodeLinear
from retrolm.nn.fused import train as fused_train

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
# the same, overwriting their input: without autograd the hidden activations need no new
# (tokens, hidden) buffer (a fresh multi-MB buffer costs its page faults on every call)
# (torch._C._nn: calling through torch.ops.aten costs ~200 us of Python dispatch per call)
INPLACE = {"gelu": torch._C._nn.gelu_, "relu": torch.relu_, "silu": torch._C._nn.silu_}


class FeedForward(nn.Module):
    def __init__(
        self,
        dim: int,
        mult: float = 4.0,
        *,
        glu: bool = False,
        activation: str = "gelu",
        dropout: float = 0.0,
        hidden_dim: int | None = None,
        chunks: int = 1,
        bias: bool = True,
        dim_out: int | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}"
            )
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        hidden = hidden_dim or max(1, int(dim * mult))
        self.glu = glu
        self.act = ACTIVATIONS[activation]
        self.act_ = INPLACE[activation]
        self.fused_gelu = activation == "gelu" and not glu  # nn.fused.train.linear_gelu
        self.chunks = chunks
        # both decode through a decode copy of their weight (decode_linear): transposed for
        # the widening one; in bf16 packed for both
        self.up_proj = DecodeLinear(dim, hidden * (2 if glu else 1), bias=bias)
        self.down_proj = DecodeLinear(hidden, dim_out or dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _ff(self, x: Tensor) -> Tensor:
        if self.fused_gelu and fused_train.linear_gelu_applies(x, self.up_proj):
            # a bf16 training step: GELU by table, its backward one pass with the bias's
            return self.down_proj(self.dropout(fused_train.linear_gelu(x, self.up_proj)))
        h = self.up_proj(x)
        inplace = not (torch.is_grad_enabled() and h.requires_grad)
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            h = h.mul_(self.act_(gate)) if inplace else h * self.act(gate)
        else:
            h = self.act_(h) if inplace else self.act(h)
        if self.training:  # nn.Dropout is the identity in eval; skip its call when decoding
            h = self.dropout(h)
        return self.down_proj(h)

    def forward(self, x: Tensor) -> Tensor:  # (b, n, dim) -> (b, n, dim_out)
        if self.chunks == 1 or x.shape[-2] <= 1:
            return self._ff(x)
        return torch.cat([self._ff(c) for c in x.chunk(self.chunks, dim=-2)], dim=-2)
