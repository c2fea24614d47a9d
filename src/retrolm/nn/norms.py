"""Normalisation layers, the one factory that picks them by name, ``l2_normalize`` and
``norm_shift`` (a norm followed by a token shift); the C++ kernels of the last two (CPU) are
in ``nn.fused.train``, the ATen path here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrolm.nn.fused import train as fused_train
from retrolm.nn.token_shift import token_shift

NORMS = ("rms", "layer", "scale")


def l2_normalize(
    x: Tensor,
    dim: int = -1,
    eps: float = 1e-12,
    *,
    dtype: torch.dtype | None = None,
    fused: bool = False,
) -> Tensor:
    """``F.normalize(x.to(dtype), dim=dim, eps=eps)`` (dtype: x's by default), the same
    values, without its Python wrappers around the norm (~40% of its time for a decoding
    step's few rows).

    ``fused``: where ``nn.fused.train.l2norm_applies`` (CPU, (b, h, n, d) x of any layout with
    a unit last stride, dim -1), one kernel pass each way, with no separate cast or norm
    tensors: the same values to rounding, not bit for bit, so callers choose it (the routing
    keys do; the k-means keeps this ATen path)."""
    if fused and dim in (-1, x.dim() - 1) and fused_train.l2norm_applies(x, dtype or x.dtype):
        return fused_train.l2norm_kernel(x, dtype or x.dtype, eps)
    if dtype is not None:
        x = x.to(dtype)
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(eps)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves only its input and the per-row 1/rms for backward (autograd's
    composite version keeps three full-size fp32 intermediates per call).

    On CPU: ATen's fused forward kernel (one pass, and it returns 1/rms; CUDA keeps the
    composite forward, which this machine cannot test). Backward, with
    xhat = x / rms and p = g * xhat: grad_w = sum over rows of p, and grad_x =
    (g * w - xhat * mean(p * w)) / rms, where mean(p * w) is the matrix-vector product p @ w:
    three full-size buffers instead of seven (PyTorch has no CPU kernel for the fused
    backward). Same values to rounding (tests/nn: float64 against autograd);
    ``python -m benchmarks.kernels.bench_norms``: 1.1-2.2x the plain autograd formula per call."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if x.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64):
            # one kernel; statistics in fp32 (fp64 for fp64) for half inputs too, one
            # rounding of x / rms * w to x's dtype
            out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        else:  # statistics in fp32 (fp64 for fp64)
            xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
            out = (xf * rstd).to(x.dtype) * weight.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc, d = rstd.dtype, x.shape[-1]
        xhat = x.to(acc) * rstd  # (..., d)
        g, w = grad.to(acc), weight.to(acc)
        p = g * xhat
        gw = p.reshape(-1, d).sum(0).to(weight.dtype)
        c = (p @ w).unsqueeze(-1).mul_(rstd).div_(d)  # (..., 1): mean(g w xhat) / rms
        gx = (g * w).mul_(rstd).addcmul_(xhat, c, value=-1)
        return gx.to(x.dtype), gw, None


def _rms_norm_inference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """_RMSNormFn.forward without autograd: statistics in fp32 (fp64 for fp64 inputs)."""
    if x.dtype in (torch.float32, torch.float64):
        if weight.dtype is not x.dtype:  # (a no-op .to still costs a dispatch)
            weight = weight.to(x.dtype)
        return F.rms_norm(x, weight.shape, weight, eps)
    if x.is_cpu and weight.dtype is torch.float32:  # the training path's kernel: same values
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)[0]
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019); statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            # nothing to save for backward: the single fused kernel (decoding calls this
            # ~15 times per token, where the autograd Function's overhead dominated)
            return _rms_norm_inference(x, weight, self.eps)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return _RMSNormFn.apply(x, weight, self.eps)
        return _RMSNormFn.apply(x, weight, self.eps)


class ScaleNorm(nn.Module):
    """g * x / ||x|| with one learned scalar g initialised to sqrt(dim) (Nguyen & Salazar 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: Tensor) -> Tensor:
        n = x.float().norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return (x.float() / n).to(x.dtype) * self.g.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (safe under bf16 autocast), optional bias."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(dim, eps=eps, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._parameters["weight"], self._parameters["bias"]  # (no __getattr__: ~0.8 us)
        if x.dtype is torch.float32 and w.dtype is torch.float32:
            # already fp32: skip four no-op casts (each a dispatched call; decoding runs this
            # ~9 times per token)
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        if (
            x.is_cpu
            and w.dtype is torch.float32
            and x.dtype in (torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            # without autograd, CPU's mixed-dtype kernel: fp32 statistics and weights, the
            # result in x's dtype, the same values as the casts below in one call
            # (native_layer_norm: autocast would upcast layer_norm's input). Not for
            # training: its weight gradient from half-precision grads is coarser.
            return torch.native_layer_norm(x, self.normalized_shape, w, b, self.eps)[0]
        b = b.float() if b is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w.float(), b, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """``rms`` | ``layer`` | ``scale``."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return LayerNorm(dim)
    if kind == "scale":
        return ScaleNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


def norm_shift(x: Tensor, norm: nn.Module, shift: int, axial: int = 1) -> Tensor:
    """``token_shift(norm(x), (0, shift))`` for x (b, n, d): channels ``[d // 2, d)`` of
    position t come from the normed position t - shift (zeros before the start). x float32
    or bfloat16 (a compressed stream under autocast). On CPU an ``RMSNorm`` or a
    ``LayerNorm`` (with or without bias) runs as one kernel each way
    (``nn.fused.train.norm_shift_kernel``): the norm, the shift's split/pad/cat and
    autocast's cast in one pass. Under CPU bf16 autocast its result is bf16 (what the next
    matmul reads; the same values as casting the composite's fp32 result), else x's dtype.

    ``axial`` a > 1 (n a multiple of a): the result comes as ``rearrange(out,
    "b (q a) d -> (b a) q d")``, each of the a interleaved sub-sequences contiguous, written
    in that order by the kernel instead of copied there afterwards."""
    if axial < 1 or x.shape[-2] % axial:
        raise ValueError(f"axial must be >= 1 and divide the length {x.shape[-2]}, got {axial}")
    w = getattr(norm, "weight", None)  # (other norms, e.g. ScaleNorm: the module's path)
    layer = type(norm) is LayerNorm
    bias = norm.bias if layer else None
    if type(norm) in (RMSNorm, LayerNorm) and fused_train.norm_shift_applies(x, w, bias, shift):
        return fused_train.norm_shift_kernel(x, w, bias, norm.eps, shift, axial, layer)
    out = norm(x)
    out = out if shift == 0 else token_shift(out, (0, shift))
    return out if axial == 1 else rearrange(out, "b (q a) d -> (b a) q d", a=axial)
