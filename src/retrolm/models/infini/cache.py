"""The decoding state of Infini-attention: what the model knows of a stream so far.

Per layer, ``SegmentKV``: the current segment's keys and values (the local path's KV cache,
rotated keys; the unrotated keys and write strengths the memory update needs when the
segment completes) -- the current segment only. ``InfiniCache``: those, each layer's
compressive memory (``Memories``: the segments before), the position in the segment and,
per row, where its document starts inside the segment (``reset``).

Notation: b batch, h heads, j keys of the current segment, d head width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retrolm.models.infini.memory import Memories
from retrolm.nn.kv_cache import KVCache


class SegmentKV:
    """One layer's current segment: ``local`` the rotated keys and values the local path
    attends, ``raw`` the unrotated keys and the write strengths (1 without
    ``learned_delta_update``) that the memory update reads when the segment completes."""

    def __init__(self) -> None:
        self.local = KVCache()  # (b, h, j, d) rotated k, v
        self.raw = KVCache()  # (b, h, j, d) unrotated k, (b, h, j, 1) beta

    @property
    def length(self) -> int:
        return self.local.length

    def append(self, k_rot: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """Add this call's tokens; returns every rotated key and value of the segment."""
        self.raw.update(k, beta)
        return self.local.update(k_rot, v)

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """(unrotated keys, values, write strengths) of the whole segment so far."""
        k, beta = self.raw.view()
        return k, self.local.view()[1], beta


class InfiniCache:
    """The stream's state: ``model(new_ids, cache=cache)`` takes any number of new tokens.

    ``memories[l]``: layer l's memory of the completed segments (None: all zero);
    ``segment[l]``: its current segment; ``pos``: tokens of the current segment seen;
    ``start`` (b,): per row, the position in the segment where its document began
    (``reset``): earlier keys of the segment are hidden from it and never written to its
    memory."""

    def __init__(self, batch_size: int, depth: int, segment_len: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.segment_len = segment_len
        self.memories: list[Memories | None] = [None] * depth
        self.segment = [SegmentKV() for _ in range(depth)]
        self.pos = 0
        self.start: Tensor | None = None  # (b,) int64; None: every row starts at 0

    def end_segment(self, memories: list[Memories]) -> None:
        """The segment is complete: its memories replace the old ones, its KV cache is dropped."""
        self.memories = memories
        self.segment = [SegmentKV() for _ in self.segment]
        self.pos = 0
        self.start = None

    def detach(self) -> None:
        """Cut the gradient through the memories (truncated BPTT)."""
        self.memories = [m.detach() if m is not None else None for m in self.memories]

    def reset(self, rows: Tensor) -> None:
        """A document starts now in the rows where ``rows`` (b,) bool is True: their
        memories are cleared and the keys of their current segment forgotten; the other
        rows keep theirs."""
        if rows.dtype != torch.bool or rows.shape != (self.batch_size,):
            raise ValueError(
                f"rows must be a bool tensor of shape ({self.batch_size},) (True = a document "
                f"starts), got {rows.dtype} of shape {tuple(rows.shape)}"
            )
        keep = ~rows
        self.memories = [
            None
            if m is None
            else Memories(
                m.kv_mem * keep.view(-1, 1, 1, 1).to(m.kv_mem),
                m.k_norm * keep.view(-1, 1, 1).to(m.k_norm),
            )
            for m in self.memories
        ]
        if self.pos:
            start = (
                self.start if self.start is not None else torch.zeros(len(rows), dtype=torch.long)
            )
            self.start = torch.where(rows.cpu(), self.pos, start)

    def key_mask(self, j: int, device: torch.device) -> Tensor | None:
        """(b, 1, 1, j) bool, True = the key belongs to the row's document; None: all do."""
        if self.start is None:
            return None
        return (torch.arange(j) >= self.start[:, None]).to(device)[:, None, None, :]
