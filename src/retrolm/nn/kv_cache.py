"""Key/value cache for incremental decoding.

Keys are stored *after* rotary has been applied, so cached positions never need re-rotating.
The buffer grows by doubling (amortised O(1) appends, no per-step concatenation). The live
positions are ``buffer[start : start + length]``: ``keep_last`` (sliding windows) only moves
``start``, and the kept keys are copied back to the front of the buffer when an append would
run past its end, i.e. once per ``capacity - n`` steps instead of on every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


class KVCache:
    def __init__(self) -> None:
        self._k: Tensor | None = None  # (b, g, capacity, d)
        self._v: Tensor | None = None
        self._start = 0  # first live position in the buffer
        self.length = 0  # live positions

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (b, g, t, d) and return all cached keys/values (b, g, length, d)."""
        t = k.shape[-2]
        if self._k is None:
            cap = max(16, t)
            self._k = k.new_empty(*k.shape[:-2], cap, k.shape[-1])
            self._v = v.new_empty(*v.shape[:-2], cap, v.shape[-1])
        k_buf, v_buf, start, end = self.claim(t)
        k_buf.narrow(-2, end, t).copy_(k)  # narrow: less Python than an index expression
        v_buf.narrow(-2, end, t).copy_(v)
        return k_buf.narrow(-2, start, self.length), v_buf.narrow(-2, start, self.length)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the cached keys (None while empty): what a kernel writing into the
        buffers (``claim``) must check before it does."""
        return None if self._k is None else self._k.dtype

    def view(self) -> tuple[Tensor, Tensor]:
        """All cached keys/values (b, g, length, d), appending nothing."""
        if self._k is None:
            raise ValueError("the cache is empty: nothing was appended with update yet")
        return (
            self._k.narrow(-2, self._start, self.length),
            self._v.narrow(-2, self._start, self.length),
        )

    def claim(self, t: int = 1) -> tuple[Tensor, Tensor, int, int]:
        """Count ``t`` more positions as live without writing them, for a kernel that writes
        its keys/values into the buffers itself (``nn.fused.decode``). Returns (k buffer,
        v buffer, first live slot, first new slot), buffers (b, g, capacity, d); the caller
        must fill slots ``end … end + t - 1`` before anything reads the cache."""
        if self._k is None:
            raise ValueError("claim needs a filled cache: run the prompt through update first")
        if self._start + self.length + t > self._k.shape[-2]:
            # full: move the live part to the front of a buffer with room for it twice
            cap = max(self._k.shape[-2], 2 * (self.length + t))
            self._k = self._moved(self._k, cap)
            self._v = self._moved(self._v, cap)
            self._start = 0
        end = self._start + self.length
        self.length += t
        return self._k, self._v, self._start, end

    def _moved(self, buf: Tensor, cap: int) -> Tensor:
        live = buf[..., self._start : self._start + self.length, :]
        if cap == buf.shape[-2]:  # same size: copy within (through a clone, ranges may overlap)
            buf[..., : self.length, :] = live.clone()
            return buf
        new = buf.new_empty(*buf.shape[:-2], cap, buf.shape[-1])
        new[..., : self.length, :] = live
        return new

    def keep_last(self, n: int) -> None:
        """Drop all but the last ``n`` positions (for sliding-window attention)."""
        if self._k is None or self.length <= n:
            return
        self._start += self.length - n
        self.length = n

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, dropping finished rows)."""
        if self._k is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)


def new_caches(n: int) -> list[KVCache]:
    return [KVCache() for _ in range(n)]


_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def as_float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype from a ``torch.dtype`` or a name ('bf16', 'fp16', 'fp32', ...)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(
        f"prefill dtype must be a floating dtype such as torch.bfloat16 or one of "
        f"{sorted(_DTYPE_NAMES)}, got {dtype!r}"
    )


def cast_cache(cache: Any, dtype: torch.dtype) -> Any:
    """Cast, in place, every floating tensor a decoding cache holds to ``dtype``.

    A cache is a plain container (objects, dataclasses, lists, tuples, dicts) of tensors and
    Python values; modules are left alone. Views stay views: every tensor that shares a base
    is rebuilt on one cast copy of that base, so a cache that keeps a buffer and views into
    it (ring buffers, a window of the last keys) still writes and reads the same memory.
    Returns the cache (a tuple comes back rebuilt)."""
    return _cast(cache, dtype, {})


def _cast(obj: Any, dtype: torch.dtype, bases: dict[int, tuple[Tensor, Tensor]]) -> Any:
    if isinstance(obj, Tensor):
        if not obj.is_floating_point() or obj.dtype == dtype:
            return obj
        base = obj if obj._base is None else obj._base
        if id(base) not in bases:  # (the old base is kept in the memo: its id stays unique)
            new = torch.empty_strided(base.size(), base.stride(), dtype=dtype, device=base.device)
            bases[id(base)] = (base, new.copy_(base))
        new_base = bases[id(base)][1]
        if obj is base:
            return new_base
        offset = obj.storage_offset() - base.storage_offset()
        return new_base.as_strided(obj.size(), obj.stride(), new_base.storage_offset() + offset)
    if isinstance(obj, list):
        obj[:] = [_cast(v, dtype, bases) for v in obj]
    elif isinstance(obj, tuple):
        items = [_cast(v, dtype, bases) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    elif isinstance(obj, dict):
        for key, v in obj.items():
            obj[key] = _cast(v, dtype, bases)
    elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        for key, v in vars(obj).items():
            setattr(obj, key, _cast(v, dtype, bases))
    return obj


def step_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype a decoding step computes in here: autocast's if it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def prefill(
    run: Callable[[], T],
    model: nn.Module,
    cache: Any,
    dtype: torch.dtype | str | None,
    device: torch.device,
) -> T:
    """Run a prompt's forward ``run()`` that fills ``cache``, optionally in another precision.

    With ``dtype`` (e.g. bf16), the prompt runs under autocast to it: one long forward is
    matmul-bound and gains from half precision, while the single-token steps that follow are
    overhead- and bandwidth-bound and may be faster in the weights' dtype. The cache is then
    cast to the steps' dtype (``step_dtype``), so every step reads one precision."""
    if dtype is None:
        return run()
    dtype = as_float_dtype(dtype)
    with torch.autocast(device.type, dtype=dtype):
        out = run()
    if cache is not None:
        cast_cache(cache, step_dtype(model, device))
    return out


__all__ = ["KVCache", "as_float_dtype", "cast_cache", "new_caches", "prefill", "step_dtype"]
