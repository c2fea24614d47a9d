"""Causal down-sampling and repeat up-sampling of a token stream (Hourglass, arXiv 2110.13711).

Notation: b batch, n positions, c factor, s stride, m = ceil(n / s) compressed tokens.

``CausalDownsample`` pads c - 1 zeros on the left and runs a strided convolution of kernel c,
so compressed token j summarises positions ``[j*s - c + 1, j*s]``: it is aligned with the
*last* position it covers (the Hourglass "shift by factor - 1") and never sees the future::

    positions  0 1 2 3 4 5 6 7          c = 4, s = 2
    token 0    0                         covers -3..0 (zeros before the start)
    token 1    0 1 2                     covers -1..2
    token 2      1 2 3 4                 covers  1..4
    token 3          3 4 5 6             covers  3..6

``repeat_upsample`` serves token j at positions ``j*s … j*s + s - 1``; as token j only covers
positions up to j*s, the repeated stream stays causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from retrolm.nn.decode_linear import DecodeLinear, compute_dtype, decode_weight, linear_t
from retrolm.nn.fused import decode as fused_decode
from retrolm.nn.weight_cache import WeightCache
from retrolm.utils import is_power_of_two


def _window_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:  # a WeightCache build
    """conv weight (o, d, c) -> the weight of one output position as a linear layer over
    the window flattened as (c d), as ``linear_t`` takes it."""
    return decode_weight(weight.transpose(1, 2).flatten(1), dtype)


class CausalDownsample(nn.Module):
    """(b, n, dim_in) -> (b, ceil(n / stride), dim_out).

    factor 1: a linear projection (identity when the widths agree). factor > 1: causal strided
    conv (dim_in -> expansion * dim_in, kernel ``factor``) -> SiLU -> linear (-> dim_out).
    """

    def __init__(
        self, dim_in: int, dim_out: int, factor: int, stride: int = 1, expansion: float = 4.0
    ) -> None:
        super().__init__()
        if not is_power_of_two(factor):
            raise ValueError(f"factor must be a power of 2, got {factor}")
        if not is_power_of_two(stride) or stride > factor:
            raise ValueError(f"stride must be a power of 2 <= factor ({factor}), got {stride}")
        self.factor, self.stride = factor, stride
        self.conv: nn.Conv1d | None = None
        if factor == 1:
            self.proj = nn.Identity() if dim_in == dim_out else DecodeLinear(dim_in, dim_out, False)
            return
        hidden = int(dim_in * expansion)
        self.conv = nn.Conv1d(dim_in, hidden, factor, stride=stride)
        self._step_weight = WeightCache(_window_weight)  # for ``step`` without autograd
        self._rows_weight = WeightCache(_window_rows)  # for ``step_fused``
        self.proj = DecodeLinear(hidden, dim_out)

    def train(self, mode: bool = True):
        if mode and self.conv is not None:  # the decoding copies are not needed while training
            self._step_weight.clear()
            self._rows_weight.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:  # (b, n, dim_in) -> (b, m, dim_out)
        if self.conv is None:
            return self.proj(x)
        h = F.pad(rearrange(x, "b n d -> b d n"), (self.factor - 1, 0))
        h = rearrange(self.conv(h), "b d m -> b m d")
        return self.proj(F.silu(h))

    def forward_embedded(self, ids: Tensor, table: Tensor) -> Tensor:
        """``forward(table[ids])`` for an embedded input, ids (b, n) into table (V, dim_in)
        -> (b, m, dim_out), computed per vocabulary entry instead of per position.

        Token j of the conv is bias + sum_k W_k x[j*s - c + 1 + k]; with x = table[ids] each
        term is a row of P_k = table @ W_k^T, so the conv's n*c*dim_in*hidden multiply-adds
        become V*c*dim_in*hidden for the table plus a gather-sum of c rows per token
        (``F.embedding_bag``, whose backward is a scatter-add). Cheaper whenever V < n (the
        benchmark model: 256 entries against 1,024 positions, ~4x fewer FLOPs forward and
        backward); positions before the start add nothing, as the conv's zero padding."""
        if self.conv is None:
            return self.proj(F.embedding(ids, table))
        c, s = self.factor, self.stride
        vocab, hidden = table.shape[0], self.conv.weight.shape[0]
        w = self.conv.weight.permute(1, 2, 0).reshape(table.shape[1], c * hidden)  # (d, c*o)
        rows = (table @ w).reshape(vocab * c, hidden)  # row v*c + k: table[v] @ W_k^T
        pad = F.pad(ids, (c - 1, 0), value=-1).unfold(1, c, s)  # (b, m, c) window ids
        real = pad >= 0
        taps = torch.arange(c, device=ids.device)
        index = torch.where(real, pad * c + taps, taps)  # (padding: any valid row, weight 0)
        b, m = index.shape[:2]
        h = F.embedding_bag(
            index.reshape(b * m, c), rows, mode="sum",
            per_sample_weights=real.reshape(b * m, c).to(rows.dtype),
        )  # fmt: skip
        h = (h + self.conv.bias.to(h.dtype)).view(b, m, hidden)
        return self.proj(F.silu(h))

    def step(self, window: Tensor) -> Tensor:
        """One compressed token from the last ``factor`` positions it covers.

        window (b, factor, dim_in), zeros for positions before the start -> (b, 1, dim_out);
        equal to ``forward``'s token j when the window ends at position j * stride.
        """
        if self.conv is None:
            return self.proj(window[:, -1:])
        # one output position of the conv is a matmul over the flattened window; this is much
        # faster than a conv call on a window exactly one kernel long
        w, b = self.conv.weight, self.conv.bias
        if torch.is_grad_enabled() and w.requires_grad:
            flat = rearrange(window[:, -self.factor :], "b c d -> b 1 (d c)")
            h = F.linear(flat, rearrange(w, "o d c -> o (d c)"), b)
        else:  # a cached copy of the weight in the (c d) order: the window needs no copy
            dtype = compute_dtype(window, w)
            flat = window[:, -self.factor :].flatten(1)[:, None]  # (b, 1, c*d)
            h = linear_t(flat, self._step_weight.get(w, key=dtype), b.to(dtype))
        return self.proj(F.silu(h))

    def step_fused(self, window: Tensor) -> Tensor:
        """``step`` for fp32 decoding through the fused feed-forward block of
        ``nn.fused.decode``: conv window, SiLU and projection in one call."""
        if self.conv is None:
            return self.step(window)
        flat = window[:, -self.factor :].flatten(1).contiguous()  # (b, c*d)
        rows = self._rows_weight.get(self.conv.weight)  # (o, c*d): rebuilt when the conv changes
        out, _ = fused_decode.feed_forward(
            flat, None, rows, self.conv.bias, self.proj.weight, self.proj.bias, act="silu",
            residual=False,
        )  # fmt: skip
        return out[:, None]


def _window_rows(weight: Tensor) -> Tensor:  # a WeightCache build
    """conv weight (o, d, c) -> (o, c*d) rows in the window's (c d) order, contiguous."""
    return weight.transpose(1, 2).flatten(1).contiguous()


def repeat_upsample(x: Tensor, stride: int, length: int) -> Tensor:
    """(b, m, d) -> (b, length, d): token j serves positions j*stride … j*stride + stride - 1."""
    if stride == 1:
        return x[:, :length]
    return repeat(x, "b m d -> b (m s) d", s=stride)[:, :length]
