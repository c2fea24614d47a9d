"""A tensor derived from parameters (a transpose, a concatenation), kept while they are unchanged.

Decoding runs the same layers once per token without autograd; rebuilding a fused or
transposed weight on every call would cost more than it saves, so it is built once. The
cache is valid while every source parameter has the same storage and version counter (any
in-place update, e.g. an optimizer step or ``load_state_dict``, moves the counter); it
holds the sources' storage so that an address cannot be reused behind its back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class WeightCache:
    """One derived value per ``key`` (e.g. the compute dtype: a bf16 prefill and fp32 steps
    keep one each), each valid while its sources are unchanged."""

    def __init__(self, build: Callable[..., Any]) -> None:
        self.build = build
        self.clear()

    def get(self, *params: Tensor, key: Any = None) -> Any:
        """build(*params, key) (``build(*params)`` when key is None), rebuilt only when a
        param changed since this key's value was built."""
        if key != self._key:  # switch entries (the hot path skips this)
            if self._value is not None:
                self._others[self._key] = (self._sources, self._versions, self._value)
            self._key = key
            self._sources, self._versions, self._value = self._others.pop(key, ((), (), None))
        value = self._value
        if value is not None and len(params) == len(self._sources):
            # a plain loop: this runs on every decoded token, several times per layer
            for p, s, v in zip(params, self._sources, self._versions):
                if p._version != v or p.data_ptr() != s.data_ptr() or p.shape != s.shape:
                    break
            else:
                return value
        with torch.no_grad():
            value = self.build(*params) if key is None else self.build(*params, key)
        self._sources = tuple(p.detach() for p in params)
        self._versions, self._value = tuple(p._version for p in params), value
        return value

    def clear(self) -> None:
        self._sources: tuple[Tensor, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._key: Any = None
        self._value: Any = None
        self._others: dict[Any, tuple] = {}  # key -> (sources, versions, value) not in use
