"""A non-differentiable kNN memory of (key, value) pairs: one FIFO ring per batch row.

The external memory of Memorizing Transformers (Wu et al., ICLR 2022, arXiv 2203.08913, §3):
a row (one document stream) keeps its last ``max_memories`` pairs; a query retrieves the
``topk`` pairs of largest inner product ``q·k`` from its own row only.

Bookkeeping: pair number ``c`` of a row (counted since the row's last clear) lives in slot
``c mod max_memories`` of the ring, and has id ``c`` in the row's faiss index. Adding pairs past
capacity evicts the oldest (their ids are removed from the index); nothing is ever reset, so
an id always names the pair in its slot. Backends:

- ``exact``: a matmul and top-k in torch, on the memory's device (no faiss needed).
- ``faiss``: one ``IndexIDMap2`` per row over a flat (or IVF) inner-product index, built by
  ``retrolm.retrieval.id_index`` and imported on first use, so this module imports without
  faiss; the values stay in the torch ring.
- ``auto``: ``exact`` up to ``EXACT_MAX`` pairs per row, else ``faiss`` (``exact`` when faiss
  is not installed).

Shapes: r rows, c capacity (``max_memories``), d the pair width, Q queries, k ``topk``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "faiss")
EXACT_MAX = 65_536  # auto: exact search up to this many pairs per row
_SIM_BLOCK = 1 << 24  # exact search: at most this many query x key scores at once


def _faiss_available() -> bool:
    """Whether faiss is installed (found, not imported: only retrieval/ imports it)."""
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


class KNNMemory:
    """``add(kv (b, n, 2, d), mask=None)``, ``search(queries (b, ..., d), topk)``, ``clear``.

    ``num_indices``: batch rows (documents streamed side by side). ``memmap_filename``: keep
    the pairs in this file (numpy memmap) instead of RAM. ``index``: the faiss backend's index,
    ``"flat"`` or ``"ivf"`` (trained on the row's first ``ivf_train`` pairs; until then exact).
    Inside ``at_batch_indices(idx)`` every call reads and writes only rows ``idx`` (b =
    ``len(idx)``), and only their counts move.
    """

    def __init__(
        self,
        dim: int,
        max_memories: int = 16000,
        num_indices: int = 1,
        backend: str = "auto",
        memmap_filename: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        index: str = "flat",
        ivf_lists: int = 64,
    ) -> None:
        for name, v in (("dim", dim), ("max_memories", max_memories), ("num_indices", num_indices)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown kNN memory backend {backend!r}; choose one of {BACKENDS}")
        if index not in ("flat", "ivf"):
            raise ValueError(f"index must be 'flat' or 'ivf', got {index!r}")
        if backend == "auto":
            backend = "exact" if max_memories <= EXACT_MAX or not _faiss_available() else "faiss"
        self.dim, self.max_memories, self.num_indices = dim, max_memories, num_indices
        self.backend, self.index_kind, self.ivf_lists = backend, index, ivf_lists
        shape = (num_indices, max_memories, 2, dim)
        if memmap_filename is not None:
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError(f"a memmapped kNN memory lives on the CPU, got device={device}")
            Path(memmap_filename).parent.mkdir(parents=True, exist_ok=True)
            arr = np.memmap(memmap_filename, dtype=np.float32, mode="w+", shape=shape)
            self.kv = torch.from_numpy(arr)  # shares the file's pages
            self._memmap = arr
        else:
            self.kv = torch.empty(shape, device=device)  # pages are touched only when written
        self.valid = torch.zeros(num_indices, max_memories, dtype=torch.bool, device=device)
        self.count = [0] * num_indices  # pairs added to each row since its last clear
        self._indices: list[Any] = [None] * num_indices  # faiss, per row, built lazily
        self._scope: list[int] | None = None

    # --- rows ---------------------------------------------------------------------------
    def _rows(self) -> list[int]:
        return list(range(self.num_indices)) if self._scope is None else self._scope

    @contextlib.contextmanager
    def at_batch_indices(self, indices: Sequence[int] | Tensor) -> Iterator[KNNMemory]:
        """Scope ``add``/``search`` to rows ``indices`` (e.g. one micro-batch of a larger
        batch, for gradient accumulation)."""
        rows = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        bad = [i for i in rows if not 0 <= i < self.num_indices]
        if bad:
            raise ValueError(f"batch indices {bad} out of range for {self.num_indices} rows")
        outer, self._scope = self._scope, rows
        try:
            yield self
        finally:
            self._scope = outer

    def clear(self, batch_indices: Sequence[int] | Tensor | None = None) -> None:
        """Forget every pair of rows ``batch_indices`` (absolute row numbers; None: all)."""
        if batch_indices is None:
            rows = list(range(self.num_indices))
        elif isinstance(batch_indices, Tensor):
            rows = batch_indices.flatten().tolist()
        else:
            rows = [int(i) for i in batch_indices]
        for r in rows:
            if not 0 <= r < self.num_indices:
                raise ValueError(f"batch index {r} out of range for {self.num_indices} rows")
            self.valid[r] = False
            self.count[r] = 0
            self._indices[r] = None

    def __len__(self) -> int:
        """Pairs held, summed over the rows in scope."""
        return sum(min(self.count[r], self.max_memories) for r in self._rows())

    # --- add ----------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, kv: Tensor, mask: Tensor | None = None) -> None:
        """Append pairs ``kv (b, n, 2, d)`` to each row in scope, in order (detached).
        ``mask (b, n)``: only the True pairs are stored (padding, cleared XL pairs)."""
        rows = self._rows()
        if kv.dim() != 4 or kv.shape[0] != len(rows) or kv.shape[2:] != (2, self.dim):
            raise ValueError(
                f"kv must be (b={len(rows)}, n, 2, dim={self.dim}), got {tuple(kv.shape)}"
            )
        if kv.shape[1] == 0:
            return
        cap, dev = self.max_memories, self.kv.device
        kv = kv.detach().to(dev, self.kv.dtype)
        ok = torch.ones(kv.shape[:2], dtype=torch.bool, device=dev)
        if mask is not None:
            ok = mask.to(dev, torch.bool)
        rank = ok.long().cumsum(1) - 1  # (b, n): the pair's number among this add's stored
        total = ok.sum(1)  # (b,)
        keep = ok & (rank >= total[:, None] - cap)  # only the last `cap` can survive
        starts = torch.tensor([self.count[r] for r in rows], device=dev)
        slots = (starts[:, None] + rank) % cap  # (b, n)
        flat = torch.tensor(rows, device=dev)[:, None] * cap + slots
        self.kv.view(-1, 2, self.dim)[flat[keep]] = kv[keep]
        self.valid.view(-1)[flat[keep]] = True
        totals = total.tolist()
        if self.backend == "faiss":
            ids = (starts[:, None] + rank).cpu().numpy()
            for i, r in enumerate(rows):
                sel = keep[i].cpu().numpy()
                self._faiss_add(r, kv[i, keep[i], 0], ids[i][sel], totals[i])
        for r, t in zip(rows, totals):
            self.count[r] += t

    def _faiss_add(self, r: int, keys: Tensor, ids: np.ndarray, added: int) -> None:
        from retrolm.retrieval.id_index import add_pairs, make_id_index

        if self._indices[r] is None:
            self._indices[r] = make_id_index(self.dim, self.index_kind, self.ivf_lists)
        count, cap = self.count[r], self.max_memories
        # held before: ids [count - cap, count); after: [count + added - cap, count + added)
        evicted = np.arange(max(count - cap, 0), max(min(count, count + added - cap), 0))
        held = self._row_keys(r, count + added)
        add_pairs(self._indices[r], keys.float().cpu().numpy(), ids, evicted, held)

    def _row_keys(self, r: int, count: int) -> Any:
        """A row's held keys, (ids, keys), once ``count`` pairs were added (training an IVF
        index on first use)."""

        def held() -> tuple[np.ndarray, np.ndarray]:
            slots = torch.nonzero(self.valid[r]).flatten()
            cap = self.max_memories
            # the id of the pair in slot s: the latest c < count with c % cap == s
            ids = count - 1 - ((count - 1 - slots) % cap)
            return ids.cpu().numpy(), self.kv[r, slots, 0].float().cpu().numpy()

        return held

    # --- search -------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, queries: Tensor, topk: int) -> tuple[Tensor, Tensor]:
        """The ``topk`` pairs of largest ``q·k`` per query, best first, from the query's own
        row: ``(kv (b, ..., k, 2, d), mask (b, ..., k))``; mask False (and kv zero) where the
        row holds fewer than ``topk`` pairs."""
        lead, flat, ok, _ = self._find(queries, topk)
        kv = self._gather(flat, ok, slice(None)).to(queries.device, queries.dtype)
        return kv.reshape(*lead, topk, 2, self.dim), ok.to(queries.device).reshape(*lead, topk)

    @torch.no_grad()
    def search_scored(self, queries: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
        """``search`` for a reader that needs no gradient through the keys: ``(scores (b,
        ..., k), values (b, ..., k, d), mask (b, ..., k))``, the scores the ``q·k`` the
        search ranked by (exact: its own products, no second pass over gathered keys; queries
        finer than the store, e.g. float64, and faiss: recomputed from the gathered keys in
        the queries' dtype), zero with their values where mask is False. Half the gather of
        ``search``."""
        lead, flat, ok, scores = self._find(queries, topk)
        finer = torch.finfo(queries.dtype).bits > torch.finfo(self.kv.dtype).bits
        if scores is None or finer:  # faiss gives ids only; float64 queries: their products
            keys = self._gather(flat, ok, 0).to(queries.device, queries.dtype)
            scores = torch.einsum(
                "bqd,bqkd->bqk", queries.reshape(keys.shape[0], -1, self.dim), keys
            )
        values = self._gather(flat, ok, 1).to(queries.device, queries.dtype)
        scores = scores.to(queries.device, queries.dtype).masked_fill(~ok, 0.0)
        ok = ok.to(queries.device)
        return (
            scores.reshape(*lead, topk),
            values.reshape(*lead, topk, self.dim),
            ok.reshape(*lead, topk),
        )

    def _find(self, queries: Tensor, topk: int) -> tuple[tuple, Tensor, Tensor, Tensor | None]:
        """The search proper: ``(lead dims, flat slots (b, Q, k) into kv.view(-1, 2, d), ok
        (b, Q, k), scores (b, Q, k) or None where the backend does not give them)``."""
        rows = self._rows()
        if queries.shape[0] != len(rows) or queries.shape[-1] != self.dim:
            raise ValueError(
                f"queries must be (b={len(rows)}, ..., dim={self.dim}), got {tuple(queries.shape)}"
            )
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        q = queries.reshape(len(rows), -1, self.dim).to(self.kv.device, self.kv.dtype)
        scores = None
        if self.backend == "faiss":
            slots, ok = self._faiss_search(rows, q, topk)
        else:
            slots, ok, scores = self._exact_search(rows, q, topk)
        flat = torch.tensor(rows, device=q.device)[:, None, None] * self.max_memories + slots
        return queries.shape[:-1], flat, ok, scores

    def _gather(self, flat: Tensor, ok: Tensor, part: slice | int) -> Tensor:
        """Rows ``flat (b, Q, k)`` of the pair store, ``part`` of each pair (both: slice,
        key 0, value 1), zero where not ``ok``: (b, Q, k, [2,] d)."""
        store = self.kv.view(-1, 2, self.dim)[:, part]  # (r * c, [2,] d), a view
        got = store.index_select(0, flat.reshape(-1)).view(*flat.shape, *store.shape[1:])
        if not bool(ok.all()):
            got.masked_fill_(~ok.view(*ok.shape, *([1] * (got.dim() - 3))), 0.0)
        return got

    def _exact_search(
        self, rows: list[int], q: Tensor, topk: int
    ) -> tuple[Tensor, Tensor, Tensor]:  # slots, ok, scores (b, Q, k)
        b, nq = q.shape[:2]
        filled = min(max(self.count[r] for r in rows), self.max_memories)
        slots = torch.zeros(b, nq, topk, dtype=torch.long, device=q.device)
        ok = torch.zeros(b, nq, topk, dtype=torch.bool, device=q.device)
        scores = torch.zeros(b, nq, topk, dtype=q.dtype, device=q.device)
        if filled == 0:
            return slots, ok, scores
        whole = rows == list(range(self.num_indices))
        keys = self.kv[:, :filled, 0] if whole else self.kv[rows, :filled, 0]  # (b, f, d)
        valid = self.valid[:, :filled] if whole else self.valid[rows, :filled]  # (b, f)
        k = min(topk, filled)
        step = max(_SIM_BLOCK // (b * filled), 1)
        all_valid = bool(valid.all())
        for s in range(0, nq, step):
            sim = torch.matmul(q[:, s : s + step], keys.transpose(1, 2))  # (b, Qs, f)
            if not all_valid:
                sim.masked_fill_(~valid[:, None], float("-inf"))
            best, idx = sim.topk(k, dim=-1)  # best first
            slots[:, s : s + step, :k] = idx
            ok[:, s : s + step, :k] = best > float("-inf")
            scores[:, s : s + step, :k] = best.to(scores.dtype)
        return slots, ok, scores

    def _faiss_search(self, rows: list[int], q: Tensor, topk: int) -> tuple[Tensor, Tensor]:
        from retrolm.retrieval.id_index import search_ids

        slots = torch.zeros(len(rows), q.shape[1], topk, dtype=torch.long, device=q.device)
        ok = torch.zeros_like(slots, dtype=torch.bool)
        qn = q.float().cpu().numpy()
        for i, r in enumerate(rows):
            ids = None if self._indices[r] is None else search_ids(self._indices[r], qn[i], topk)
            if ids is None:  # an empty row, or an IVF index not trained yet: exact
                slots[i : i + 1], ok[i : i + 1], _ = self._exact_search([r], q[i : i + 1], topk)
                continue
            t = torch.from_numpy(ids).to(q.device)
            slots[i], ok[i] = t.clamp(min=0) % self.max_memories, t >= 0
        return slots, ok


class KNNMemoryList(list):
    """One ``KNNMemory`` per kNN layer, as ``create_knn_memories`` returns them."""

    @classmethod
    def create(
        cls,
        num_memories: int,
        dim: int,
        max_memories: int,
        num_indices: int,
        backend: str = "auto",
        directory: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> KNNMemoryList:
        return cls(
            KNNMemory(
                dim,
                max_memories,
                num_indices,
                backend,
                None if directory is None else Path(directory) / f"knn.memory.layer.{i + 1}.memmap",
                device=device,
            )
            for i in range(num_memories)
        )

    def clear_memory(
        self,
        batch_indices: Sequence[int] | Tensor | None = None,
        memory_indices: Sequence[int] | None = None,
    ) -> None:
        """Clear rows ``batch_indices`` (None: all) of memories ``memory_indices`` (None: all)."""
        chosen = range(len(self)) if memory_indices is None else memory_indices
        for i in chosen:
            self[i].clear(batch_indices)

    @contextlib.contextmanager
    def at_batch_indices(self, indices: Sequence[int] | Tensor) -> Iterator[KNNMemoryList]:
        with contextlib.ExitStack() as stack:
            for mem in self:
                stack.enter_context(mem.at_batch_indices(indices))
            yield self
