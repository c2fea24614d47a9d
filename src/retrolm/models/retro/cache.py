"""RETRO's incremental decoding state."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from retrolm.nn.kv_cache import KVCache


@dataclass
class RetroCache:
    """Everything incremental decoding keeps per sequence batch."""

    self_attn: list[KVCache]
    length: int = 0
    # the states of the positions since the first unencoded chunk, in pieces (b, ·, d):
    # concatenated once that chunk completes, not on every decoded token
    chunk_states: list[Tensor] = field(default_factory=list)
    encoded_chunks: int = 0
    cca_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (b, L, …)
    cca_mask: Tensor | None = None  # (b, L, k*r)
    cca_full: list[bool] = field(default_factory=list)  # chunk u: every neighbour token real
    copy_tail: Tensor | None = None  # (b, <= copy_max_match-1) latest tokens, for the copy head
