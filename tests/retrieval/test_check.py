"""Knowing the index: recall@k against exact search, query-time nprobe / ef_search."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.retrieval import RetrievalDatabase, build_database
from retrolm.retrieval.check import check_index, exact_search
from retrolm.retrieval.index import Searcher, build_index, choose_index

from .test_index import brute_force, clustered


@pytest.fixture(scope="module")
def ivf_db(tmp_path_factory, corpus_dir, tiny_config):
    db = tmp_path_factory.mktemp("ivf") / "db"
    build_database(corpus_dir, db, replace(tiny_config, index="ivf"))
    return db


def test_the_builds_nprobe_is_stored_and_searched_with(tmp_path, corpus_dir, tiny_config):
    db = tmp_path / "db"
    build_database(corpus_dir, db, replace(tiny_config, index="ivf", nprobe=1))
    info = json.loads((db / "manifest.json").read_text())["index"]
    assert info["kind"] == "ivf" and info["nprobe"] == 1
    assert RetrievalDatabase.open(db).index_spec.nprobe == 1
    with pytest.raises(ValueError, match="nprobe=2 with index='flat'"):
        replace(tiny_config, index="flat", nprobe=2)


def test_exact_search_equals_numpy_brute_force():
    x, q = clustered(3000, seed=4), clustered(50, seed=5)
    ids, dists = exact_search(x, q, 7)
    ref_ids, ref_d = brute_force(x, q, 7)
    np.testing.assert_allclose(dists, ref_d, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.999


def test_recall_rises_with_nprobe_and_is_one_at_nlist():
    x = clustered(4000, clusters=400, seed=6) + 0.5 * clustered(4000, clusters=4000, seed=8)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # diffuse: one list rarely holds all k
    spec = choose_index(len(x), x.shape[1], "ivf")
    searcher = Searcher(build_index(spec, x), spec, x)
    recalls = []
    for nprobe in (1, 2, 8, spec.nlist):
        searcher.set_search(nprobe=nprobe)
        recalls.append(check_index(searcher, x, sample=300, k=10).recall)
    assert all(a <= b + 1e-9 for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[0] < 0.85 and recalls[-1] == 1.0, recalls


def test_an_exact_index_has_recall_one():
    x = clustered(1500, seed=7)
    spec = choose_index(len(x), x.shape[1], "flat")
    report = check_index(Searcher(build_index(spec, x), spec, x), x, sample=200, k=5)
    assert report.recall == 1.0 and report.queries == 200 and report.k == 5


def test_search_parameters_are_checked_against_the_index_kind():
    flat = choose_index(5000, 32, "flat")
    ivf = choose_index(5000, 32, "ivf")
    with pytest.raises(ValueError, match="no inverted lists.*drop it"):
        flat.with_search(nprobe=4)
    with pytest.raises(ValueError, match=f"use 1 to {ivf.nlist}"):
        ivf.with_search(nprobe=ivf.nlist + 1)
    with pytest.raises(ValueError, match="not an HNSW graph"):
        ivf.with_search(ef_search=64)
    assert ivf.with_search(nprobe=3).nprobe == 3 and ivf.nprobe != 3


def test_db_check_on_the_built_databases(ivf_db, built_db, capsys):
    assert main(["db", "check", str(built_db), "--sample", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "flat" and report["recall"] == 1.0
    db = RetrievalDatabase.open(ivf_db)
    nlist = db.index_spec.nlist
    assert nlist > 8
    out = {}
    for nprobe in (1, nlist):
        assert main(["db", "check", str(ivf_db), "--sample", "200", "--nprobe", str(nprobe)]) == 0
        out[nprobe] = capsys.readouterr().out
    assert f"nprobe {nlist}" in out[nlist] and "recall@10  1.0000" in out[nlist], out[nlist]
    assert "recall@10  1.0000" not in out[1], out[1]
    assert "ms/query" in out[1]
    # query time too: the database searches with the given nprobe
    db.set_search(nprobe=1)
    assert db.searcher.spec.nprobe == 1
    assert main(["db", "query", str(ivf_db), "a list of items", "--nprobe", str(nlist)]) == 0
    assert "1. chunk" in capsys.readouterr().out


def test_a_search_parameter_the_index_lacks_is_one_line(built_db, capsys):
    assert main(["db", "check", str(built_db), "--nprobe", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no inverted lists" in err[0] and "drop it" in err[0], err
