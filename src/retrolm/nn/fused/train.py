"""Fused training kernels (CPU): the memory-bound steps between a block's matmuls.

In a bf16 training step on a CPU the matmuls already run near the machine's rate; much of
the rest is short elementwise passes, each a read and a write of a full activation plus a
kernel launch, and twice that in the backward. ``csrc/train_kernels.cpp`` (built on first
use, ``nn.fused.extension``) does three of them in one pass each way. This module holds the
kernels and the conditions under which each applies (``*_applies``); where a block owns the
operation, the public entry and its ATen path live in the block (named in brackets):

- ``norm_shift_kernel`` (``norms.norm_shift(x, norm, shift)``): ``token_shift(norm(x), (0,
  shift))`` for an ``RMSNorm`` or a ``LayerNorm``, returned directly in the dtype the next
  matmul reads (bf16 under CPU autocast), so the norm, the shift's split/pad/cat and
  autocast's cast are one kernel; its backward is one pass too (the shift's transpose, then
  the norm's gradient). 1.4 -> 0.25 ms forward + backward at (1, 1024, 256), 2 threads.
- ``rotary(x, cos, sin)``: ``apply_rotary`` (half layout, (i, r) tables) of a
  (b, h, i, d) tensor of any layout, fp32 math, one rounding to x's dtype. 0.53 -> 0.10 ms
  forward + backward at (8, 4, 128, 64) bf16.
- ``cross_entropy_kernel`` (``losses.cross_entropy(logits, labels)``):
  ``F.cross_entropy(logits.float(), labels)`` for (N, V) logits without the fp32 copy or the
  stored log-softmax; the backward writes softmax minus one-hot in the logits' dtype. 5.6 ->
  3.0 ms forward + backward at (8192, 256) bf16.

- ``kmeans_assign(x, means, mask, stats)``: spherical k-means assignment (unit vector,
  nearest centroid, similarity, the clusters' sums and counts) in one pass that never writes
  the fp32 unit vectors; the similarity's gradient in one pass back.
- ``l2norm_kernel`` (``norms.l2_normalize(x, dtype=dtype, fused=True)``):
  ``norms.l2_normalize(x.to(dtype))`` for (b, h, n, d) rows of any layout, one pass each
  way (the routing model's shared-q/k keys, and sorted-window attention's unit keys on its
  ATen path).

- ``linear_gelu(x, linear)``: ``F.gelu(linear(x))`` for a bf16 training step: the product
  through ATen, the GELU of its bf16 result by table (a bf16 value has 65,536 bit patterns,
  so exact GELU and its slope are tables computed once in double), and in the backward one
  pass for the GELU's gradient and the bias gradient together.

(An exact GELU computed by an erf polynomial was no faster than ATen's: it is bound by the
polynomial; the table removes it.)

Each falls back to the composite ATen ops (the reference, and what runs off CPU, in
float64, without the extension, or with ``RETROLM_FUSED_TRAIN=0``). Values agree with it
to rounding (tests/nn/test_fused_train.py: float64 kernels against autograd, fp32 and bf16
against the modules).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrolm.nn.fused.extension import LazyExtension

__all__ = [
    "cross_entropy_applies",
    "cross_entropy_kernel",
    "enabled",
    "extension",
    "kmeans_applies",
    "kmeans_assign",
    "l2norm_applies",
    "l2norm_kernel",
    "linear_gelu",
    "linear_gelu_applies",
    "norm_shift_applies",
    "norm_shift_kernel",
    "rotary",
    "rotary_applies",
    "set_enabled",
]

_EXT = LazyExtension(
    "retrolm_train_kernels", "train_kernels.cpp", "fused training kernels", "RETROLM_FUSED_TRAIN"
)


# set_enabled / enabled / extension: the same three functions in train.py and decode.py
# (deliberate twins: each module's own switch over its LazyExtension)
def set_enabled(on: bool) -> bool:
    """Turn the fused kernels on or off for this process; returns the previous setting."""
    return _EXT.set_enabled(on)


def enabled() -> bool:
    return _EXT.enabled


def extension():
    """The compiled kernels (built on the first call), or None if they cannot be built."""
    return _EXT.get()


def _out_dtype(x: Tensor) -> torch.dtype:
    """What a matmul reading x computes in: bf16 for bf16 x or under CPU bf16 autocast, else
    x's dtype."""
    if x.dtype is torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    ):
        return torch.bfloat16
    return x.dtype


class _NormShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, shift: int, split: int, out_dtype, axial: int,
                layer: bool):  # fmt: skip
        y, rstd, mean = extension().norm_shift_forward(
            x, weight, bias, eps, shift, split, out_dtype, axial, layer
        )
        ctx.save_for_backward(x, weight, rstd, mean)
        ctx.shift, ctx.split, ctx.axial, ctx.has_bias = shift, split, axial, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd, mean = ctx.saved_tensors
        if grad.dtype not in (torch.bfloat16, x.dtype):
            grad = grad.to(x.dtype)
        gx, gw, gb = extension().norm_shift_backward(
            grad.contiguous(), x, weight, rstd, mean, ctx.shift, ctx.split, ctx.axial,
            ctx.has_bias,
        )  # fmt: skip
        return gx, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None


def norm_shift_applies(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: int) -> bool:
    """Whether ``norm_shift_kernel`` takes x (b, n, d) with these norm parameters: enabled
    and built, CPU, fp32 or bf16 x, fp32 weight (and bias), shift >= 0 (``norms.norm_shift``
    checks first that the norm is an ``RMSNorm`` or a ``LayerNorm``)."""
    return (
        _EXT.enabled
        and weight is not None
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype is torch.float32
        and (bias is None or bias.dtype is torch.float32)
        and x.is_cpu
        and x.dim() == 3
        and shift >= 0
        and extension() is not None
    )


def norm_shift_kernel(
    x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, shift: int, axial: int,
    layer: bool,
) -> Tensor:  # fmt: skip
    """``norms.norm_shift`` in one pass each way (check ``norm_shift_applies`` first): a
    LayerNorm's (``layer``, mean removed) or an RMSNorm's, in the dtype the next matmul
    reads (bf16 under CPU bf16 autocast, else x's)."""
    split = x.shape[-1] // 2  # token_shift's two groups
    return _NormShift.apply(
        x.contiguous(), weight, bias, eps, shift, split, _out_dtype(x), axial, layer
    )


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return extension().rotary_forward(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return extension().rotary_backward(grad, cos, sin), None, None


def rotary_applies(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> bool:
    """Whether ``rotary`` can take x (b, h, i, d) with these tables: enabled, built, CPU,
    fp32 or bf16 x with a unit last stride, fp32 (i, r) tables without grad, half layout."""
    return (
        _EXT.enabled
        and not interleaved
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_cpu
        and x.stride(-1) == 1
        and cos.dim() == 2
        and cos.dtype is torch.float32
        and sin.dtype is torch.float32
        and cos.shape[0] == x.shape[-2]
        and cos.shape == sin.shape
        and not (cos.requires_grad or sin.requires_grad)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and extension() is not None
    )


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``apply_rotary(x, cos, sin)`` in one pass each way (check ``rotary_applies`` first):
    x (b, h, i, d) -> the same shape, dtype and memory layout."""
    return _Rotary.apply(x, cos, sin)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int):
        rows, lse = extension().cross_entropy_forward(logits, labels, ignore_index)
        count = (labels != ignore_index).sum()
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.ignore_index = ignore_index
        return rows.sum() / count  # (0 / 0 = nan when every label is ignored, as F's)

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse, count = ctx.saved_tensors
        scale = (grad.to(lse.dtype) / count).expand(labels.shape[0]).contiguous()
        gx = extension().cross_entropy_backward(scale, logits, labels, lse, ctx.ignore_index)
        return gx, None, None


def cross_entropy_applies(logits: Tensor, labels: Tensor) -> bool:
    """Whether ``cross_entropy_kernel`` takes these (N, V) logits: enabled and built, CPU,
    fp32 or bf16 logits, int64 labels."""
    return (
        _EXT.enabled
        and logits.dim() == 2
        and logits.dtype in (torch.float32, torch.bfloat16)
        and logits.is_cpu
        and labels.dtype is torch.int64
        and extension() is not None
    )


def cross_entropy_kernel(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``losses.cross_entropy`` (check ``cross_entropy_applies`` first): one pass forward
    (log-sum-exp per row, fp32) and one backward that writes softmax minus one-hot straight
    in the logits' dtype, with no fp32 copy of bf16 logits and no stored log-softmax."""
    return _CrossEntropy.apply(logits.contiguous(), labels.contiguous(), ignore_index)


class _L2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps: float, out_dtype):
        y, inv = extension().l2norm_forward(x, eps, out_dtype)
        ctx.save_for_backward(x, inv)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, inv = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        if (grad.dtype is torch.float64) != (x.dtype is torch.float64):
            grad = grad.to(x.dtype)
        return extension().l2norm_backward(grad, x, inv), None, None


def l2norm_applies(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``l2norm_kernel`` takes x (b, h, n, d) into ``dtype``: enabled and built, CPU,
    a unit last stride, fp32 or bf16 in and out, or fp64 both."""
    return (
        _EXT.enabled
        and x.dim() == 4
        and x.is_cpu
        and x.stride(-1) == 1
        and x.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and dtype in (torch.float32, torch.bfloat16, torch.float64)
        and (x.dtype is torch.float64) == (dtype is torch.float64)
        and extension() is not None
    )


def l2norm_kernel(x: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """``norms.l2_normalize(x.to(dtype), eps=eps)`` over the last dim (check
    ``l2norm_applies`` first): one pass forward (statistics in fp32, fp64 for fp64) and one
    backward, with no separate cast or norm tensors."""
    with torch.autocast("cpu", enabled=False):
        return _L2Norm.apply(x, eps, dtype)


class _LinearGelu(torch.autograd.Function):
    """gelu(x @ w.T + b) in bf16: the pre-activation by addmm, the GELU by table; backward:
    one pass for the GELU's and the bias's gradients, then the two products."""

    @staticmethod
    def forward(ctx, x, w, b):
        x2 = x.reshape(-1, x.shape[-1])
        pre = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()
        ctx.save_for_backward(x2, w, pre)
        ctx.has_bias, ctx.shape = b is not None, x.shape
        return extension().gelu_forward(pre).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, w, pre = ctx.saved_tensors
        grad = grad.reshape(pre.shape).to(torch.bfloat16).contiguous()
        dpre, db = extension().gelu_backward(grad, pre)
        dx = (dpre @ w).view(ctx.shape)
        dw = dpre.t() @ x2
        return dx, dw, (db.to(torch.bfloat16) if ctx.has_bias else None)


def linear_gelu_applies(x: Tensor, linear: nn.Module) -> bool:
    """Whether ``linear_gelu`` takes this call: enabled and built, CPU, a training step
    (grad enabled) computing in bf16 (bf16 x, or CPU bf16 autocast), an ``nn.Linear``."""
    return (
        _EXT.enabled
        and torch.is_grad_enabled()
        and x.is_cpu
        and x.dtype in (torch.float32, torch.bfloat16)
        and _out_dtype(x) is torch.bfloat16
        and isinstance(linear, nn.Linear)
        and extension() is not None
    )


def linear_gelu(x: Tensor, linear: nn.Linear) -> Tensor:
    """``F.gelu(linear(x))`` computed in bf16 (check ``linear_gelu_applies`` first): the
    values of the composite under bf16 autocast (its pre-activation rounded to bf16, then
    exact GELU rounded once), the GELU and its backward one pass each."""
    bf = torch.bfloat16
    b = linear.bias.to(bf) if linear.bias is not None else None
    with torch.autocast("cpu", enabled=False):
        return _LinearGelu.apply(x.to(bf), linear.weight.to(bf), b)


class _KMeansAssign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, means, real, eps: float, stats: bool):
        best, bucket, inv, sums, counts = extension().kmeans_assign(x, means, real, eps, stats)
        ctx.save_for_backward(x, means, best, bucket, inv)
        ctx.mark_non_differentiable(bucket, sums, counts)
        return best, bucket, sums, counts

    @staticmethod
    def backward(ctx, g_best, *_):
        x, means, best, bucket, inv = ctx.saved_tensors
        g = g_best.float().contiguous()
        return (
            extension().kmeans_assign_backward(g, x, means, best, bucket, inv),
            None,
            None,
            None,
            None,
        )


def kmeans_applies(x: Tensor, means: Tensor) -> bool:
    """Whether ``kmeans_assign`` takes x (b, h, n, d): enabled and built, CPU, fp32 or bf16
    with a unit last stride, fp32 (h, k, d) centroids."""
    return (
        _EXT.enabled
        and x.dim() == 4
        and x.is_cpu
        and x.stride(-1) == 1
        and x.dtype in (torch.float32, torch.bfloat16)
        and means.dtype is torch.float32
        and extension() is not None
    )


def kmeans_assign(
    x: Tensor,  # (b, h, n, d)
    means: Tensor,  # (h, k, d) fp32 unit vectors
    mask: Tensor | None = None,  # (b, n) bool, True = counted in the statistics
    stats: bool = True,
    eps: float = 1e-12,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(best (b, h, n) fp32 with gradient, bucket (b, h, n) int64, sums (h, k, d), counts
    (h, k)) for ``xn = l2_normalize(x.float())``: bucket the first nearest centroid,
    best = xn . means[bucket], and the per-cluster sums of xn and counts over the rows
    ``mask`` marks (None without ``stats``). Check ``kmeans_applies`` first."""
    real = mask.to(torch.bool).contiguous() if mask is not None else None
    with torch.autocast("cpu", enabled=False):
        best, bucket, sums, counts = _KMeansAssign.apply(x, means.contiguous(), real, eps, stats)
    return best, bucket, (sums if stats else None), (counts if stats else None)
