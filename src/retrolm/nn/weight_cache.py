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
    def __init__(self, build: Callable[..., Any]) -> None:
        self.build = build
        self._sources: tuple[Tensor, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._key: Any = None
        self._value: Any = None

    def get(self, *params: Tensor, key: Any = None) -> Any:
        """build(*params, key) (``build(*params)`` when key is None), rebuilt only when a
        param changed or ``key`` (e.g. the compute dtype) differs from the last call's."""
        value = self._value
        if value is not None and key == self._key and len(params) == len(self._sources):
            # a plain loop: this runs on every decoded token, several times per layer
            for p, s, v in zip(params, self._sources, self._versions):
                if p._version != v or p.data_ptr() != s.data_ptr() or p.shape != s.shape:
                    break
            else:
                return value
        with torch.no_grad():
            value = self.build(*params) if key is None else self.build(*params, key)
        self._sources = tuple(p.detach() for p in params)
        self._versions, self._key, self._value = tuple(p._version for p in params), key, value
        return value

    def clear(self) -> None:
        self._sources, self._versions, self._key, self._value = (), (), None, None
