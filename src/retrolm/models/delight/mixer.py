"""DExTra's input mixer (Mehta et al., DeLighT, ICLR 2021, Fig. 1c and §3.1).

Shapes: ``...`` leading dims, p the width of DExTra's input layer x, o the previous GLT's output.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mix(x: Tensor, out: Tensor, groups: int) -> Tensor:
    """DExTra's input mixer: ``(..., p), (..., o) -> (..., p + o)``, group j of the result
    (its j-th contiguous slice) is x's j-th slice followed by out's j-th slice."""
    if groups == 1:
        return torch.cat((x, out), dim=-1)
    xg = x.unflatten(-1, (groups, -1))  # (..., g, p/g)
    og = out.unflatten(-1, (groups, -1))  # (..., g, o/g)
    return torch.cat((xg, og), dim=-1).flatten(-2)  # (..., p + o)
