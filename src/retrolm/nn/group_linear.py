"""Group linear transformation (GLT; Mehta et al., DeLighT, ICLR 2021, §3.1).

Shapes: ``...`` any leading dims, i = in_features, o = out_features, g groups.

The ``i`` input features are split into ``g`` contiguous groups; group ``j`` maps its slice
``[j·i/g, (j+1)·i/g)`` to ``o/g`` outputs with its own ``(i/g, o/g)`` matrix: a
block-diagonal linear layer with ``i·o/g`` weights instead of ``i·o``. All groups run as one
batched matmul over a ``(g, i/g, o/g)`` weight.

``shuffle=True`` interleaves the groups' outputs (ShuffleNet's channel shuffle, which
DeLighT applies after every GLT): output ``m·g + j`` is group ``j``'s ``m``-th output, so
any later split into contiguous groups sees features of every group here. Without it,
outputs ``[j·o/g, (j+1)·o/g)`` are group ``j``'s.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GroupLinear(nn.Module):
    """``(..., in_features) -> (..., out_features)``, ``groups`` independent blocks.

    ``groups=1`` is ``nn.Linear`` (with the weight stored transposed, as ``(1, in, out)``).
    The bias is one ``(out_features,)`` vector added after the shuffle."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        bias: bool = True,
        shuffle: bool = False,
    ) -> None:
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(
                f"groups={groups} must be >= 1 and divide both in_features={in_features} and "
                f"out_features={out_features}; pick a group count that divides both widths"
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.shuffle = shuffle
        self.weight = nn.Parameter(
            torch.empty(groups, in_features // groups, out_features // groups)
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, with each group's own fan-in (in/g)
        bound = 1.0 / math.sqrt(self.in_features // self.groups)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:  # (..., i) -> (..., o)
        # bmm and matmul called directly: einsum's planning cost ~50 us a call, which
        # dominated a decoding step (one row through dozens of GLTs)
        g, lead = self.groups, x.shape[:-1]
        if g == 1:
            y = torch.matmul(x, self.weight[0])  # (..., o)
        else:
            xg = x.reshape(-1, g, self.in_features // g).transpose(0, 1)  # (g, r, i/g)
            y = torch.bmm(xg, self.weight)  # (g, r, o/g)
            # (r, o/g, g) with the shuffle (flat index m·g + j), else (r, g, o/g)
            y = y.permute(1, 2, 0) if self.shuffle else y.transpose(0, 1)
            y = y.reshape(*lead, self.out_features)  # (..., o)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.groups}, bias={self.bias is not None}, shuffle={self.shuffle}"
        )
