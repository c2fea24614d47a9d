"""The hierarchical transformer's incremental decoding state."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from retrolm.nn.kv_cache import KVCache


@dataclass
class BlockState:
    """Decoding state of one block (one layer of one hierarchy)."""

    attn_shift: Tensor | None = None  # (b, a, d) last a normed inputs of the attention
    ff_shift: Tensor | None = None  # (b, a, d) last a normed inputs of the feed-forward
    kv: list[KVCache] = field(default_factory=list)  # one cache per sub-sequence


@dataclass
class HierarchicalCache:
    """Everything generation needs to extend a sequence one token at a time."""

    pos: int = 0  # tokens seen so far
    window: Tensor | None = None  # (b, max(c), D) embeddings of the last max(c) positions
    blocks: list[list[BlockState]] = field(default_factory=list)  # [layer][hierarchy]
    latest: list[list[Tensor | None]] = field(default_factory=list)  # [layer][k] (b, 1, d)
    final: list[Tensor | None] = field(default_factory=list)  # [k] (b, 1, d) normed output
