"""The attention core: one contract, two implementations.

``attend`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where
the device has them); ``reference_attend`` is plain einsum + softmax and serves as the test
oracle. ``attention_backend("reference")`` switches every ``attend`` call in its scope to the
reference path, so whole models can be compared against it.

Notation: b batch, h query heads, g key/value heads (h % g == 0, grouped-query attention),
i queries, j keys, d head dim.
Mask: bool, True = may attend, broadcastable to (b, h, i, j). A query that may attend no key
gets a zero output, never NaN. Bias (optional): float, broadcastable to (b, h, i, j), added to
the scaled logits (a relative position bias such as T5's, ``nn.relative_bias``).

``block_attend`` is the same contract for many small blocks (the windows of local and
sorted-window attention): on CPU it runs plain batched matmuls and a fused softmax with a
hand-written backward, which at those shapes beat SDPA's CPU flash kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from retrolm.nn.masks import causal_mask, combine

_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("retrolm_attention", default="sdpa")
BACKENDS = ("sdpa", "reference")


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run every ``attend`` call inside the block with the given backend."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def current_backend() -> str:
    """The backend ``attend`` uses here ("sdpa" or "reference"); blocks built on ``attend``
    (e.g. sorted-window attention) use it to pick their own dense oracle path."""
    return _BACKEND.get()


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    h, g = q.shape[1], k.shape[1]
    if h == g:
        return k, v
    if h % g != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({g})")
    return k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)


def _full_mask(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> Tensor | None:
    if causal and q.shape[-2] > 1:  # one query aligned with the last key sees every key
        mask = combine(mask, causal_mask(q.shape[-2], k.shape[-2], device=q.device))
    return mask


# signature twin (deliberate): reference_attend takes attend's arguments, so a test swaps one
# for the other
def reference_attend(
    q: Tensor,  # (b, h, i, d)
    k: Tensor,  # (b, g, j, d)
    v: Tensor,  # (b, g, j, dv)
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:  # (b, h, i, dv)
    """Plain softmax attention; the oracle for ``attend``. ``causal`` aligns the queries
    with the last ``i`` keys (as a KV cache does)."""
    k, v = _expand_kv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        sim = sim + bias
    mask = _full_mask(q, k, mask, causal)
    if mask is not None:
        sim = sim.masked_fill(~mask, float("-inf"))
    # softmax in fp32 for half types, in the input precision otherwise (float64 oracle)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    attn = sim.to(acc).softmax(dim=-1).to(q.dtype)
    attn = torch.nan_to_num(attn, nan=0.0)  # rows with no key -> zeros
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


# On a CPU, in half precision and with autograd, SDPA's flash kernel took 2-2.5x longer
# for its backward than a plain matmul-softmax-matmul over the stored (i, j) scores, for up
# to this many keys (bf16, one thread: 32 blocks x 4 heads x 32 queries x 64 keys, forward
# + backward 12.9 vs 7.2 ms; 8 x 4 x 128 causal 14.2 vs 8.8) ...
MATH_MAX_KEYS = 128
# ... and for more keys while the scores stay small (2026-12-08, bf16 causal, one thread,
# forward + backward, quiet: 1 x 4 x 512^2 scores 5.2 vs 9.3 ms; at load 8: 4 x 4 x 256^2
# 19.8 vs 38.0, 1 x 4 x 384^2 10.7 vs 19.9). At 4 x 4 x 512^2 (4.2M scores) the two were
# even, at 8 x 8 x 512^2 the plain path took 2x longer: it stores 6 bytes per score, SDPA
# skips masked blocks and stores none. So: up to this many scores (b h i j), 12 MB stored.
MATH_MAX_SCORES = 1 << 21


def _scores(q: Tensor, k: Tensor) -> int:
    """How many scores (b h i j) attention of ``q`` over ``k`` computes."""
    return q.numel() // max(q.shape[-1], 1) * k.shape[-2]


def _use_math(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (
        q.dtype in (torch.bfloat16, torch.float16)  # (the cheapest test first)
        and q.device.type == "cpu"
        and (k.shape[-2] <= MATH_MAX_KEYS or _scores(q, k) <= MATH_MAX_SCORES)
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    )


def _math_attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None
) -> Tensor:
    """softmax(q k^T * scale, masked) v with the softmax in fp32; every row of ``mask``
    must allow a key (``attend`` ensures it). k, v already expanded to q's heads."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sim = torch.matmul(q, k.transpose(-1, -2)) * scale  # (b, h, i, j)
    if mask is not None:
        sim = sim.masked_fill(~mask, float("-inf"))
    attn = sim.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return torch.matmul(attn, v)


def attend(
    q: Tensor,  # (b, h, i, d)
    k: Tensor,  # (b, g, j, d)
    v: Tensor,  # (b, g, j, dv)
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    rows_have_keys: bool = False,
    bias: Tensor | None = None,
) -> Tensor:  # (b, h, i, dv)
    """Softmax attention through SDPA, same contract as ``reference_attend``.

    ``rows_have_keys=True``: the caller knows every query row of ``mask`` allows a key (e.g.
    memory keys every query sees), so the check for empty rows (two kernels and a read of
    the result, on every decoding step) is skipped; the result is the same.
    ``bias``: added to the scaled logits (SDPA takes it as a float mask)."""
    if _BACKEND.get() == "reference":
        return reference_attend(
            q, k, v, mask, causal=causal, dropout_p=dropout_p, scale=scale, bias=bias
        )
    if bias is not None:
        return _bias_attend(q, k, v, mask, causal, dropout_p, scale, bias)
    k, v = _expand_kv(q, k, v)
    i, j = q.shape[-2], k.shape[-2]
    causal = causal and i > 1  # a single query (a decoding step) sees every cached key
    plain = _use_math(q, k, v)
    if mask is None:
        # SDPA's is_causal aligns queries to the first keys; only use it when i == j
        if causal and (i != j or plain):
            mask = causal_mask(i, j, device=q.device)
        elif plain:
            return _math_attend(q, k, v, None, dropout_p, scale)
        else:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=causal and i > 1, scale=scale
            )
    else:
        mask = _full_mask(q, k, mask, causal)
    all_rows = rows_have_keys
    if not all_rows:
        # a row with no allowed key would give NaN in SDPA: let it attend everything, then
        # zero it
        has_key = mask.any(dim=-1, keepdim=True)  # (…, i, 1)
        all_rows = bool(has_key.all())
        if not all_rows:
            mask = mask | ~has_key
    if plain:
        out = _math_attend(q, k, v, mask, dropout_p, scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    if not all_rows:
        out = out * has_key.to(out.dtype)
    return out


def _bias_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float | None,
    bias: Tensor,
) -> Tensor:
    """``attend`` with an additive bias: SDPA with a float mask (bias, -inf where masked),
    or on a CPU in half precision the plain path (``_plain_bias_attend``)."""
    k, v = _expand_kv(q, k, v)
    mask = _full_mask(q, k, mask, causal and q.shape[-2] > 1)
    has_key = None
    if mask is not None:
        has_key = mask.any(dim=-1, keepdim=True)  # (…, i, 1)
        mask = mask | ~has_key  # an empty row attends everything, then is zeroed
        bias = torch.where(mask, bias.to(q.dtype), float("-inf"))  # broadcasts both
    if _plain_bias(q, k, v):
        out = _plain_bias_attend(q, k, v, bias.to(q.dtype), dropout_p, scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale
        )
    return out if has_key is None else out * has_key.to(out.dtype)


# With a float mask SDPA's CPU flash kernel can skip no block. In bf16, one thread, 2 x 2,048
# queries x 1,024 keys x 64 with a causal T5 bias (Memorizing's prompt), no autograd: SDPA
# 12.9-14.0 ms, scores + bias, a bf16 softmax and the value product 4.9-5.0 ms (2026-12-08,
# load ~2). Without autograd the scores are only transient: up to this many (b h i j).
PLAIN_BIAS_MAX_SCORES = 1 << 24


def _plain_bias(q: Tensor, k: Tensor, v: Tensor) -> bool:
    if q.dtype not in (torch.bfloat16, torch.float16) or q.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _use_math(q, k, v)  # stored for the backward: the same limit as without bias
    return _scores(q, k) <= PLAIN_BIAS_MAX_SCORES


def _plain_bias_attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout_p: float, scale: float | None
) -> Tensor:
    """softmax(q k^T * scale + bias) v, the scores in q's dtype (the softmax accumulates in
    fp32 and rounds once, as SDPA's half-precision kernels do); every row of ``bias`` must
    allow a key (``_bias_attend`` ensures it). k, v already expanded to q's heads."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sim = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)  # (b, h, i, j)
    attn = sim.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return torch.matmul(attn, v)


class _BlockAttention(torch.autograd.Function):
    """Softmax attention over small (i, j) blocks, storing the probabilities for backward.

    At (128 blocks, 2 heads, 32 queries, 160 keys, d 64) on one CPU thread, forward + backward
    took 16 ms in bf16 against 41 ms for SDPA (CPU flash) over the same windows in blocks of
    128 queries x 256 keys: SDPA's CPU backward recomputes the scores and walks them in
    scalar-heavy tiles, while here the stored probabilities (i * j per block, small by
    construction) make the backward four matmuls and one fused softmax backward. Matmuls run
    in the input dtype (bf16 under autocast: scores rounded to bf16, as a plain einsum under
    autocast would), the softmax in fp32 inside the fused kernel.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        # q (..., i, d), k/v (..., j, d), mask bool broadcastable to (..., i, j); the leading
        # dims are flattened for bmm, which reads a transposed operand without a copy
        i, j = q.shape[-2], k.shape[-2]
        q3, k3, v3 = (
            q.reshape(-1, i, q.shape[-1]),
            k.reshape(-1, j, k.shape[-1]),
            v.reshape(-1, j, v.shape[-1]),
        )
        s = torch.bmm(q3, k3.transpose(1, 2))  # (B, i, j)
        s.view(*q.shape[:-1], j).masked_fill_(mask.logical_not(), float("-inf"))
        p = torch.softmax(s.mul_(scale), dim=-1)  # fp32 inside the kernel
        p = p.nan_to_num_(nan=0.0)  # a row with no key: zeros
        out = torch.bmm(p, v3)
        ctx.save_for_backward(q3, k3, v3, p)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape, v.shape)
        return out.view(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p = ctx.saved_tensors
        qs, ks, vs = ctx.shapes
        grad = grad.to(v.dtype).reshape(-1, *grad.shape[-2:])
        dv = torch.bmm(p.transpose(1, 2), grad)
        dp = torch.bmm(grad, v.transpose(1, 2))
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - sum(p * dp))
        dq = torch.bmm(ds, k).mul_(ctx.scale)
        dk = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
        return dq.view(qs), dk.view(ks), dv.view(vs), None, None


def block_attend(
    q: Tensor,  # (..., i, d), e.g. (b, h, blocks, i, d); i and j small (a window's block)
    k: Tensor,  # (..., j, d), the same leading dims
    v: Tensor,  # (..., j, dv)
    mask: Tensor,  # bool, broadcastable to (..., i, j)
    *,
    dropout_p: float = 0.0,
) -> Tensor:  # (..., i, dv)
    """``attend(q, k, v, mask)`` for many small blocks: stores the (b, h, i, j) probabilities
    for backward, so use it only where i * j per block is small. Falls back to ``attend``
    off CPU, with dropout, and under the reference backend."""
    if _BACKEND.get() == "reference" or dropout_p > 0 or q.device.type != "cpu":
        lead, (i, j) = q.shape[:-2], (q.shape[-2], k.shape[-2])
        flat = [t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v)]  # (B, 1, i|j, d)
        m = mask.expand(*lead, i, j).reshape(-1, 1, i, j)
        return attend(*flat, m, dropout_p=dropout_p).view(*lead, i, v.shape[-1])
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)
    with torch.autocast("cpu", enabled=False):  # the dtype is chosen above, once
        return _BlockAttention.apply(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))
