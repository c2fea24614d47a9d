"""A linear layer for wide outputs (the vocabulary projection) that is cheap when decoding.

Shapes: x (..., in), weight (out, in) as in ``nn.Linear``.

A decoding step multiplies one or a few rows by the (vocab, d) output weight, a matrix-vector
product bound by reading the weight (30 MB for 29k × 256 in fp32). Through ``F.linear`` the
CPU kernels read it as ``weight.T`` and ran ~3x slower (6 ms vs 2 ms, one thread) than
``x @ weight_t`` with ``weight_t`` a contiguous (in, out) copy. ``DecodeLinear`` keeps that
copy (``WeightCache``) while it runs without autograd, and ``train()`` drops it. With
gradients, or more than ``max_rows`` rows, it is plain ``nn.Linear``. Costs one extra copy
of the weight in memory while decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.nn.weight_cache import WeightCache


class DecodeLinear(nn.Linear):
    max_rows = 32  # x @ weight_t stays faster than F.linear up to ~32 rows (measured, CPU)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._weight_t = WeightCache(lambda w: w.t().contiguous())  # (in, out)

    def train(self, mode: bool = True):
        if mode:
            self._weight_t.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if torch.is_grad_enabled() or rows > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        w_t = self._weight_t.get(self.weight)
        # in the weight's dtype even under autocast: a bf16 copy would be rebuilt every call
        with torch.autocast(x.device.type, enabled=False):
            out = x.to(w_t.dtype) @ w_t
            return out if self.bias is None else out + self.bias
