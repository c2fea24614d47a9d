"""Linear layers that are cheap when decoding a few rows at a time.

Shapes: x (..., in), weight (out, in) as in ``nn.Linear``.

A decoding step multiplies one row by each weight: a matrix-vector product bound by reading
the weight from memory (a step reads every weight of the model once, ~50 MB for RETRO's
benchmark model, more than the cache holds). Through ``F.linear`` the CPU kernels here read
the weight as ``weight.T`` and were up to ~3x slower than ``x @ weight_t`` with ``weight_t``
a contiguous (in, out) copy, whenever out >= in (one thread, weights not in cache, as in
decoding: (29k, 256) 4.1 vs 1.4 ms, (1024, 256) 157 vs 71 us, (768, 256) 121 vs 68 us;
(256, 1024) 112 vs 160 us, so narrowing layers stay as they are). In RETRO's decode step
that was 7.5 -> 6.6 ms per token (one thread, A/B in one process).

``decode_linear`` keeps that copy (a ``TransposedWeight``, in the compute dtype: the
autocast dtype under autocast) and uses it without autograd for at most ``MAX_ROWS`` rows;
otherwise it is ``F.linear``. The copy costs one more weight's memory while decoding;
``DecodeLinear.train()`` drops it. Every call is on the decode hot path, so this file
favours few Python operations over generality.

In bf16 on a CPU with oneDNN's bf16 support the copy is instead a oneDNN *packed* weight
(``pack_weight``): PyTorch's own bf16 kernels ran a one-row product compute-bound, no
faster than fp32 although they read half the bytes, while oneDNN's inner product on the
packed layout took about half the time, narrowing layers included (one thread, weights
not in cache: (256 -> 1024) 80 vs 38 us, (1024 -> 256) 66 vs 39, (2048 -> 1024) 358 vs
165). The values are those of ``F.linear`` in bf16 (fp32 accumulation). For many rows
(a prefill) the packed weight ran as fast as ``F.linear``, so it serves every row count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm.nn.weight_cache import WeightCache

MAX_ROWS = 32  # x @ weight_t stayed faster than F.linear up to ~32 rows (measured, CPU)
# With several threads the CPU kernels ran a one-row matmul by the (256, 29k) vocabulary
# weight on one thread (1.39 ms at 2 threads, 1.47 at 1); split into one column block per
# thread and run as a batched matmul, it took 0.95 ms at 2 threads (and 1.79 ms at one,
# so it is used only with several). Weights of at least SPLIT_NUMEL elements get this.
SPLIT_NUMEL = 4 * 2**20


def _onednn_bf16() -> bool:
    try:
        ops = torch.ops.mkldnn
        ok = torch.backends.mkldnn.is_available() and ops._is_mkldnn_bf16_supported()
        return bool(ok) and hasattr(ops, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


PACKED_BF16 = _onednn_bf16()  # decode bf16 products through oneDNN packed weights


def packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights for this compute dtype and device are kept packed (``pack_weight``)."""
    return PACKED_BF16 and dtype is torch.bfloat16 and device.type == "cpu"


def pack_weight(weight: Tensor) -> Tensor:
    """(out, in) weight -> an opaque oneDNN bf16 tensor for ``linear_t`` (no autograd)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), 1)


def decode_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """(out, in) weight -> what ``linear_t`` takes: packed (``packs``) or, in ``dtype``, the
    (out, in) transposed view of a contiguous (in, out) copy (kept as the view: no ``.t()``
    call per decoded token)."""
    if packs(dtype, weight.device):
        return pack_weight(weight)
    with torch.no_grad():
        return weight.t().to(dtype).contiguous().t()


def concat_decode_weight(*params: Tensor) -> Tensor:  # a WeightCache build
    """(weights (o_i, in)..., dtype) -> their rows concatenated, as ``linear_t`` takes them
    (``decode_weight``): one matmul for several projections of the same input."""
    *weights, dtype = params
    return decode_weight(torch.cat(weights), dtype)


def _decode_copy(weight: Tensor, key: tuple[torch.dtype, int]) -> Tensor:  # a WeightCache build
    """``decode_weight(weight, dtype)``; with ``parts > 1`` (the key's second item) the copy
    is (parts, in, ceil(out / parts)): column blocks of ``weight.T``, zero-padded."""
    dtype, parts = key
    if parts == 1:
        return decode_weight(weight, dtype)
    n = weight.shape[0]
    w_t = F.pad(weight.t().to(dtype), (0, -n % parts))
    return w_t.unflatten(1, (parts, -1)).transpose(0, 1).contiguous()


class TransposedWeight(WeightCache):
    """A ``WeightCache`` of one weight's decode copy (``_decode_copy``), one entry per
    (dtype, parts): a bf16 prefill followed by fp32 steps (``prefill_dtype``) finds both
    copies on the next call instead of rebuilding each (~50 ms per call for RETRO's
    benchmark model)."""

    def __init__(self) -> None:
        super().__init__(_decode_copy)

    def get(self, weight: Tensor, dtype: torch.dtype, parts: int = 1) -> Tensor:  # type: ignore[override]
        return WeightCache.get(self, weight, key=(dtype, parts))

    @property
    def value(self) -> Tensor | None:
        """The copy of the entry in use (None before the first ``get``, after ``clear``)."""
        return self._value


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) computes in: the autocast dtype under autocast."""
    device = "cpu" if x.is_cpu else x.device.type  # (x.device builds an object: ~0.3 us)
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def linear_t(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` given the weight from ``decode_weight`` (no autograd). Packed: oneDNN's
    inner product, any row count. Else the (out, in) view of a contiguous (in, out) copy,
    for which ATen's ``F.linear`` runs ``x @ copy`` (the fast layout, see above) with no
    reshape/mm/view calls from Python: ~3 us less per call at one decoding row than calling
    mm itself, the same kernel and values (the layout made no difference for 448-1792 rows)."""
    if weight_t.is_mkldnn:
        if bias is not None and bias.dtype is not torch.bfloat16:
            bias = bias.to(torch.bfloat16)
        if x.dtype is not torch.bfloat16:
            x = x.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(  # (a no-op .contiguous() when it is)
            x.contiguous(), weight_t, bias, "none", [], ""
        )
    if x.dtype is not weight_t.dtype:  # (a no-op .to still costs a dispatch, ~1 us)
        x = x.to(weight_t.dtype)
    return F.linear(x, weight_t, bias)


def decode_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, cache: TransposedWeight
) -> Tensor:
    """``F.linear(x, weight, bias)``; through ``cache``'s (in, out) copy for a few rows."""
    k, n = x.shape[-1], weight.shape[0]
    if torch.is_grad_enabled() or x.numel() > MAX_ROWS * k:
        return F.linear(x, weight, bias)
    dtype = compute_dtype(x, weight)
    # narrowing: F.linear is as fast (see above); (the dtype test first: x.device costs)
    if n < k and not (dtype is torch.bfloat16 and packs(dtype, x.device)):
        return F.linear(x, weight, bias)
    if bias is not None and bias.dtype is not dtype:
        bias = bias.to(dtype)
    # packed bf16: oneDNN's product also for the vocabulary (0.87 vs 1.39 ms for RETRO's
    # (29k, 256) one in a bf16 decoding step at 2 threads, against the column-block bmm)
    if (
        weight.numel() < SPLIT_NUMEL
        or (dtype is torch.bfloat16 and packs(dtype, x.device))
        or (parts := torch.get_num_threads()) == 1
    ):
        return linear_t(x, cache.get(weight, dtype), bias)
    blocks = cache.get(weight, dtype, parts)  # (parts, in, ceil(out / parts))
    x2 = x.reshape(-1, k).to(dtype)
    out = torch.bmm(x2.expand(parts, -1, -1), blocks)  # (parts, rows, block)
    out = out.transpose(0, 1).reshape(x2.shape[0], -1)[:, :n]  # (rows, out)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


class DecodeLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that decodes through ``decode_linear``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._weight_t = TransposedWeight()

    def train(self, mode: bool = True):
        if mode:
            self._weight_t.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        # _parameters[...]: nn.Module.__getattr__ took ~0.8 us per lookup, a dict ~0.06 us
        # (a decoding step runs this ~12 times, and the lookups were ~5% of its Python)
        p = self._parameters
        return decode_linear(x, p["weight"], p["bias"], self._weight_t)
