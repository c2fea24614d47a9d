"""faiss inner-product indexes whose ids name ring-buffer slots (the kNN memory of
``retrolm.nn.knn_memory``): one id per pair, ``add_with_ids`` for new pairs and ``remove_ids``
for evicted ones, so the index never needs a reset and an id always names the pair its slot
holds. Flat: ``IndexIDMap2`` over ``IndexFlatIP``. IVF: the IVF index itself, which stores
the ids it is given (an ``IndexIDMap2`` over IVF fails faiss's own check in ``remove_ids``,
since IVF does not renumber the vectors it keeps). Imported on first use only.

Shapes: n pairs, d dims, Q queries, k results.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MIN_POINTS_PER_LIST = 39  # faiss k-means trains badly below this many points per list


def make_id_index(d: int, kind: str = "flat", lists: int = 64):
    """An empty ``IndexIDMap2(IndexFlatIP(d))``, or ``IVF{lists},Flat`` (inner product, ids
    kept by the IVF lists; trained by ``add_pairs`` once the row holds enough pairs)."""
    import faiss  # here, not at the top: the models import without faiss

    if kind == "flat":
        inner = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        ivf = faiss.index_factory(d, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(ivf).nprobe = max(lists // 4, 1)
        return ivf
    else:
        raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
    return faiss.IndexIDMap2(inner)  # (the wrapper keeps a reference to `inner`)


def add_pairs(
    index,
    keys: np.ndarray,  # (n, d) float32, the new valid pairs' keys
    ids: np.ndarray,  # (n,) int64
    evicted: np.ndarray,  # (e,) int64 ids leaving the ring
    held: Callable[[], tuple[np.ndarray, np.ndarray]],  # -> (ids, keys) the ring holds now
) -> None:
    """Remove ``evicted`` and add ``keys`` under ``ids``. An untrained IVF index is trained on
    everything the ring holds once that is enough (``held`` already includes the new pairs)."""
    import faiss  # here, not at the top: the models import without faiss

    if not index.is_trained:
        all_ids, all_keys = held()
        lists = faiss.extract_index_ivf(index).nlist
        if len(all_ids) >= MIN_POINTS_PER_LIST * lists:
            index.train(np.ascontiguousarray(all_keys, dtype=np.float32))
            index.add_with_ids(np.ascontiguousarray(all_keys, dtype=np.float32), all_ids)
        return
    if len(evicted):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(evicted, dtype=np.int64)))
    if len(ids):
        index.add_with_ids(
            np.ascontiguousarray(keys, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
        )


def search_ids(index, queries: np.ndarray, k: int) -> np.ndarray | None:
    """(Q, k) ids of the largest inner products, best first, -1 where fewer exist; None while
    the index is untrained (the caller searches exactly)."""
    if not index.is_trained:
        return None
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids
