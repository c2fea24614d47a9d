"""Rotary position embeddings (RoFormer, arXiv 2104.09864), computed in fp32.

Relative positions come from rotating queries and keys by their *absolute* positions, so any
offset (a KV cache, RETRO's chunk-relative geometry) is just a different ``positions`` tensor.
``dim`` may be smaller than the head dimension: only the first ``dim`` channels rotate
(partial rotary). Layout ``half`` pairs channel c with c + dim/2; ``interleaved`` pairs
2c with 2c+1.

``span(start, length)`` returns rows of a cos/sin table computed once (and grown by
doubling), the same values as ``forward(arange(start, start + length))``: a decoding step
then costs two slices instead of five kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        self.dim = dim
        self.interleaved = interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (cos, sin) for positions 0 … len-1; a plain attribute, so it stays fp32 and out of
        # the state dict; rebuilt when the device changes
        self._table: tuple[Tensor, Tensor] | None = None

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (..., n) int or float -> (cos, sin), each (..., n, dim) float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.float()  # (..., n, dim/2)
        if self.interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)
        else:
            freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def span(self, start: int, length: int, device=None) -> tuple[Tensor, Tensor]:
        """(cos, sin) of positions start … start+length-1, each (length, dim) float32."""
        device = self.inv_freq.device if device is None else torch.device(device)
        table = self._table
        end = start + length
        if table is None or table[0].shape[0] < end or table[0].device != device:
            size = max(end, 2 * table[0].shape[0] if table is not None else 64)
            table = self(torch.arange(size, device=device))
            self._table = table
        return table[0][start:end], table[1][start:end]


def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of x (…, n, d); math in fp32.

    cos/sin (n, r) or broadcastable to x's leading dims, e.g. (b, 1, n, r).
    """
    r = cos.shape[-1]
    full = r == x.shape[-1]  # full rotary: no split, no concatenation
    xf = (x if full else x[..., :r]).float()
    if interleaved:
        out = torch.addcmul(xf * cos, _rotate(xf, interleaved), sin)
    else:  # x*cos + (-x2, x1)*sin, the second term added into each half in place
        h = r // 2
        out = xf * cos
        out[..., :h].addcmul_(xf[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(xf[..., :h], sin[..., h:])
    out = out.to(x.dtype)
    return out if full else torch.cat((out, x[..., r:]), dim=-1)
