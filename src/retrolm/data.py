"""Training sequences: with their retrieved neighbours from a database (paper §2.3,
research A.4, A.11), or plain windows of a text folder for families without retrieval.

Notation: m = chunk size, n = sequence length (a multiple of m), l = n / m chunks,
k = neighbours kept per chunk, K = candidates stored per chunk (k + extra), N = chunks.

A training sequence is l consecutive database chunks starting at one of the
database's ``seq_starts`` (sequences may pack several documents) plus one extra
token: the "+1" column of its last chunk. Neighbour candidates are precomputed
by the database (already without the chunk itself and its own document); here we
also drop candidates from *every* document the sequence touches — otherwise chunk
u could retrieve chunk u+1 of a packed neighbour document and break causality —
and keep the first k survivors, in distance order, padding with -1 (masked).

Two constructors:
- ``RETRODataset(db, seq_len=..., num_neighbours=...)`` over a ``RetrievalDatabase``
  (or its directory): items ``(seq (n+1,), retrieved (l, k, 2m), neighbour_mask (l, k))``.
- the seed's mock-memmap form ``RETRODataset(num_sequences=..., num_chunks=...,
  num_neighbors=..., chunk_size=..., seq_len=..., chunk_memmap_path=...,
  chunk_nn_memmap_path=..., seq_memmap_path=...)``: items ``(seq, retrieved)``. Files are
  opened read-only; a sequence running past the last chunk is padded, never grown.

Without retrieval (``TextData`` -> ``TextCorpus`` -> ``TextDataset``): the same sequences
with one chunk of n tokens, read straight from the text folder (no database): each
document's tokens and its ``<eos>`` cut into windows of n tokens plus the next token of
the same document, ``<pad>`` after its end, so no window crosses a document end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class _SeedMemmaps:
    """The seed's raw memmap files seen through the database interface used below.

    No document ids exist in this form, so nothing is filtered; a neighbour's
    continuation is simply the next row (pad after the last row).
    """

    def __init__(
        self,
        *,
        num_chunks: int,
        num_neighbors: int,
        num_sequences: int,
        chunk_size: int,
        chunk_memmap_path: str | os.PathLike,
        chunk_nn_memmap_path: str | os.PathLike,
        seq_memmap_path: str | os.PathLike,
        pad_id: int = 0,
    ):
        self.chunk_size = chunk_size
        self.pad_id = pad_id
        self.doc_ids = None
        self.chunks = _open_ro(chunk_memmap_path, (num_chunks, chunk_size + 1), "chunk_memmap_path")
        self.neighbours = _open_ro(
            chunk_nn_memmap_path, (num_chunks, num_neighbors), "chunk_nn_memmap_path"
        )
        self.seq_starts = _open_ro(seq_memmap_path, (num_sequences,), "seq_memmap_path")
        self.num_chunks = num_chunks

    def retrieved_tokens(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        m, n_chunks = self.chunk_size, self.num_chunks
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        out = np.full(ids.shape + (2 * m,), self.pad_id, dtype=np.int64)
        out[..., :m] = self.chunks[safe.ravel(), :m].reshape(ids.shape + (m,))
        has_next = valid & (safe + 1 < n_chunks)
        nxt = np.where(has_next, safe + 1, 0)
        cont = self.chunks[nxt.ravel(), :m].reshape(ids.shape + (m,))
        out[..., m:] = np.where(has_next[..., None], cont, self.pad_id)
        out[~valid] = self.pad_id
        return torch.from_numpy(out), torch.from_numpy(valid)


def _open_ro(path: str | os.PathLike, shape: tuple[int, ...], what: str) -> np.memmap:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist; write it first (np.memmap, int32)")
    need = int(np.prod(shape)) * 4
    have = path.stat().st_size
    if have < need:
        raise ValueError(
            f"{what}: {path} holds {have} bytes but shape {shape} int32 needs {need}; "
            "check num_chunks/num_sequences/num_neighbors/chunk_size"
        )
    # mode 'r': never 'r+' (which lets a shape past the end silently grow the file)
    return np.memmap(path, dtype=np.int32, mode="r", shape=shape)


def select_neighbours(
    candidates: np.ndarray, cand_docs: np.ndarray | None, seq_docs: np.ndarray, k: int
) -> np.ndarray:
    """First k candidates per row that exist and come from none of ``seq_docs``.

    candidates: (l, K) chunk ids, -1 = none, in distance order; cand_docs: (l, K) their
    document ids (None = no document information). Returns (l, k) int64 with -1 padding.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    valid = candidates >= 0
    if cand_docs is not None and len(seq_docs):
        valid &= ~np.isin(cand_docs, seq_docs)
    # stable sort puts surviving candidates first, keeping their distance order
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, order, axis=1)
    ok = np.take_along_axis(valid, order, axis=1)
    ids = np.where(ok, ids, -1)
    if ids.shape[1] < k:  # fewer stored candidates than requested
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    return ids


class RETRODataset(Dataset):
    """Sequences (n+1 tokens) with k neighbours per chunk; see the module docstring."""

    def __init__(
        self,
        db: Any = None,
        *,
        seq_len: int | None = None,
        num_neighbours: int | None = None,
        return_mask: bool | None = None,
        # the seed's mock-memmap form
        num_sequences: int | None = None,
        num_chunks: int | None = None,
        num_neighbors: int | None = None,
        chunk_size: int | None = None,
        chunk_memmap_path: str | os.PathLike | None = None,
        chunk_nn_memmap_path: str | os.PathLike | None = None,
        seq_memmap_path: str | os.PathLike | None = None,
        pad_id: int = 0,
    ):
        seed_form = chunk_memmap_path is not None
        if seed_form:
            if db is not None:
                raise ValueError("pass either a database or the seed's memmap paths, not both")
            missing = [
                name
                for name, v in dict(
                    num_sequences=num_sequences,
                    num_chunks=num_chunks,
                    num_neighbors=num_neighbors,
                    chunk_size=chunk_size,
                    seq_len=seq_len,
                    chunk_nn_memmap_path=chunk_nn_memmap_path,
                    seq_memmap_path=seq_memmap_path,
                ).items()
                if v is None
            ]
            if missing:
                raise ValueError(f"the memmap form of RETRODataset also needs {missing}")
            db = _SeedMemmaps(
                num_chunks=num_chunks,
                num_neighbors=num_neighbors,
                num_sequences=num_sequences,
                chunk_size=chunk_size,
                chunk_memmap_path=chunk_memmap_path,
                chunk_nn_memmap_path=chunk_nn_memmap_path,
                seq_memmap_path=seq_memmap_path,
                pad_id=pad_id,
            )
            num_neighbours = num_neighbors if num_neighbours is None else num_neighbours
            return_mask = False if return_mask is None else return_mask
        else:
            if db is None:
                raise ValueError("RETRODataset needs a database (or the seed's memmap paths)")
            if isinstance(db, (str, os.PathLike)):
                from retrolm.retrieval import RetrievalDatabase

                db = RetrievalDatabase.open(db)
            num_neighbours = 2 if num_neighbours is None else num_neighbours
            return_mask = True if return_mask is None else return_mask
            tok = getattr(db, "tokenizer", None)
            pad_id = getattr(tok, "pad_id", pad_id)
        m = int(db.chunk_size)
        if seq_len is None or seq_len <= 0 or seq_len % m:
            raise ValueError(
                f"seq_len must be a positive multiple of chunk_size {m}, got {seq_len}"
            )
        stored = int(db.neighbours.shape[1])
        if num_neighbours < 0:
            raise ValueError(f"num_neighbours must be >= 0, got {num_neighbours}")
        if num_neighbours > stored:
            raise ValueError(
                f"num_neighbours={num_neighbours} but the database stores {stored} candidates "
                "per chunk; rebuild it with more neighbours or ask for fewer"
            )
        self.db = db
        self.chunk_size = m
        self.seq_len = int(seq_len)
        self.num_neighbours = int(num_neighbours)
        self.return_mask = bool(return_mask)
        self.pad_id = int(pad_id)
        self.num_chunks = int(db.chunks.shape[0])
        self.seq_starts = db.seq_starts

    def __len__(self) -> int:
        return len(self.seq_starts)

    def chunk_ids(self, index: int) -> np.ndarray:
        """The l database chunk ids of sequence ``index`` (ids >= num_chunks mean padding)."""
        start = int(self.seq_starts[index])
        return np.arange(start, start + self.seq_len // self.chunk_size)

    def neighbour_ids(self, index: int) -> np.ndarray:
        """(l, k) chunk ids retrieved for sequence ``index`` after document filtering."""
        ids = self.chunk_ids(index)
        real = ids[ids < self.num_chunks]
        l, k = len(ids), self.num_neighbours
        out = np.full((l, k), -1, dtype=np.int64)
        if len(real) == 0 or k == 0:
            return out
        cands = np.asarray(self.db.neighbours[real[0] : real[-1] + 1], dtype=np.int64)
        doc_ids = self.db.doc_ids
        if doc_ids is None:
            cand_docs, seq_docs = None, np.empty(0, dtype=np.int64)
        else:
            seq_docs = np.unique(np.asarray(doc_ids[real[0] : real[-1] + 1]))
            # a neighbour set's candidates live in another corpus, with their own document
            # keys (``retrieval.query.NeighbourSet``); a database's are its own chunks
            cand_doc_ids = getattr(self.db, "candidate_doc_ids", doc_ids)
            cand_docs = np.asarray(cand_doc_ids[np.where(cands >= 0, cands, 0).ravel()])
            cand_docs = cand_docs.reshape(cands.shape)
        out[: len(real)] = select_neighbours(cands, cand_docs, seq_docs, k)
        return out

    def __getitem__(self, index: int):
        m, l = self.chunk_size, self.seq_len // self.chunk_size
        ids = self.chunk_ids(index)
        real = ids < self.num_chunks
        rows = np.full((l, m + 1), self.pad_id, dtype=np.int64)
        if real.any():
            first, last = int(ids[real][0]), int(ids[real][-1])
            rows[: last - first + 1] = self.db.chunks[first : last + 1]
        # the +1 token: the next token of the last chunk's own document (pad if it ended)
        seq = np.concatenate([rows[:, :m].reshape(-1), rows[-1, m:]])
        nbr = self.neighbour_ids(index)
        if self.num_neighbours:
            retrieved, mask = self.db.retrieved_tokens(nbr)
            retrieved, mask = torch.as_tensor(retrieved).long(), torch.as_tensor(mask).bool()
        else:
            retrieved = torch.zeros(l, 0, 2 * m, dtype=torch.long)
            mask = torch.zeros(l, 0, dtype=torch.bool)
        seq_t = torch.from_numpy(seq)
        if self.return_mask:
            return seq_t, retrieved, mask
        return seq_t, retrieved


# ---- plain text, for families without retrieval --------------------------------------------
@dataclass(frozen=True)
class TextData:
    """What a run without retrieval trains on: a folder of documents and how to tokenize
    them (``retrolm train --text DIR``). The training loop makes the run's tokenizer from
    it (``tokenizer``: a tokenizer.json to use; None: train a byte-level BPE of
    ``vocab_size`` on the folder) and keeps it as ``RUN/tokenizer.json``."""

    path: str | os.PathLike
    glob: str = "**/*.txt"
    tokenizer: str | os.PathLike | None = None
    vocab_size: int | None = None
    """Default 16384 (as ``db build``); only when the tokenizer is trained."""

    def __post_init__(self) -> None:
        if self.tokenizer is not None and self.vocab_size is not None:
            raise ValueError(
                "pass a tokenizer or a vocab_size to train one, not both "
                "(drop --vocab-size: a given tokenizer has its own vocabulary)"
            )

    def documents(self) -> list[Path]:
        from retrolm.retrieval.chunking import list_documents

        return list_documents(self.path, self.glob)


@dataclass
class TextCorpus:
    """A text folder with the tokenizer that reads it: the data source of a run without
    retrieval, standing where a database stands (``tokenizer``, ``chunk_size``)."""

    path: Path
    tokenizer: Any  # an LMTokenizer
    glob: str = "**/*.txt"
    chunk_size: int = 1  # windows align to tokens: no retrieval chunks

    def identity(self) -> dict[str, Any]:
        """What a trained run depends on: the files (count, bytes, digest of their list with
        sizes and modification times) and the tokenizer; a resume needs the same."""
        from retrolm.retrieval import inputs
        from retrolm.retrieval.chunking import list_documents

        root = Path(self.path)
        listing = inputs.list_inputs(list_documents(root, self.glob), root)
        summary = inputs.summary(listing)
        return {
            "path": str(root.resolve()),
            "glob": self.glob,
            "files": summary["files"],
            "bytes": summary["bytes"],
            "sha256": summary["sha256"],
            "tokenizer_hash": self.tokenizer.hash,
            "vocab_size": int(self.tokenizer.vocab_size),
        }

    def dataset(self, seq_len: int) -> TextDataset:
        return TextDataset(self.path, self.tokenizer, seq_len=seq_len, glob=self.glob)


class TextDataset(Dataset):
    """Windows of ``seq_len`` + 1 tokens that never cross a document end (module docstring);
    items ``(seq (n+1,),)``: what ``RETRODataset`` gives without neighbours."""

    def __init__(
        self, text_dir: str | os.PathLike, tokenizer: Any, *, seq_len: int, glob: str = "**/*.txt"
    ):
        from retrolm.retrieval.chunking import corpus_rows, list_documents

        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        root = Path(text_dir)
        rows, doc_ids, report = corpus_rows(list_documents(root, glob), root, tokenizer, seq_len)
        self.rows = torch.from_numpy(rows)  # (N, n+1)
        self.doc_ids = doc_ids  # (N,): the document of each window
        self.report = report
        self.seq_len = int(seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (self.rows[index],)
