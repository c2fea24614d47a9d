"""``retrolm db plan``: the build's own index choice, index bytes equal to built indexes,
times that scale as the model says, one-line errors; and the streaming stages' memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.retrieval import plan
from retrolm.retrieval.index import (
    FLAT_MAX_N,
    IndexSpec,
    Searcher,
    add_vectors,
    build_index,
    choose_index,
    train_index,
)
from retrolm.retrieval.neighbours import neighbours_block
from retrolm.retrieval.store import RowFile, array_info

from .test_index import clustered

D = 384
RATES = {  # every coefficient present; the values only need to be distinct and positive
    "cpu": "test CPU",
    "cores": 2,
    "date": "2026-12-07",
    "dim": D,
    "measured": [{"num_chunks": 1_000_000}],
    "stages": {
        "chunk": {"s_per_unit": 3e-4, "working_bytes": 300 << 20},
        "embed": {"s_per_unit": 2e-2, "fixed_s": 20.0, "working_bytes": 700 << 20},
        "train": {"s_per_unit": 2e-11, "working_bytes": 250 << 20},
        "add": {"s_per_chunk": 3e-6, "s_per_unit": 2e-11, "working_bytes": 300 << 20},
        "neighbours": {
            "fixed_s": 1.0,
            "s_per_unit_flat": 4e-11,
            "s_per_unit_ivf": 9e-11,
            "working_bytes": 280 << 20,
        },
    },
}


def stage(p: plan.BuildPlan, name: str) -> plan.StagePlan:
    return next(s for s in p.stages if s.stage == name)


@pytest.mark.parametrize("kind", ["auto", "flat", "ivf", "ivfpq", "hnsw"])
def test_the_plan_chooses_the_builds_index_over_a_sweep_of_sizes(kind):
    for n in np.unique(np.geomspace(1, 30_000_000, 40).astype(int)):
        for budget in (1 << 30, 4 << 30, 64 << 30):
            want = choose_index(int(n), D, kind, budget)
            got = plan.plan_build(int(n), budget, index=kind, rates=RATES)
            assert got.index == want.to_json(), (n, budget)
    kinds = {plan.plan_build(n, "4G", rates=RATES).index["kind"] for n in (1e5, 1e6, 3e7)}
    assert kinds == {"flat", "ivf", "ivfpq"}  # 30M chunks do not fit 4G unless quantized


@pytest.mark.parametrize(
    "kind,n,d",
    [("flat", 3000, 32), ("ivf", 6000, 32), ("ivfpq", 6000, 32), ("hnsw", 3000, 32)],
)
def test_index_bytes_equal_a_built_index_within_one_percent(kind, n, d):
    import faiss

    x = clustered(n, d)
    spec = choose_index(n, d, kind, 1 << 30)
    real = len(faiss.serialize_index(build_index(spec, x)))
    model = plan.index_bytes(spec, n, d)
    assert abs(real - model) <= 0.01 * real + 1024, (spec.factory, real, model)


def test_opq_index_bytes_count_the_rotation():
    import faiss

    n, d = 2000, 16
    spec = IndexSpec("ivfpq", "OPQ4,IVF16,PQ4x4np", nprobe=4, train_size=2000)
    x = clustered(n, d)
    index = faiss.index_factory(d, spec.factory)
    faiss.downcast_VectorTransform(index.chain.at(0)).niter = 2  # its size is all we check
    index.train(x)
    index.add(x)
    real = len(faiss.serialize_index(index))
    assert abs(real - plan.index_bytes(spec, n, d)) <= 0.01 * real + 1024


def test_times_scale_as_stated():
    a, b = (plan.plan_build(n, "64G", rates=RATES) for n in (100_000, 200_000))
    for name in ("chunk",):  # linear
        assert stage(b, name).seconds == pytest.approx(2 * stage(a, name).seconds)
    fixed = RATES["stages"]["embed"]["fixed_s"]
    assert stage(b, "embed").seconds - fixed == pytest.approx(
        2 * (stage(a, "embed").seconds - fixed)
    )
    fixed = RATES["stages"]["neighbours"]["fixed_s"]  # flat: N queries x N keys
    assert b.index["kind"] == "flat" and 2 * 100_000 <= FLAT_MAX_N
    assert stage(b, "neighbours").seconds - fixed == pytest.approx(
        4 * (stage(a, "neighbours").seconds - fixed)
    )
    one, four = (plan.plan_build(3_000_000, "64G", w, rates=RATES) for w in (1, 4))
    for s1, s4 in zip(one.stages, four.stages):
        fixed = RATES["stages"][s1.stage].get("fixed_s", 0.0)
        if s1.parallel:  # the blocks split over workers; the start-up does not
            assert s4.seconds_workers - fixed == pytest.approx((s1.seconds - fixed) / 4)
        else:
            assert s4.seconds_workers == s1.seconds
        assert s4.peak_bytes == s1.peak_bytes  # per worker
    assert one.index["kind"] == "ivf" and stage(one, "train").seconds > 0


def test_a_smaller_nprobe_plans_neighbours_proportionally_faster_and_says_so():
    full, small = (plan.plan_build("30M", "64G", rates=RATES, nprobe=p) for p in (0, 16))
    nlist, n = IndexSpec(**full.index).nlist, 30e6
    assert full.index["nprobe"] == nlist // 8 and small.index["nprobe"] == 16
    fixed = RATES["stages"]["neighbours"]["fixed_s"]

    def scan(p):  # per query: nlist centroid distances + p lists of n / nlist keys
        return nlist + p * n / nlist

    got = stage(small, "neighbours").seconds - fixed
    assert got / (stage(full, "neighbours").seconds - fixed) == pytest.approx(
        scan(16) / scan(nlist // 8)
    )
    assert any("nprobe 16 of" in note and "db check" in note for note in small.notes)
    assert not any("nprobe" in note for note in full.notes)


def test_memory_is_the_index_plus_each_stages_working_memory():
    p = plan.plan_build(30_000_000, "64G", rates=RATES)
    assert p.index["kind"] == "ivf" and p.index_bytes == plan.index_bytes(
        IndexSpec(**p.index), 30_000_000, D
    )
    nb = stage(p, "neighbours")
    assert nb.peak_bytes == (280 << 20) + p.index_bytes + 30_000_000 * 4
    assert p.build_peak_bytes == max(s.peak_bytes for s in p.stages)


def test_the_shipped_rates_plan_30m_chunks():
    rates = plan.load_rates()
    assert rates["cpu"] and rates["date"] and rates["dim"] == D
    p = plan.plan_build("30M", "16G", 8, rates=rates)
    assert p.num_chunks == 30_000_000 and p.index["kind"] == "ivfpq"
    assert all(s.seconds >= 0 for s in p.stages) and p.seconds_workers < p.seconds


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--chunks", "0", "--memory", "4G"], "out of range"),
        (["--chunks", "lots", "--memory", "4G"], "not a count"),
        (["--chunks", "1M", "--memory", "big"], "not a size"),
        (["--chunks", "30M", "--memory", "1M"], "too small"),
        (["--chunks", "1M", "--memory", "4G", "--workers", "0"], "at least 1"),
        (["--chunks", "1M", "--memory", "4G", "--rates", "/no/such.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, match):
    assert main(["db", "plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err, err


def test_db_plan_prints_the_choice_and_json(capsys, tmp_path):
    import json

    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps(RATES))
    assert main(["db", "plan", "--chunks", "1M", "--memory", "4G", "--rates", str(rates)]) == 0
    out = capsys.readouterr().out
    assert "IVF4000,Flat" in out and "test CPU" in out and "neighbours" in out
    argv = ["db", "plan", "--chunks", "1M", "--memory", "4G", "--workers", "3", "--json"]
    assert main([*argv, "--rates", str(rates)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["index"]["factory"] == "IVF4000,Flat" and got["workers"] == 3


# ---- the streaming stages -----------------------------------------------------------------
def keys_file(tmp_path, n: int, d: int = 32) -> RowFile:
    x = clustered(n, d, seed=n)
    x.tofile(tmp_path / f"k{n}.bin")
    return RowFile(tmp_path, array_info(f"k{n}.bin", np.float32, (n, d)))


def test_gather_equals_fancy_indexing(tmp_path, monkeypatch):
    rows = keys_file(tmp_path, 500)
    ids = np.random.default_rng(0).integers(0, 500, 300)  # unsorted, with repeats
    full = np.fromfile(tmp_path / "k500.bin", dtype=np.float32).reshape(500, 32)
    np.testing.assert_array_equal(rows[ids], full[ids])
    # sorted and distinct (read as given), runs of consecutive rows, across pieces
    runs = np.r_[0:40, 41, 43:200, 310:500]
    for piece in (7, 4096):
        monkeypatch.setattr("retrolm.retrieval.store.GATHER_ROWS", piece)
        np.testing.assert_array_equal(rows[runs], full[runs])
        np.testing.assert_array_equal(rows[np.arange(500)], full)
        np.testing.assert_array_equal(rows[ids], full[ids])
    assert rows[np.array([], dtype=np.int64)].shape == (0, 32)
    with pytest.raises(IndexError):
        rows[np.array([500])]
    short = RowFile(tmp_path, array_info("k500.bin", np.float32, (600, 32)))  # truncated
    with pytest.raises(OSError, match="truncated"):
        short[np.arange(490, 510)]


def test_train_plus_add_is_build_index_and_rowfile_reranking_equals_memmap(tmp_path):
    import faiss

    rows = keys_file(tmp_path, 4000)
    full = np.memmap(rows.path, dtype=np.float32, mode="r", shape=rows.shape)
    spec = choose_index(4000, 32, "ivf")
    split = train_index(spec, rows)
    add_vectors(split, spec, rows, block_size=512)
    whole = build_index(spec, np.asarray(full))
    assert faiss.serialize_index(split).tobytes() == faiss.serialize_index(whole).tobytes()
    doc_ids = np.arange(4000) // 7
    a = neighbours_block(Searcher(split, spec, rows), rows, doc_ids, 0, 300, 8)
    b = neighbours_block(Searcher(whole, spec, full), full, doc_ids, 0, 300, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def traced_peak(fn, *args, **kwargs) -> int:
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_index_add_and_neighbour_blocks_keep_memory_flat_as_the_keys_grow(tmp_path):
    """Peak Python/numpy memory of adding all keys, and of one query block, at N and 8N
    (faiss's own C++ memory, the index itself, is not traced: it is the product)."""
    peaks = {}
    for n in (2048, 16384):
        rows = keys_file(tmp_path, n)
        spec = choose_index(n, 32, "ivf")
        index = train_index(spec, rows)
        add = traced_peak(add_vectors, index, spec, rows, block_size=1024)
        searcher, docs = Searcher(index, spec, rows), np.arange(n) // 5
        query = traced_peak(neighbours_block, searcher, rows, docs, 0, 512, 8)
        peaks[n] = (add, query)
    for small, big in zip(peaks[2048], peaks[16384]):
        assert big <= 1.2 * small, peaks


def test_reranking_in_pieces_equals_reranking_at_once(monkeypatch):
    from retrolm.retrieval import index as index_module

    x = clustered(5000, 32)
    spec = choose_index(5000, 32, "ivf")
    searcher = Searcher(build_index(spec, x), spec, x)
    monkeypatch.setattr(index_module, "RERANK_ROWS", 7)
    pieces = searcher.search(x[:100], 12)
    monkeypatch.setattr(index_module, "RERANK_ROWS", 10**9)
    whole = searcher.search(x[:100], 12)
    for a, b in zip(pieces, whole):
        np.testing.assert_array_equal(a, b)
