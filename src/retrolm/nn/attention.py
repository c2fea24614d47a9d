"""The attention core: one contract, two implementations.

``attend`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where
the device has them); ``reference_attend`` is plain einsum + softmax and serves as the test
oracle. ``attention_backend("reference")`` switches every ``attend`` call in its scope to the
reference path, so whole models can be compared against it.

Notation: b batch, h query heads, g key/value heads (h % g == 0, grouped-query attention),
i queries, j keys, d head dim.
Mask: bool, True = may attend, broadcastable to (b, h, i, j). A query that may attend no key
gets a zero output, never NaN.
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


def reference_attend(
    q: Tensor,  # (b, h, i, d)
    k: Tensor,  # (b, g, j, d)
    v: Tensor,  # (b, g, j, dv)
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:  # (b, h, i, dv)
    """Plain softmax attention; the oracle for ``attend``. ``causal`` aligns the queries
    with the last ``i`` keys (as a KV cache does)."""
    k, v = _expand_kv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
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
# + backward 12.9 vs 7.2 ms; 8 x 4 x 128 causal 14.2 vs 8.8); at 512 keys and more SDPA was
# faster (it skips masked blocks and never stores the scores).
MATH_MAX_KEYS = 128


def _use_math(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= MATH_MAX_KEYS
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
) -> Tensor:  # (b, h, i, dv)
    """Softmax attention through SDPA, same contract as ``reference_attend``."""
    if _BACKEND.get() == "reference":
        return reference_attend(q, k, v, mask, causal=causal, dropout_p=dropout_p, scale=scale)
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
    # a row with no allowed key would give NaN in SDPA: let it attend everything, then zero it
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
