"""Absolute position embeddings added to token embeddings (Vaswani et al., 2017, §3.5):
fixed sinusoids or a learned table.

Shapes: n positions, d = dim. ``AbsolutePositions(kind, max_len, dim)(n, offset)`` returns
the ``(n, d)`` embeddings of positions ``offset … offset + n - 1`` (a decoding cache passes
the number of tokens it holds as ``offset``).

Sinusoidal, in fairseq's layout (which DeLighT uses): the first d/2 features are
``sin(p·w_i)``, the last d/2 ``cos(p·w_i)``, ``w_i = 10000^(-i/(d/2 - 1))``; an odd ``d``
gets one zero feature at the end. Learned: an ``nn.Embedding(max_len, d)``, N(0, d^-1/2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

POSITION_KINDS = ("sinusoidal", "learned")


def sinusoids(n: int, dim: int, offset: int = 0) -> Tensor:
    """(n, dim) float32 sinusoids of positions offset … offset + n - 1."""
    half = dim // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)  # (d/2,)
    angles = torch.arange(offset, offset + n, dtype=torch.float32)[:, None] * freqs  # (n, d/2)
    out = torch.cat((angles.sin(), angles.cos()), dim=-1)  # (n, 2·(d/2))
    return out if dim % 2 == 0 else torch.cat((out, out.new_zeros(n, 1)), dim=-1)


class AbsolutePositions(nn.Module):
    """``(n, offset) -> (n, dim)`` position embeddings, ``kind`` sinusoidal or learned; at
    most ``max_len`` positions (``ValueError`` past them)."""

    def __init__(self, kind: str, max_len: int, dim: int) -> None:
        super().__init__()
        if kind not in POSITION_KINDS:
            raise ValueError(f"unknown position kind {kind!r}; choose one of {POSITION_KINDS}")
        self.kind, self.max_len = kind, max_len
        if kind == "learned":
            self.table = nn.Embedding(max_len, dim)
            nn.init.normal_(self.table.weight, std=dim**-0.5)
        else:
            self.register_buffer("table_", sinusoids(max_len, dim), persistent=False)

    def forward(self, n: int, offset: int = 0) -> Tensor:  # -> (n, dim)
        if offset + n > self.max_len:
            raise ValueError(
                f"positions {offset} ... {offset + n - 1} exceed max_len={self.max_len}; "
                "shorten the input or build the model with a larger max_seq_len"
            )
        if self.kind == "learned":
            return self.table.weight[offset : offset + n]
        return self.table_[offset : offset + n]


__all__ = ["AbsolutePositions", "POSITION_KINDS", "sinusoids"]
