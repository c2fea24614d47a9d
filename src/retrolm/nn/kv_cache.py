"""Key/value cache for incremental decoding.

Keys are stored *after* rotary has been applied, so cached positions never need re-rotating.
The buffer grows by doubling (amortised O(1) appends, no per-step concatenation).
"""

from __future__ import annotations

from torch import Tensor


class KVCache:
    def __init__(self) -> None:
        self._k: Tensor | None = None  # (b, g, capacity, d)
        self._v: Tensor | None = None
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (b, g, t, d) and return all cached keys/values (b, g, length, d)."""
        t = k.shape[-2]
        if self._k is None:
            cap = max(16, t)
            self._k = k.new_empty(*k.shape[:-2], cap, k.shape[-1])
            self._v = v.new_empty(*v.shape[:-2], cap, v.shape[-1])
        elif self.length + t > self._k.shape[-2]:
            cap = max(2 * self._k.shape[-2], self.length + t)
            self._k = self._grow(self._k, cap)
            self._v = self._grow(self._v, cap)
        self._k[..., self.length : self.length + t, :] = k
        self._v[..., self.length : self.length + t, :] = v
        self.length += t
        return self._k[..., : self.length, :], self._v[..., : self.length, :]

    def _grow(self, buf: Tensor, cap: int) -> Tensor:
        new = buf.new_empty(*buf.shape[:-2], cap, buf.shape[-1])
        new[..., : self.length, :] = buf[..., : self.length, :]
        return new

    def keep_last(self, n: int) -> None:
        """Drop all but the last ``n`` positions (for sliding-window attention)."""
        if self._k is None or self.length <= n:
            return
        start = self.length - n
        self._k = self._k[..., start : self.length, :].clone()
        self._v = self._v[..., start : self.length, :].clone()
        self.length = n

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, dropping finished rows)."""
        if self._k is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)


def new_caches(n: int) -> list[KVCache]:
    return [KVCache() for _ in range(n)]


__all__ = ["KVCache", "new_caches"]
