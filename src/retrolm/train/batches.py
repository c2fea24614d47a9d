"""The data order of a run: a pure function of (seed, epoch), so a resumed run reads the
same batches; batches are collated into the registry's ``Batch``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from retrolm.data import RETRODataset
from retrolm.models.registry import Batch


def collate(items: list[tuple[Tensor, ...]], use_retrieval: bool) -> Batch:
    seq = torch.stack([it[0] for it in items])
    if not use_retrieval:
        return Batch(seq)
    return Batch(seq, torch.stack([it[1] for it in items]), torch.stack([it[2] for it in items]))


class BatchOrder:
    """Global batches of dataset indices; a pure function of (seed, epoch, position).

    ``position`` counts micro-batches handed out; each rank takes its own slice of every
    global micro-batch, so all ranks agree on the position.
    """

    def __init__(
        self, indices: list[int], micro_batch: int, seed: int, rank: int = 0, world: int = 1
    ):
        self.indices = indices
        self.global_micro = micro_batch * world
        if len(indices) < self.global_micro:
            raise ValueError(
                f"the database has {len(indices)} training sequences, fewer than one batch "
                f"({self.global_micro}); lower batch_size or seq_len, or use more text"
            )
        self.per_epoch = len(indices) // self.global_micro
        self.seed, self.rank, self.micro = seed, rank, micro_batch
        self._perm_epoch, self._perm = -1, None

    def batch(self, position: int) -> list[int]:
        epoch, i = divmod(position, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.indices), generator=g).tolist()
            self._perm_epoch = epoch
        start = i * self.global_micro + self.rank * self.micro
        return [self.indices[j] for j in self._perm[start : start + self.micro]]


def batches(
    ds: RETRODataset, order: BatchOrder, start: int, use_retrieval: bool, prefetch: int
) -> Iterator[Batch]:
    """Batches from ``start`` on; a background thread keeps ``prefetch`` ready."""

    def make(pos: int) -> Batch:
        return collate([ds[i] for i in order.batch(pos)], use_retrieval)

    if prefetch == 0:
        pos = start
        while True:
            yield make(pos)
            pos += 1
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work() -> None:
        pos = start
        while not stop.is_set():
            try:
                item = make(pos)
            except Exception as e:  # surface loader errors in the training thread
                item = e
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            pos += 1

    thread = threading.Thread(target=work, daemon=True, name="retrolm-batches")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
