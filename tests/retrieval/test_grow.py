"""Growing a database: build(A) + add(B) retrieves as build(A+B)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.errors import IncompatibleError
from retrolm.retrieval import RetrievalDatabase, build_database, grow
from retrolm.retrieval.check import check_index

from .conftest import module_text

A, B = ["json", "csv", "textwrap"], ["heapq", "bisect"]


def write(root: Path, sub: str, modules: list[str]) -> Path:
    (root / sub).mkdir(parents=True, exist_ok=True)
    for name in modules:
        (root / sub / f"{name}.txt").write_text(module_text(name), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, tiny_config):
    """build(A), and build(A+B) with A's tokenizer (its files sort A first, B after)."""
    root = tmp_path_factory.mktemp("grow")
    a, b = write(root / "A", "a", A), write(root / "B", "b", B)
    ab = write(write(root / "AB", "a", A), "b", B)
    build_database(a, root / "db_a", tiny_config)
    cfg_ab = replace(tiny_config, tokenizer=str(root / "db_a" / "tokenizer.json"))
    build_database(ab, root / "db_ab", cfg_ab)
    return root, b


def grown(root: Path, b: Path, name: str, *flags: str) -> RetrievalDatabase:
    shutil.copytree(root / "db_a", root / name)
    assert main(["db", "add", str(root / name), str(b), *flags]) == 0
    return RetrievalDatabase.open(root / name)


def same_neighbours(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.asarray(got) == np.asarray(want)).mean())


def test_build_then_add_equals_building_both_with_a_flat_index(dbs, capsys):
    root, b = dbs
    ab = RetrievalDatabase.open(root / "db_ab")
    db = grown(root, b, "refreshed", "--refresh-neighbours")
    assert db.num_chunks == ab.num_chunks and len(db.documents) == len(ab.documents)
    np.testing.assert_array_equal(np.asarray(db.chunks), np.asarray(ab.chunks))
    np.testing.assert_array_equal(np.asarray(db.doc_ids), np.asarray(ab.doc_ids))
    np.testing.assert_array_equal(np.asarray(db.seq_starts), np.asarray(ab.seq_starts))
    np.testing.assert_allclose(np.asarray(db.embeddings), np.asarray(ab.embeddings), atol=1e-5)
    assert same_neighbours(db.neighbours, ab.neighbours) > 0.999
    np.testing.assert_allclose(db.neighbour_dists, ab.neighbour_dists, atol=1e-4)
    ids, _ = db.search(["a heap queue", "insert into a sorted list"], 5)
    ids_ab, _ = ab.search(["a heap queue", "insert into a sorted list"], 5)
    np.testing.assert_array_equal(ids, ids_ab)
    assert db.doc_path(db.doc_ids[-1]) == str(b / "b" / "heapq.txt")
    assert db.doc_path(0) == str(root / "A" / "a" / "csv.txt")  # the build's folder
    # the manifest keeps the addition; db info shows it
    add = db.manifest["additions"]
    base = RetrievalDatabase.open(root / "db_a").num_chunks
    assert len(add) == 1 and add[0]["chunks"] == db.num_chunks - base
    assert add[0]["inputs"]["files"] == 2 and add[0]["refreshed_neighbours"]
    capsys.readouterr()
    assert main(["db", "info", str(root / "refreshed")]) == 0
    assert "addition 1" in capsys.readouterr().out


def test_without_refresh_the_older_chunks_keep_their_neighbours(dbs):
    root, b = dbs
    a, ab = RetrievalDatabase.open(root / "db_a"), RetrievalDatabase.open(root / "db_ab")
    db = grown(root, b, "kept")
    m = a.num_chunks
    np.testing.assert_array_equal(np.asarray(db.neighbours[:m]), np.asarray(a.neighbours))
    assert same_neighbours(db.neighbours[m:], ab.neighbours[m:]) > 0.999
    assert not db.manifest["additions"][0]["refreshed_neighbours"]


def test_an_ivf_index_keeps_its_quantizer_and_its_recall(dbs, tiny_config):
    root, b = dbs
    build_database(root / "A", root / "ivf_a", replace(tiny_config, index="ivf"))
    factory = RetrievalDatabase.open(root / "ivf_a").manifest["index"]["factory"]
    shutil.copytree(root / "ivf_a", root / "db_a_ivf")
    shutil.rmtree(root / "ivf_a")
    (root / "db_a").rename(root / "db_a_flat")
    (root / "db_a_ivf").rename(root / "db_a")
    try:
        db = grown(root, b, "ivf_grown")
    finally:
        (root / "db_a").rename(root / "db_a_ivf")
        (root / "db_a_flat").rename(root / "db_a")
    assert db.manifest["index"]["factory"] == factory  # same lists: not retrained
    assert db.searcher.ntotal == db.num_chunks
    # stated recall: the grown index finds >= 90% of the exact 10 nearest at build nprobe
    report = check_index(db.searcher, db.embeddings, sample=300, k=10)
    assert report.recall >= 0.9, report
    db.set_search(nprobe=db.index_spec.nlist)
    assert check_index(db.searcher, db.embeddings, sample=300, k=10).recall == 1.0


def test_retrain_and_the_advice_to_retrain(dbs):
    root, b = dbs
    manifest = json.loads((root / "db_a" / "manifest.json").read_text())
    assert grow.index_advice(manifest) is None  # flat: nothing trained
    ivf = dict(manifest, num_chunks=10_000)
    ivf["index"] = dict(manifest["index"], kind="ivf", train_size=900, trained_on=1000)
    assert "--retrain" in grow.index_advice(ivf)
    db = grown(root, b, "retrained", "--retrain")
    assert db.manifest["index"]["trained_on"] == db.num_chunks
    assert db.manifest["additions"][0]["index"] == "retrained"
    ab = RetrievalDatabase.open(root / "db_ab")
    m = db.manifest["num_chunks"] - db.manifest["additions"][0]["chunks"]
    assert same_neighbours(db.neighbours[m:], ab.neighbours[m:]) > 0.999


def test_an_interrupted_addition_resumes_and_other_settings_are_refused(dbs, monkeypatch):
    root, b = dbs
    shutil.copytree(root / "db_a", root / "killed")
    monkeypatch.setattr(grow, "_stage_neighbours", _dies)
    with pytest.raises(KeyboardInterrupt):
        grow.add_documents(root / "killed", b)
    RetrievalDatabase.open(root / "killed")  # still opens, as it was
    with pytest.raises(IncompatibleError, match="unfinished addition.*rerun"):
        grow.add_documents(root / "killed", b, refresh_neighbours=True)
    monkeypatch.undo()
    monkeypatch.setattr(grow, "_grown_manifest", _dies)  # killed in the commit, files appended
    with pytest.raises(KeyboardInterrupt):
        grow.add_documents(root / "killed", b)
    with pytest.raises(IncompatibleError, match="middle of `retrolm db add`"):
        RetrievalDatabase.open(root / "killed")
    monkeypatch.undo()
    grow.add_documents(root / "killed", b)
    kept = RetrievalDatabase.open(root / "kept") if (root / "kept").exists() else None
    db = RetrievalDatabase.open(root / "killed")
    assert db.num_chunks == RetrievalDatabase.open(root / "db_ab").num_chunks
    assert len(db.manifest["additions"]) == 1
    assert not (root / "killed" / grow.STAGING).exists()
    if kept is not None:  # the same bytes as an addition never interrupted
        for name in ("chunks.bin", "embeddings.bin", "neighbours.bin", "documents.jsonl"):
            assert (root / "killed" / name).read_bytes() == (root / "kept" / name).read_bytes()


def _dies(*a, **k):
    raise KeyboardInterrupt


# `retrolm db add` in a child process, every embedding batch and neighbour block slowed so that
# the test can SIGKILL it inside a stage.
SLOW_ADD = """
import sys, time
import faiss
from retrolm.retrieval import encoder, grow
faiss.omp_set_num_threads(1)
def slowed(fn):
    def wrapper(*a, **k):
        time.sleep(0.3)
        return fn(*a, **k)
    return wrapper
encoder.FrozenEncoder.embed = slowed(encoder.FrozenEncoder.embed)
grow.neighbours_block = slowed(grow.neighbours_block)
grow.add_documents(sys.argv[1], sys.argv[2], refresh_neighbours=True)
"""


@pytest.mark.slow
def test_an_addition_killed_in_each_stage_resumes_to_the_same_bytes(dbs, tmp_path):
    """SIGKILL (no cleanup runs) inside the embed stage, then inside the neighbour stage: each
    rerun finishes what is left, and the database ends byte for byte as one uninterrupted
    addition."""
    from .test_database import SRC, files

    root, b = dbs
    want = grown(root, b, "uninterrupted_refreshed", "--refresh-neighbours").path
    db = tmp_path / "db"
    shutil.copytree(root / "db_a", db)
    script = tmp_path / "slow_add.py"
    script.write_text(SLOW_ADD)
    env = dict(os.environ, PYTHONPATH=SRC)
    for stage in ("embed", "neighbours"):
        proc = subprocess.Popen([sys.executable, str(script), str(db), str(b)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        t0 = time.time()
        while not any((db / grow.STAGING / ".progress" / stage).glob("*.done")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 120, f"stage {stage} never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert (
            RetrievalDatabase.open(db).num_chunks
            == RetrievalDatabase.open(root / "db_a").num_chunks
        )
    grow.add_documents(db, b, refresh_neighbours=True)
    got, expected = files(db), files(want)
    assert sorted(got) == sorted(expected)
    for name in expected:
        if name != "manifest.json":
            assert got[name] == expected[name], f"{name} differs after the resumed addition"
    m_got, m_want = (json.loads((d / "manifest.json").read_text()) for d in (db, want))
    for m in (m_got, m_want):
        for a in m["additions"]:
            a.pop("time", None)
    assert m_got == m_want
