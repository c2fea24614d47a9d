"""Key/value cache for incremental decoding.

Keys are stored *after* rotary has been applied, so cached positions never need re-rotating.
The buffer grows by doubling (amortised O(1) appends, no per-step concatenation). The live
positions are ``buffer[start : start + length]``: ``keep_last`` (sliding windows) only moves
``start``, and the kept keys are copied back to the front of the buffer when an append would
run past its end, i.e. once per ``capacity - n`` steps instead of on every step.
"""

from __future__ import annotations

from torch import Tensor


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
        elif self._start + self.length + t > self._k.shape[-2]:
            # full: move the live part to the front of a buffer with room for it twice
            cap = max(self._k.shape[-2], 2 * (self.length + t))
            self._k = self._moved(self._k, cap)
            self._v = self._moved(self._v, cap)
            self._start = 0
        end = self._start + self.length
        self._k.narrow(-2, end, t).copy_(k)  # narrow: less Python than an index expression
        self._v.narrow(-2, end, t).copy_(v)
        self.length += t
        live = end + t - self._start
        return self._k.narrow(-2, self._start, live), self._v.narrow(-2, self._start, live)

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


__all__ = ["KVCache", "new_caches"]
