"""faiss index choice and search: exact == brute force, approximate keeps recall."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.retrieval.index import (
    FLAT_MAX_N,
    MIN_POINTS_PER_LIST,
    TRAIN_MAX,
    Searcher,
    build_index,
    choose_index,
    parse_size,
    sample_rows,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around cluster centres, like text embeddings (topics)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return unit(centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d)))


def brute_force(x: np.ndarray, q: np.ndarray, k: int):
    d2 = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d2, ids, 1)


def test_exact_search_equals_brute_force():
    x, q = clustered(1500, seed=0), clustered(100, seed=1)
    spec = choose_index(len(x), x.shape[1])
    assert spec.kind == "flat" and spec.exact
    ids, dists = Searcher(build_index(spec, x), spec, x).search(q, 10)
    ref_ids, ref_d = brute_force(x, q, 10)
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == (100, 10)
    np.testing.assert_allclose(dists, ref_d, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.999  # identical except possible exact ties
    assert np.all(np.diff(dists, axis=1) >= 0)


def test_asking_for_more_than_n_pads_with_minus_one():
    x = clustered(5)
    spec = choose_index(5, x.shape[1])
    ids, dists = Searcher(build_index(spec, x), spec, x).search(x[:2], 8)
    assert (ids[:, 5:] == -1).all() and np.isinf(dists[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == list(range(5))


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_recall_at_2(kind):
    x, q = clustered(4000, seed=2), clustered(300, seed=3)
    spec = choose_index(len(x), x.shape[1], kind)
    searcher = Searcher(build_index(spec, x), spec, x)
    ids, _ = searcher.search(q, 2)
    ref, _ = brute_force(x, q, 2)
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(ids.tolist(), ref.tolist())])
    assert recall >= 0.9, (kind, spec, recall)


def test_choice_by_size_and_budget():
    assert choose_index(1000, 384).kind == "flat"
    assert choose_index(FLAT_MAX_N + 1, 384, memory_budget=8 << 30).kind == "ivf"
    big = choose_index(10_000_000, 384, memory_budget=4 << 30)
    assert big.kind == "ivfpq" and big.factory.startswith("OPQ")
    assert 10_000_000 * (int(big.factory.split(",PQ")[-1].split("x")[0]) + 8) <= 4 << 30
    for n in (1, 10, 100, 5000, 10**6):  # never more lists than the data can train
        spec = choose_index(n, 64, "ivf")
        nlist = int(spec.factory[3:].split(",")[0])
        assert nlist == 1 or n // nlist >= MIN_POINTS_PER_LIST
        assert spec.nprobe <= nlist and spec.train_size <= n


@pytest.mark.parametrize("n", [3 * 10**6, 30 * 10**6, 10**9])
def test_training_sample_is_capped_and_trains_every_list(n):
    """The sample never exceeds TRAIN_MAX rows, whatever N, and still gives every list
    the 39 points faiss's k-means needs (nlist is capped instead)."""
    for kind in ("ivf", "ivfpq"):
        spec = choose_index(n, 384, kind, memory_budget=1 << 40)
        assert spec.train_size <= TRAIN_MAX
        assert spec.train_size // spec.nlist >= MIN_POINTS_PER_LIST, spec


@pytest.mark.parametrize("n,m", [(10, 10), (10, 3), (1, 1), (5, 1), (10**6, 402_700), (7, 20)])
def test_sample_rows_are_evenly_spaced_and_increasing(n, m):
    rows = sample_rows(n, m)
    assert len(rows) == min(n, m) and rows[0] == 0 and rows.dtype == np.int64
    assert (np.diff(rows) >= 1).all() and (len(rows) == 1 or rows[-1] == n - 1)
    ref = np.floor(np.linspace(0, n - 1, min(n, m)) + 1e-9).astype(np.int64)  # exact here
    assert np.abs(rows - ref).max(initial=0) <= 1


def test_nprobe_is_an_explicit_option_of_the_choice():
    default = choose_index(10**6, 384, "ivf")
    assert default.nprobe == default.nlist // 8
    assert choose_index(10**6, 384, "ivf", nprobe=16).nprobe == 16
    assert choose_index(10**6, 384, "auto", 8 << 30, nprobe=16).nprobe == 16
    assert choose_index(1000, 384, "auto", nprobe=16).kind == "flat"  # auto: only with lists
    assert (
        choose_index(1000, 384, "ivf", nprobe=10**6).nprobe == choose_index(1000, 384, "ivf").nlist
    )
    for kind, nprobe in (("flat", 4), ("hnsw", 4), ("ivf", -1)):
        with pytest.raises(ValueError, match=f"nprobe={nprobe}"):
            choose_index(10**6, 384, kind, nprobe=nprobe)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_search_in_query_parts_equals_one_call(kind, monkeypatch):
    x, q = clustered(3000, seed=4), clustered(230, seed=5)
    spec = choose_index(len(x), x.shape[1], kind)
    searcher = Searcher(build_index(spec, x), spec, x)
    whole = searcher.search(q, 6)
    monkeypatch.setattr("retrolm.retrieval.index.SEARCH_ROWS", 50)  # 5 parts of 46
    parts = searcher.search(q, 6)
    np.testing.assert_array_equal(parts[0], whole[0])
    np.testing.assert_allclose(parts[1], whole[1], atol=1e-6)


def test_tiny_ivf_builds_and_searches():
    x = clustered(30)  # fewer points than one list's floor: one list, still exact-ish
    spec = choose_index(len(x), x.shape[1], "ivf")
    ids, _ = Searcher(build_index(spec, x), spec, x).search(x[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_parse_size_and_errors():
    assert parse_size("4G") == 4 << 30 and parse_size("512M") == 512 << 20
    assert parse_size("1.5k") == 1536 and parse_size("100") == 100 and parse_size("2GB") == 2 << 30
    with pytest.raises(ValueError, match="memory budget 'lots' is not a size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="index kind 'annoy' is not one of"):
        choose_index(10, 8, "annoy")
    with pytest.raises(ValueError, match="raise --memory-budget"):
        choose_index(10**9, 384, "ivfpq", memory_budget=1 << 20)


def test_autofaiss_is_optional():
    import importlib.util

    from retrolm.retrieval.index import IndexSpec

    if importlib.util.find_spec("autofaiss"):
        pytest.skip("autofaiss installed")
    with pytest.raises(ValueError, match=r"pip install 'retrolm\[autofaiss\]'"):
        build_index(IndexSpec("autofaiss", "autofaiss"), clustered(10))
