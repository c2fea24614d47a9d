"""A linear layer for wide outputs (the vocabulary projection) that is cheap when decoding.

Shapes: x (..., in), weight (out, in) as in ``nn.Linear``.

A decoding step multiplies one or a few rows by the (vocab, d) output weight, a
matrix-vector product bound by reading the weight (30 MB for 29k × 256 in fp32). Through
``F.linear`` the CPU kernels here read it as ``weight.T`` and took 4.2 ms (one thread,
weight not in cache, as in decoding) against 1.4 ms for ``x @ weight_t`` with ``weight_t``
a contiguous (in, out) copy. ``decode_linear`` keeps that copy (a ``WeightCache``, in the
compute dtype: the autocast dtype under autocast) and uses it without autograd for at most
``MAX_ROWS`` rows; otherwise it is ``F.linear``. The copy costs one more weight's memory
while decoding; ``DecodeLinear.train()`` drops it. For the model's 256-wide layers the
gain (~30 us each) was eaten by the extra Python per call, so they stay ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.nn.weight_cache import WeightCache

MAX_ROWS = 32  # x @ weight_t stayed faster than F.linear up to ~32 rows (measured, CPU)


def transposed_cache() -> WeightCache:
    """A cache of weight (out, in) as a contiguous (in, out) copy in a given dtype."""
    return WeightCache(lambda w, dtype: w.t().to(dtype).contiguous())


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None, cache: WeightCache) -> Tensor:
    """``F.linear(x, weight, bias)``; through ``cache``'s (in, out) copy for a few rows."""
    if torch.is_grad_enabled() or x.numel() > MAX_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    w_t = cache.get(weight, key=dtype)  # (in, out)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast(dev, enabled=False):  # already in the dtype autocast would pick
        out = torch.mm(x2, w_t) if bias is None else torch.addmm(bias.to(dtype), x2, w_t)
    return out.view(*x.shape[:-1], w_t.shape[1])


class DecodeLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that decodes through ``decode_linear``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._weight_t = transposed_cache()

    def train(self, mode: bool = True):
        if mode:
            self._weight_t.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        return decode_linear(x, self.weight, self.bias, self._weight_t)
