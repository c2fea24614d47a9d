"""The DeLighT family's incremental decoding state: one key/value cache per block and the
number of tokens seen (the offset of the next position embedding or rotary angle)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from retrolm.nn.kv_cache import KVCache


@dataclass
class DeLighTCache:
    """Everything ``DeLighTLM(ids, cache=...)`` needs to extend a sequence."""

    pos: int = 0  # tokens seen so far: the next token's position
    kv: list[KVCache] = field(default_factory=list)  # one per block, keys (b, g, pos, e)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search, dropping finished rows)."""
        for c in self.kv:
            c.reorder(index)
