"""Fused window attention (CPU, bf16): exact local attention and sorted-window attention
in one C++ pass over query blocks, on oneDNN's bf16 micro-kernels.

The ATen path of ``local_attention`` / ``sorted_window`` cuts the sequence into blocks of 32
queries, materialises each block's 160 candidate keys and values (five times the keys), a
(blocks, 32, 160) mask and score tensor, and runs a dozen kernels over them each way; at
4,096 positions those tensors no longer fit in cache and the small batched products run at
a third of the machine's matmul rate. ``csrc/window_attention.cpp`` instead packs keys and
values once, then per block of queries computes its scores, masked softmax and output with
``at::native::cpublas::brgemm`` (bf16 x bf16 -> fp32) on buffers that stay in cache,
flash-style, and keeps each block's probabilities (32 x 160 at window 128, causal) for the
backward, which then needs no scores, exponentials or mask again. The
sorted order of the routed heads is an index map (``order``) the kernel reads and writes
through, so the sort costs no gathered copies of q, k, v or of the result.

Same definition as ``local_attention.local_attend`` and ``sorted_window`` (query place i
attends key place j when ``0 <= i - j < window``, causal, or ``|i - j| < window``; in the
same group; shared q/k: itself only when alone; no key: zeros). Scores and softmax are fp32
(the ATen path rounds its scores to bf16), probabilities bf16 for the products.

Used when all hold: CPU, bf16 (the inputs, or CPU autocast to bf16), no dropout, an even
head dim, no key padding mask or memory key/values (those keep the ATen path), the
extension built (``nn.fused.extension``) and the CPU able to run the micro-kernels (AVX-512 BF16
or AMX; checked once). ``RETROLM_FUSED_WINDOW=0`` turns it off. Tests:
tests/nn/test_fused_window.py (against the float64 definition and the ATen path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrolm.nn.decode_linear import compute_dtype
from retrolm.nn.fused.extension import LazyExtension

__all__ = ["applies", "enabled", "set_enabled", "unavailable_reason", "window_attend"]

BLOCK = 32  # queries per block (and keys per key block)

_EXT = LazyExtension(
    "retrolm_window_attention",
    "window_attention.cpp",
    "fused window attention",
    "RETROLM_FUSED_WINDOW",
)
_AVAILABLE: bool | None = None  # whether the CPU runs the bf16 micro-kernels


def set_enabled(on: bool) -> bool:
    """Turn the fused kernel on or off for this process; returns the previous setting."""
    return _EXT.set_enabled(on)


def enabled() -> bool:
    return _EXT.enabled


def _ext():
    global _AVAILABLE
    mod = _EXT.get()
    if mod is None:
        return None
    if _AVAILABLE is None:
        _AVAILABLE = bool(mod.available())
    return mod if _AVAILABLE else None


def unavailable_reason() -> str | None:
    """None when the kernel runs here; else why not: the build failed (the error), or this
    CPU lacks the instructions of oneDNN's bf16 micro-kernels (AVX-512 BF16 or AMX)."""
    if _EXT.get() is None:
        return f"the extension could not be built ({_EXT.error})"
    if _ext() is None:
        return "this CPU lacks AVX-512 BF16 / AMX (oneDNN's bf16 micro-kernels)"
    return None


def applies(q: Tensor, dropout_p: float = 0.0) -> bool:
    """Whether ``window_attend`` will run for these queries (and the caller need not build
    its ATen inputs)."""
    from retrolm.nn.attention import current_backend

    if not _EXT.enabled or dropout_p > 0 or q.device.type != "cpu" or q.shape[-1] % 2:
        return False
    if compute_dtype(q, q) is not torch.bfloat16 or current_backend() == "reference":
        return False
    return _ext() is not None


_WORKSPACE: list[Tensor] = []  # the kernels' scratch, kept between calls up to WORKSPACE_KEEP
WORKSPACE_KEEP = 64 << 20  # elements (128 MB of bf16)


def _workspace(ext, q: Tensor, window: int, causal: bool) -> Tensor:
    """Scratch for one call (packed operands, the backward's transposed probabilities and
    score gradients). Kept
    between calls: a fresh multi-MB buffer per call costs its page faults (a fifth of the
    kernel's time at 4,096 positions). Calls hold the GIL, so one buffer serves them all."""
    b, h, n, d = q.shape
    numel = ext.workspace_numel(b * h, n, d, window, causal, BLOCK)
    if _WORKSPACE and _WORKSPACE[0].numel() >= numel:
        return _WORKSPACE[0]
    ws = torch.empty(numel, dtype=torch.bfloat16)
    if numel <= WORKSPACE_KEEP:
        _WORKSPACE[:] = [ws]
    return ws


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, groups, order, window, causal, exclude_self, keep_probs, unit_eps):
        ext = _EXT.get()
        ws = _workspace(ext, q, window, causal)
        out, probs = ext.window_forward(
            q, k, v, groups, order, window, causal, exclude_self, BLOCK, ws, keep_probs, unit_eps
        )
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.rest = (order, window, causal, unit_eps)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, probs = ctx.saved_tensors
        order, window, causal, unit_eps = ctx.rest
        if grad.dtype is not torch.bfloat16 or grad.stride(-1) != 1:
            grad = grad.to(torch.bfloat16).contiguous()
        ext = _EXT.get()
        ws = _workspace(ext, q, window, causal)
        dq, dk, dv = ext.window_backward(
            grad, q, k, v, out, probs, order, window, causal, BLOCK, ws, unit_eps
        )
        return dq, dk, dv, None, None, None, None, None, None, None


# signature twin of local_attention.local_attend (deliberate): the kernel serves it
def window_attend(
    q: Tensor,  # (b, h, n, d)
    k: Tensor,  # (b, h, n, d)
    v: Tensor,  # (b, h, n, d)
    window: int,
    *,
    causal: bool = True,
    groups: Tensor | None = None,  # (b, h, n) int64 group of each place, -1 = attends nothing
    order: Tensor | None = None,  # (b, h, n) int64: the row of q, k, v holding each place
    exclude_self: bool = False,
    unit_keys: bool = False,
    eps: float = 1e-12,
) -> Tensor:  # (b, h, n, d) bf16, rows as q's
    """The fused kernel; call only where ``applies(q)``. Places are the rows of q, k, v,
    or, with ``order``, ``order[..., i]`` is the row of place i (e.g. a sort by group).
    ``unit_keys``: the keys are ``norms.l2_normalize(k, eps=eps, fused=True)`` (shared q/k
    attention passes k = q), normalised inside the kernel each way."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v need one shape, got {q.shape}, {k.shape}, {v.shape}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if groups is not None:
        groups = groups.to(torch.int64).contiguous()
    if order is not None:
        order = order.to(torch.int64).contiguous()
    # the probabilities are kept for the backward only when there will be one
    keep = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    unit_eps = float(eps) if unit_keys else -1.0
    with torch.autocast("cpu", enabled=False):
        return _WindowAttention.apply(
            q, k, v, groups, order, window, causal, exclude_self, keep, unit_eps
        )
