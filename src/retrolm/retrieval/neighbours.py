"""Each chunk's nearest chunks from *other* documents (RETRO paper §2.3, leakage rule).

A chunk's neighbour list excludes the chunk itself and every chunk of its own document
(its continuation would leak the answer). K = neighbours + extra_neighbours columns are
stored, sorted by distance, so that the training dataset can drop more of them (every
document a packed training sequence touches) and still keep ``neighbours`` of them.

``-1`` marks a missing neighbour and appears only when it is justified: with an exact
index, fewer than K chunks belong to other documents; with an approximate index, the
probed part of the index held no more candidates. Never wrapped to another chunk.

Shapes: B = query block, F = candidates fetched, K = stored columns.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from retrolm.retrieval.index import IndexSpec, Searcher
from retrolm.retrieval.store import INDEX_FILE, RowFile, _Blocks, read_whole


def first_k_kept(ids: np.ndarray, dists: np.ndarray, keep: np.ndarray, k: int):
    """Per row, the first ``k`` candidates where ``keep`` is True, in their given order.

    ids/dists/keep ``(B, F)`` -> ids int32 ``(B, k)`` (−1 padded), dists float32 ``(B, k)``.
    """
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept first, order preserved
    out_ids = np.take_along_axis(ids, order, 1)
    out_d = np.take_along_axis(dists, order, 1)
    kept = np.take_along_axis(keep, order, 1)
    if out_ids.shape[1] < k:  # fewer candidates than columns
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.inf)
        kept = np.pad(kept, ((0, 0), (0, pad)), constant_values=False)
    return (
        np.where(kept, out_ids, -1).astype(np.int32),
        np.where(kept, out_d, np.inf).astype(np.float32),
    )


def search_excluding(
    searcher: Searcher,
    x: np.ndarray,
    k: int,
    excluded,
    first_fetch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of queries ``x (B, d)`` after dropping candidates ``excluded(rows, ids)`` marks.

    ``excluded(rows (b,), ids (b, F)) -> bool (b, F)``. Rows short of k candidates are
    searched again with 4× as many until the index has no more to give.
    Returns ids int32 ``(B, k)`` and squared L2 distances float32 ``(B, k)``.
    """
    n = searcher.ntotal
    out_i = np.full((len(x), k), -1, dtype=np.int32)
    out_d = np.full((len(x), k), np.inf, dtype=np.float32)
    rows = np.arange(len(x))
    fetch = min(n, first_fetch or (2 * k + 16))
    while len(rows):
        ids, dists = searcher.search(x[rows], fetch)  # (b, F)
        keep = (ids >= 0) & ~excluded(rows, np.maximum(ids, 0))
        out_i[rows], out_d[rows] = first_k_kept(ids, dists, keep, k)
        exhausted = (ids < 0).any(1) | (fetch >= n)  # the index has nothing more to offer
        short = (keep.sum(1) < k) & ~exhausted
        rows, fetch = rows[short], min(n, fetch * 4)
    return out_i, out_d


def neighbours_block(
    searcher: Searcher,
    embeddings: np.ndarray,
    doc_ids: np.ndarray,
    start: int,
    stop: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of chunks ``start:stop``: ids int32 ``(B, k)`` and distances ``(B, k)``."""
    x = np.ascontiguousarray(embeddings[start:stop], dtype=np.float32)  # (B, d)
    query_docs = np.asarray(doc_ids[start:stop])  # (B,)

    def same_document(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return doc_ids[ids] == query_docs[rows, None]  # also drops the chunk itself

    return search_excluding(searcher, x, k, same_document)


class NeighbourSearch:
    """What the neighbour stage reads and writes, opened once: the index (with exact
    re-ranking for approximate kinds), the keys, the document ids and the two output
    files; ``block(i)`` fills row block ``i`` and marks it done (here or on a Ray actor)."""

    def __init__(self, db_dir: Path, manifest: dict):
        from retrolm.retrieval.index import load_index

        arrays = manifest["arrays"]
        self.k = manifest["num_neighbour_columns"]
        spec = IndexSpec(**{f.name: manifest["index"][f.name] for f in fields(IndexSpec)})
        self.emb = RowFile(db_dir, arrays["embeddings"])  # (N, d), queries read in blocks
        rerank = None if spec.exact else self.emb  # candidates gathered through a transient map
        self.searcher = Searcher(load_index(db_dir / INDEX_FILE, spec), spec, rerank)
        self.doc_ids = read_whole(db_dir, arrays["doc_ids"])  # (N,) in RAM, no map left open
        self.ids_out = RowFile(db_dir, arrays["neighbours"], writable=True)  # (N, K)
        self.d_out = RowFile(db_dir, arrays["neighbour_dists"], writable=True)  # (N, K)

    def block(self, i: int, blocks: _Blocks) -> None:
        s, e = blocks.rows(i)
        ids, dists = neighbours_block(self.searcher, self.emb, self.doc_ids, s, e, self.k)
        self.ids_out.write(s, ids)
        self.d_out.write(s, dists)
        blocks.mark(i)

    def close(self) -> None:
        for f in (self.ids_out, self.d_out, self.emb):
            f.close()
