"""Fused one-token decoding blocks (CPU, fp32): a C++ extension built on first use.

A cached decoding step is a few rows times every weight of the model. Through ATen, one
pre-norm block (norm, projections, rotary, cache write, attention, residual) is 15-40
kernel calls, and at one row their fixed costs exceed the arithmetic: a bare step of the
hierarchical benchmark model written as the same ATen calls from C++ was only 1.03-1.16x
faster than from Python (``benchmarks.kernels.hier_step_floor --cpp``): the kernels' own fixed
costs are the step, not Python. ``csrc/decode_blocks.cpp`` writes each block as one call
(RETRO's cached generation: 1.56x faster per call, ``benchmarks.compare.bench_generate``):

- ``self_attention_block``: x + W_o attn(rotary(W_q n), cache + rotary(W_k n), W_v n),
  n = rmsnorm(x), writing this position's key/value into the cache buffer;
- ``cross_attention_block``: x + W_o attn(rotary(W_q n), fixed keys/values [, mask]);
- ``feed_forward_block``: x + W_2 gelu(W_1 n + b_1) + b_2 (exact GELU);
- ``dextra_step``: DeLighT's DExTra with its mixers and shuffles folded into dense weights
  (``models.delight.dextra_decode``, which calls it with the folded weights);
- ``projected_attention_block``: x + W_o attn(q, cache + k, v) + b_o with q, k, v (with biases)
  projected from another input than x (DeLighT: DExTra's output), cache write as above;
- ``infini_attention_block``: Infini-attention's step (``models.infini.fused``): the
  self-attention block with, per head, the gated read of a compressive memory mixed in before
  W_o, and the unrotated key and write strength kept for the segment's memory write.

``feed_forward_block`` also computes GLUs (``glu=True``: GEGLU, SwiGLU).

They compute what the modules compute, in fp32 with fp32 accumulation, summing in another
order: results agree to rounding (tests/nn/test_fused_decode.py), not bit for bit. With
``set_weight_dtype(torch.bfloat16)`` they read bf16 copies of the weights (half the bytes
per token; activations, norms and attention stay fp32). Models
use them only where they apply (``usable``: CPU, fp32, no autograd, the extension built);
everything else takes the ATen path, which stays the reference.

The extension compiles once per machine (``nn.fused.extension``: a C++ compiler and ninja, which
the ``fused`` extra installs; ~30 s, kept under ``RETROLM_CACHE`` or ``~/.cache/retrolm``).
If that fails the reason is logged once and decoding uses the ATen path.
``RETROLM_FUSED_DECODE=0`` turns the fused path off.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from retrolm.nn.fused.extension import STALE_LOCK_S, LazyExtension, clear_stale_lock
from retrolm.nn.kv_cache import KVCache

__all__ = [
    "NONE",
    "STALE_LOCK_S",
    "build_directory",
    "clear_stale_lock",
    "cross_attention",
    "enabled",
    "extension",
    "feed_forward",
    "self_attention",
    "set_enabled",
    "set_weight_dtype",
    "usable",
    "weight",
]

NONE = torch.empty(0)  # what the blocks take for "none": no bias, norm, mask, shift state
_ALL_KEYS = torch.empty(0, dtype=torch.bool)  # cross-attention without a mask
_ACTIVATIONS = {"gelu": 0, "silu": 1}

_WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_weight_dtype = _WEIGHT_DTYPES.get(os.environ.get("RETROLM_FUSED_WEIGHTS", "fp32"), torch.float32)
_COPY = "_retrolm_fused_bf16"  # attribute of a parameter: (its version, data pointer, copy)


_EXT = LazyExtension(
    "retrolm_decode_blocks", "decode_blocks.cpp", "fused decoding blocks", "RETROLM_FUSED_DECODE"
)


# set_enabled / enabled / extension: the same three functions in train.py and decode.py
# (deliberate twins: each module's own switch over its LazyExtension)
def set_enabled(on: bool) -> bool:
    """Turn the fused path on or off for this process; returns the previous setting."""
    return _EXT.set_enabled(on)


def enabled() -> bool:
    return _EXT.enabled


def set_weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused blocks read weights in: ``torch.float32`` (the default: the
    modules' values to rounding) or ``torch.bfloat16`` (half the bytes streamed per token;
    the weights rounded to bf16, everything else still fp32). Also ``RETROLM_FUSED_WEIGHTS``
    = ``fp32`` | ``bf16``. Returns the previous setting."""
    global _weight_dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused decoding weights are float32 or bfloat16, got {dtype}")
    before, _weight_dtype = _weight_dtype, dtype
    return before


def weight(p: Tensor) -> Tensor:
    """A parameter as the fused blocks read it: itself, or its kept bf16 copy (rebuilt after
    an in-place update: the version counter or the storage changed)."""
    if _weight_dtype is torch.float32:
        return p
    hit = getattr(p, _COPY, None)
    if hit is not None and hit[0] == p._version and hit[1] == p.data_ptr():
        return hit[2]
    with torch.no_grad():
        copy = p.detach().to(torch.bfloat16).contiguous()
    setattr(p, _COPY, (p._version, p.data_ptr(), copy))  # freed with the parameter
    return copy


def extension() -> ModuleType | None:
    """The compiled blocks, building them on the first call; None if they cannot be built."""
    return _EXT.get()


def build_directory() -> Path:
    """Where the blocks are built (``LazyExtension.build_directory``)."""
    return _EXT.build_directory()


def usable(x: Tensor) -> bool:
    """Whether a decoding step on ``x`` can take the fused blocks: enabled, no autograd,
    no autocast, fp32 on CPU, and the extension built."""
    return (
        _EXT.enabled
        and x.dtype is torch.float32
        and x.is_cpu
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and extension() is not None
    )


# --- the blocks over modules: weights through ``weight``, "none" as ``NONE`` ----------------
def _or_none(t: Tensor | None) -> Tensor:
    return NONE if t is None else t


def _norm_args(norm: nn.Module | None) -> tuple[Tensor, Tensor, float]:
    """(weight, bias, eps) of an RMSNorm (bias ``NONE``), a LayerNorm, or None (no norm)."""
    if norm is None:
        return NONE, NONE, 0.0
    bias = getattr(norm, "bias", None)
    if isinstance(norm, nn.LayerNorm) and bias is None:
        raise ValueError("the fused blocks take a LayerNorm with a bias (or an RMSNorm)")
    return norm.weight, _or_none(bias), norm.eps


def self_attention(
    x: Tensor,  # (b, d)
    norm: nn.Module,
    attn: nn.Module,  # MultiHeadAttention: q/k/v/out projections without biases
    rotary: tuple[Tensor, Tensor],  # (r,) or (1, r) each: this position's row
    cache: KVCache,
    shift: Tensor | None = None,  # token-shift state (b, a, d)
    shift_from: int = 0,
) -> tuple[Tensor, Tensor]:
    """x + attn(norm(x)) for one new position per row, its key/value written into
    ``cache``; returns (out (b, d), the next shift state, ``NONE`` without one)."""
    norm_w, norm_b, eps = _norm_args(norm)
    if norm_b.numel():
        raise ValueError("the fused self-attention block normalises with RMSNorm")
    k_buf, v_buf, first, end = cache.claim(1)
    return extension().self_attention_block(
        x, norm_w, eps, weight(attn.q_proj.weight), weight(attn.k_proj.weight),
        weight(attn.v_proj.weight), weight(attn.out_proj.weight), rotary[0], rotary[1], k_buf,
        v_buf, first, end, _or_none(shift), shift_from,
    )  # fmt: skip


def cross_attention(
    x: Tensor,  # (b, d)
    norm: nn.Module,  # RMSNorm
    attn: nn.Module,  # MultiHeadAttention: its q and out projections
    rotary: tuple[Tensor, Tensor],  # the query's row
    k: Tensor,  # (b, h, s, dh) rotated keys, rows contiguous
    v: Tensor,
    allow: Tensor | None = None,  # (b, s) bool, None = every key
) -> Tensor:
    """x + attn(norm(x), k, v) for one position per row (a row with no key adds nothing)."""
    norm_w, _, eps = _norm_args(norm)
    return extension().cross_attention_block(
        x, norm_w, eps, weight(attn.q_proj.weight), weight(attn.out_proj.weight), rotary[0],
        rotary[1], k, v, _ALL_KEYS if allow is None else allow,
    )  # fmt: skip


def feed_forward(
    x: Tensor,  # (b, d)
    norm: nn.Module | None,  # RMSNorm, LayerNorm or None
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    act: str = "gelu",  # or "silu"
    residual: bool = True,
    shift: Tensor | None = None,  # token-shift state (b, a, d)
    shift_from: int = 0,
    glu: bool = False,
) -> tuple[Tensor, Tensor]:
    """[x +] w2 act(w1 norm(x) + b1) + b2 for one position per row; returns (out, the next
    shift state, ``NONE`` without one). ``glu``: w1's rows are [u; g] and the hidden layer
    u * act(g), as ``nn.FeedForward(glu=True)``."""
    norm_w, norm_b, eps = _norm_args(norm)
    return extension().feed_forward_block(
        x, norm_w, norm_b, eps, weight(w1), _or_none(b1), weight(w2), _or_none(b2),
        _ACTIVATIONS[act], residual, _or_none(shift), shift_from, glu,
    )  # fmt: skip
