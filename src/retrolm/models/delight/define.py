"""The DeFINE embedding (Mehta et al., "DeFINE: Deep Factorized Input Token Embeddings",
ICLR 2020; DeLighT §3.1 uses it with a DExTra unit): a narrow lookup table widened by a
deep group transformation.

Shapes: b batch, n positions, e = map_dim (lookup width), d = dim.

    ids (b, n) -> lookup (b, n, e) · sqrt(e) -> DExTra(e -> d) -> (b, n, d)

A token's vector has ``e`` free parameters instead of ``d``, and the DExTra (shared by all
tokens) maps it to the model width: ``V·e + DExTra`` parameters instead of ``V·d``. The
DExTra takes the decoder's first-block settings (depth ``min_depth``, width multiplier,
groups), as the reference's LM does. A tied output layer projects hidden states d -> e
and scores them against the same table (``weight``).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from retrolm.models.delight.dextra import DExTra


class DeFINE(nn.Module):
    """``ids (b, n) -> (b, n, dim)``: a ``map_dim``-wide lookup, scaled by sqrt(map_dim),
    then ``DExTra(map_dim -> dim)`` (``depth``, ``width_mult`` and the other keyword
    options as ``DExTra``'s)."""

    def __init__(
        self, num_tokens: int, map_dim: int, dim: int, depth: int, width_mult: float, **dextra
    ) -> None:
        super().__init__()
        self.map_dim, self.scale = map_dim, math.sqrt(map_dim)
        self.lookup = nn.Embedding(num_tokens, map_dim)
        nn.init.normal_(self.lookup.weight, std=map_dim**-0.5)
        self.dextra = DExTra(map_dim, dim, depth, width_mult, **dextra)

    @property
    def weight(self) -> Tensor:  # (V, map_dim): what a tied output layer scores against
        return self.lookup.weight

    def forward(self, ids: Tensor) -> Tensor:  # (b, n) -> (b, n, dim)
        return self.dextra(self.lookup(ids) * self.scale)
