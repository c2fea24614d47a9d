"""Retrieving for another corpus: `db query DB --text DIR --out OUT` and training on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.errors import IncompatibleError
from retrolm.retrieval import chunking, query
from retrolm.retrieval.query import NeighbourSet, query_corpus

from .conftest import write_corpus

# json and heapq are also in the database's corpus (other paths, other ids): same content
TRAIN_MODULES = ["pprint", "json", "glob", "heapq"]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("train") / "text", TRAIN_MODULES)


@pytest.fixture(scope="module")
def neighbour_set(tmp_path_factory, built_db, train_dir) -> Path:
    out = tmp_path_factory.mktemp("nbrs") / "out"
    assert main(["db", "query", str(built_db), "--text", str(train_dir), "--out", str(out)]) == 0
    return out


def stem_of(path: str) -> str:
    return Path(path).stem


def test_neighbours_equal_a_brute_force_search_over_the_stored_embeddings(
    db, neighbour_set, capsys
):
    nset = NeighbourSet.open(db.path, neighbour_set)
    m = nset.manifest
    assert m["num_chunks"] > 0 and m["report"]["documents_in_database"] == 2
    q = np.asarray(query.open_array(neighbour_set, m["arrays"]["embeddings"]))  # (N, d)
    keys = np.asarray(db.embeddings, dtype=np.float64)  # (M, d)
    # own document by name (json.txt is json.txt), independent of the content hashes
    train_docs = chunking.read_documents(neighbour_set)
    db_stems = np.array([stem_of(d["path"]) for d in db.documents])
    train_doc_of_chunk = np.asarray(query.open_array(neighbour_set, m["arrays"]["doc_ids"]))
    own_stem = np.array([stem_of(train_docs[i]["path"]) for i in train_doc_of_chunk])
    q64 = q.astype(np.float64)
    d2 = (q64**2).sum(1)[:, None] - 2 * q64 @ keys.T + (keys**2).sum(1)[None]  # (N, M)
    d2[own_stem[:, None] == db_stems[np.asarray(db.doc_ids)][None]] = np.inf
    k = m["num_neighbour_columns"]
    ref = np.argsort(d2, axis=1, kind="stable")[:, :k]
    got = np.asarray(nset.neighbours)
    np.testing.assert_allclose(
        np.asarray(nset.neighbour_dists), np.take_along_axis(d2, ref, 1), atol=1e-5
    )
    assert (got == ref).mean() > 0.999  # identical but for exact ties
    # the stored queries are the database's recipe applied to the chunks
    chunks = np.asarray(nset.chunks[:8, :-1])
    np.testing.assert_allclose(q[:8], db.embed(db.tokenizer.decode_batch(chunks)), atol=1e-5)


def test_a_training_sequence_never_retrieves_any_of_its_documents(db, neighbour_set):
    from retrolm.data import RETRODataset

    nset = NeighbourSet.open(db, neighbour_set)
    ds = RETRODataset(nset, seq_len=64, num_neighbours=2)
    assert len(ds) == nset.manifest["num_sequences"] > 0
    train_docs = chunking.read_documents(neighbour_set)
    raw_doc = np.asarray(query.open_array(neighbour_set, nset.manifest["arrays"]["doc_ids"]))
    seen_shared = False
    for i in range(len(ds)):
        chunk_ids = ds.chunk_ids(i)
        stems = {stem_of(train_docs[d]["path"]) for d in raw_doc[chunk_ids]}
        nbr = ds.neighbour_ids(i)
        got = {stem_of(db.documents[db.doc_ids[j]]["path"]) for j in nbr[nbr >= 0]}
        assert not stems & got, (i, stems & got)
        seen_shared |= bool(stems & {"json", "heapq"})
    assert seen_shared
    seq, retrieved, mask = ds[0]
    assert seq.shape == (65,) and retrieved.shape == (4, 2, 32) and mask.all()
    np.testing.assert_array_equal(seq[:16].numpy(), np.asarray(nset.chunks[0, :16]))


def test_train_on_the_neighbour_set_records_both(built_db, neighbour_set, tmp_path, capsys):
    from retrolm.checkpoint import resolve_checkpoint
    from tests.test_cli import MODEL

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_config": MODEL, "train": {"batch_size": 2, "plot": False}}))
    run = tmp_path / "run"
    argv = ["train", "--db", str(built_db), "--neighbours", str(neighbour_set)]
    assert main([*argv, "--out", str(run), "--config", str(cfg), "--steps", "2"]) == 0
    saved = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    ident = json.dumps(saved)
    assert str(neighbour_set.resolve()) in ident and str(built_db.resolve()) in ident
    # resuming without the neighbour set would read other sequences: refused in one line
    capsys.readouterr()
    base = ["train", "--db", str(built_db), "--out", str(run), "--config", str(cfg)]
    assert main([*base, "--steps", "3"]) == 2
    assert "--neighbours to resume" in capsys.readouterr().err


def test_the_query_resumes_to_the_same_files(db, train_dir, neighbour_set, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = query.search_excluding, []

    def dies_on_the_third_block(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(query, "search_excluding", dies_on_the_third_block)
    with pytest.raises(KeyboardInterrupt):
        query_corpus(db, train_dir, out, block_size=128)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(query, "search_excluding", real)
    m = query_corpus(db, train_dir, out, block_size=128)
    assert m["complete"] and len(calls) == 3
    for name in ("neighbours.bin", "neighbour_dists.bin", "embeddings.bin", "chunks.bin"):
        assert (out / name).read_bytes() == (neighbour_set / name).read_bytes(), name


def test_another_state_of_the_database_is_refused(built_db, neighbour_set, train_dir, tmp_path):
    grown = tmp_path / "db"
    shutil.copytree(built_db, grown)
    manifest = json.loads((grown / "manifest.json").read_text())
    manifest["additions"] = [{"files": 1}]  # as after `db add`
    (grown / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleError, match="another state of database.*--restart"):
        NeighbourSet.open(grown, neighbour_set)
    copy = tmp_path / "nbrs"
    shutil.copytree(neighbour_set, copy)
    with pytest.raises(IncompatibleError, match="database changed.*--restart"):
        query_corpus(grown, train_dir, copy)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--text", "T"], "go together"),
        (["some text", "--text", "T", "--out", "O"], "not both"),
        ([], "give a TEXT"),
    ],
)
def test_bad_query_forms_are_one_line(built_db, capsys, argv, message):
    assert main(["db", "query", str(built_db), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
