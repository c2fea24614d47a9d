"""How good is the index? Recall@k of what a search returns against exact search.

``check_index`` takes a sample of the database's own chunks as queries (their stored
keys), asks the searcher for the k nearest other chunks (the chunk itself left out) and
compares with a brute-force numpy search over every stored key: recall@k is the share of
the exact k found, averaged over the queries. What is measured is what retrieval returns:
an approximate index's candidates after their exact re-ranking (``index.Searcher``). An
exact index, or an IVF index searched with nprobe = nlist, scores 1.0.

Shapes: Q sampled queries, N stored keys, d dims, k results.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from retrolm.retrieval.index import Searcher

TIE = 1e-6  # distances this close to the exact k-th count as ties (unit keys: d² in [0, 4])
EXACT_BLOCK = 16384  # stored keys per brute-force block (Q x block distances at a time)


@dataclass
class IndexCheck:
    """The report of ``check_index`` (``retrolm db check``)."""

    kind: str
    factory: str
    ntotal: int
    nprobe: int
    ef_search: int
    k: int
    queries: int
    recall: float
    """Mean over queries of the share of the k found whose distance is within the exact k
    nearest (a key tied with the exact k-th counts: ties have no single right answer)."""
    ms_per_query: float
    """Wall time of the index search (with re-ranking), per query."""
    exact_ms_per_query: float
    """Wall time of the brute-force numpy search, per query."""

    def to_json(self) -> dict:
        return asdict(self)


def sample_rows(n: int, sample: int, seed: int = 0) -> np.ndarray:
    """``min(sample, n)`` distinct row ids, sorted, drawn with ``seed``."""
    if sample < 1:
        raise ValueError(f"--sample {sample} must be at least 1")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(sample, n), replace=False)).astype(np.int64)


def exact_search(embeddings: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest keys of ``x (Q, d)`` among ``embeddings (N, d)``, read in blocks:
    ids int64 ``(Q, k)`` (−1 past N), squared L2 float32 ``(Q, k)``, sorted by (distance, id).

    Candidates come from the expanded form |x|² − 2x·e + |e|²; the final distances and
    order use the elementwise sum the searcher re-ranks with, so near-ties break alike."""
    n = len(embeddings)
    keep = min(n, k + 8)  # a margin for rounding in the expanded form
    x = np.ascontiguousarray(x, dtype=np.float32)
    best_d = np.full((len(x), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(x), 0), dtype=np.int64)
    for s in range(0, n, EXACT_BLOCK):
        e = np.ascontiguousarray(embeddings[s : s + EXACT_BLOCK], dtype=np.float32)  # (B, d)
        d2 = (x * x).sum(1)[:, None] - 2 * x @ e.T + (e * e).sum(1)[None]  # (Q, B)
        ids = np.broadcast_to(np.arange(s, s + len(e)), d2.shape)
        cand_d, cand_i = np.concatenate([best_d, d2], 1), np.concatenate([best_i, ids], 1)
        top = np.argsort(cand_d, axis=1, kind="stable")[:, :keep]
        best_d = np.take_along_axis(cand_d, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    d = distances(embeddings, x, best_i)  # (Q, keep)
    order = np.lexsort((best_i, d), axis=-1)[:, :k]
    ids, dists = np.take_along_axis(best_i, order, 1), np.take_along_axis(d, order, 1)
    if ids.shape[1] < k:
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
        dists = np.pad(dists, ((0, 0), (0, k - dists.shape[1])), constant_values=np.inf)
    return ids, dists


def distances(embeddings: np.ndarray, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Squared L2 from each query ``x (Q, d)`` to its keys ``ids (Q, F)`` (inf where −1)."""
    uniq = np.unique(ids[ids >= 0])
    vecs = np.asarray(embeddings[uniq], dtype=np.float32)  # sorted reads
    rows = np.searchsorted(uniq, np.maximum(ids, 0)).clip(0, max(len(uniq) - 1, 0))
    d = ((vecs[rows] - x[:, None, :]) ** 2).sum(-1) if len(uniq) else np.zeros(ids.shape)
    return np.where(ids >= 0, d, np.inf).astype(np.float32)


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids without the query's own id (``(Q, k+1)`` -> ``(Q, k)``)."""
    own = ids == rows[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # others first, order kept
    return np.take_along_axis(ids, order, 1)


def check_index(
    searcher: Searcher, embeddings: np.ndarray, *, sample: int = 1000, k: int = 10, seed: int = 0
) -> IndexCheck:
    """Recall@k and query time of ``searcher`` on ``sample`` of its own stored keys."""
    if k < 1:
        raise ValueError(f"-k {k} must be at least 1")
    n = len(embeddings)
    rows = sample_rows(n, sample, seed)
    x = np.asarray(embeddings[rows], dtype=np.float32)  # (Q, d)
    kk = min(k, n - 1)
    t0 = time.perf_counter()
    found, _ = searcher.search(x, kk + 1)
    t1 = time.perf_counter()
    exact, _ = exact_search(embeddings, x, kk + 1)
    t2 = time.perf_counter()
    found, exact = _drop_self(found, rows, kk), _drop_self(exact, rows, kk)
    kth = distances(embeddings, x, exact).max(1, initial=0.0)  # (Q,) the exact k-th distance
    hits = (distances(embeddings, x, found) <= kth[:, None] + TIE).sum(1)  # -1 ids are inf
    spec = searcher.spec
    return IndexCheck(
        kind=spec.kind,
        factory=spec.factory,
        ntotal=searcher.ntotal,
        nprobe=spec.nprobe,
        ef_search=spec.ef_search,
        k=kk,
        queries=len(rows),
        recall=float(np.mean(hits) / max(kk, 1)),
        ms_per_query=1e3 * (t1 - t0) / len(rows),
        exact_ms_per_query=1e3 * (t2 - t1) / len(rows),
    )
