"""The state a Memorizing Transformer carries from one segment (or one token) to the next.

Per batch row (one document stream each):

- ``knn``: one ``KNNMemory`` per kNN layer (what that layer writes);
- ``xl``: per XL layer, the (key, value) pairs it produced over the previous segments, right
  aligned (the last pair just before the current segment), and ``xl_valid`` per row (False:
  cleared at a document start, or padding);
- the current, unfinished segment: each layer's pairs so far (``seg``), their key validity
  (``seg_ok``) and the number of tokens (``pos``).

When ``pos`` reaches ``segment_len`` the model does what the end of a whole segment does:
write the pairs that leave the XL window into the kNN memories, roll the XL window, start a
new segment. So feeding a document in pieces of any length gives the same result as one call.

Shapes: b rows, L XL pairs, t tokens of the current segment so far, d ``dim_head``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from retrolm.nn.knn_memory import KNNMemoryList


@dataclass
class XLMemories:
    """The XL memories the reference-style call returns and takes back
    (``logits, xl = model(x, mems, xl_memories=xl)``): ``kv[i]`` (b, L, 2, d) per XL layer and
    ``valid`` (b, L). Iterates like the reference's tuple of tensors."""

    kv: list[Tensor]
    valid: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.kv)

    def __len__(self) -> int:
        return len(self.kv)

    def __getitem__(self, i: int) -> Tensor:
        return self.kv[i]


class MemorizingCache:
    """``MemorizingLanguageModel.init_cache(b)``: the whole past of ``b`` document streams.

    A plain class, not a dataclass: DDP rebuilds dataclass arguments of its forward when it
    moves inputs to the device, and the model must update *this* cache (training pieces,
    ``ModelFamily.segment_losses``, pass it through the DDP wrapper)."""

    def __init__(self, knn: KNNMemoryList | None, depth: int, batch_size: int) -> None:
        self.knn, self.depth, self.batch_size = knn, depth, batch_size
        self.xl: dict[int, Tensor] = {}  # layer -> (b, L, 2, d), detached
        self.xl_valid: Tensor | None = None  # (b, L) bool
        self.seg: dict[int, Tensor] = {}  # layer -> (b, t, 2, d)
        self.seg_ok: Tensor | None = None  # (b, t) bool: the current segment's keys that count
        self.pos = 0  # tokens of the current segment so far
        self.last_ids: Tensor | None = None  # (b,) the last token fed (the eos check)

    def clear_rows(self, rows: Tensor) -> None:
        """Forget rows ``rows`` (a (b,) bool or index tensor): kNN and XL memories alike."""
        idx = torch.nonzero(rows).flatten() if rows.dtype == torch.bool else rows.flatten()
        if idx.numel() == 0:
            return
        if self.knn is not None:
            self.knn.clear_memory(idx.tolist())
        if self.xl_valid is not None:
            self.xl_valid[idx] = False

    @property
    def xl_memories(self) -> XLMemories | None:
        if self.xl_valid is None:
            return None
        return XLMemories([self.xl[i] for i in sorted(self.xl)], self.xl_valid)
