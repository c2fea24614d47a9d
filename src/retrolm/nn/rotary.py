"""Rotary position embeddings (RoFormer, arXiv 2104.09864), computed in fp32.

Relative positions come from rotating queries and keys by their *absolute* positions, so any
offset (a KV cache, RETRO's chunk-relative geometry) is just a different ``positions`` tensor.
``dim`` may be smaller than the head dimension: only the first ``dim`` channels rotate
(partial rotary). Layout ``half`` pairs channel c with c + dim/2; ``interleaved`` pairs
2c with 2c+1.

``span(start, length)`` returns rows of a cos/sin table computed once (and grown by
doubling), the same values as ``forward(arange(start, start + length))``: a decoding step
then costs two slices instead of five kernels. ``apply_rotary`` folds the rotation's signs
into sin and keeps that product while the same ``sin`` comes back, so a model that rotates
in every layer with the rows it sliced once signs them once per step, not once per layer.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from retrolm.nn.fused import train as fused_train


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


@functools.lru_cache(maxsize=32)
def _sign(r: int, interleaved: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(r,) the signs of the rotated partner: -1 for x1's slots, +1 for x2's."""
    if interleaved:
        return torch.tensor([-1.0, 1.0], dtype=dtype, device=device).repeat(r // 2)
    return torch.ones(r, dtype=dtype, device=device).index_fill_(0, torch.arange(r // 2), -1.0)


# (sin, interleaved, sin * sign) of the last call: one tuple, replaced whole, so a thread
# never reads one call's sin with another call's product
_last_signed: tuple[Tensor | None, bool, Tensor | None] = (None, False, None)


def _signed_sin(sin: Tensor, interleaved: bool) -> Tensor:
    """sin * ``_sign``, reused while the same ``sin`` tensor comes back: every layer of a
    decoding step rotates with the one table its model sliced for that step. Holding the
    last ``sin`` keeps its id from being reused; rotary tables are never written in place."""
    global _last_signed
    last_sin, last_interleaved, last = _last_signed
    if last_sin is sin and last_interleaved is interleaved:
        return last
    signed = sin * _sign(sin.shape[-1], interleaved, sin.dtype, sin.device)
    if not signed.requires_grad:  # (a graph must not be reused across calls)
        _last_signed = (sin, interleaved, signed)
    return signed


def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    """(-x2, x1) for every pair, as a partner swap times ``_sign``: one kernel (roll or flip)
    for the swap, and the sign folds into sin, a table far smaller than x."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x.roll(x.shape[-1] // 2, dims=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of x (…, n, d); math in fp32.

    cos/sin (n, r) or broadcastable to x's leading dims, e.g. (b, 1, n, r).
    x*cos + (-x2, x1)*sin, written as x*cos + swap(x) * (sign*sin): four kernels (a decoding
    step calls this ~8 times per token, where the count of kernels is the cost); three when
    the signed sin of the same ``sin`` is kept from the previous call (``_signed_sin``).
    """
    if x.shape[-2] > 1 and fused_train.rotary_applies(x, cos, sin, interleaved):
        return fused_train.rotary(x, cos, sin)  # many rows (training, a prompt): one pass
    r = cos.shape[-1]
    full = r == x.shape[-1]  # full rotary: no split, no concatenation
    xf = x if full else x[..., :r]
    if xf.dtype is torch.float64 or cos.dtype is not torch.float32:
        xf = xf.float()  # else type promotion computes in fp32 already: no copy of x
    signed_sin = _signed_sin(sin, interleaved)
    out = torch.addcmul(xf * cos, _rotate(xf, interleaved), signed_sin)
    if out.dtype is not x.dtype:
        out = out.to(x.dtype)
    return out if full else torch.cat((out, x[..., r:]), dim=-1)
