"""The build as a whole: resume after SIGKILL, parallel embed, opening rules, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from retrolm.errors import IncompatibleError
from retrolm.retrieval import BuildConfig, LMTokenizer, RetrievalDatabase, build_database

from .conftest import module_text

SRC = str(Path(__file__).resolve().parents[2] / "src")

# Runs a build with every block slowed down, so that the test can kill it mid-stage.
SLOW_BUILD = """
import json, sys, time
import faiss
from retrolm.retrieval import BuildConfig, build_database, chunking, encoder, neighbours
faiss.omp_set_num_threads(1)
chunking.BLOCK_BYTES = 1  # one chunking block per file
delay = float(sys.argv[4])
def slowed(fn):
    def wrapper(*a, **k):
        time.sleep(delay)
        return fn(*a, **k)
    return wrapper
chunking._chunk_file = slowed(chunking._chunk_file)
encoder.FrozenEncoder.embed = slowed(encoder.FrozenEncoder.embed)
neighbours.neighbours_block = slowed(neighbours.neighbours_block)
build_database(sys.argv[1], sys.argv[2], BuildConfig(**json.loads(sys.argv[3])))
"""


def files(db: Path) -> dict[str, bytes]:
    return {
        p.relative_to(db).as_posix(): p.read_bytes() for p in sorted(db.rglob("*")) if p.is_file()
    }


def stage_started(db: Path, stage: str) -> bool:
    progress = db / ".progress"
    if stage == "chunk":
        return (progress / "chunk.json").exists()
    return any((progress / stage).glob("*.done"))


def kill_during(script, corpus, db, config, stage, timeout=120.0) -> None:
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(corpus), str(db), json.dumps(asdict(config)), "0.3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    t0 = time.time()
    while not stage_started(db, stage):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < timeout, f"stage {stage} never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


@pytest.mark.parametrize(
    "stages", [["embed"], pytest.param(["chunk", "embed", "neighbours"], marks=pytest.mark.slow)]
)
def test_resume_after_sigkill_gives_identical_files(
    tmp_path, corpus_dir, tiny_config, built_db, stages
):
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    db = tmp_path / "db"
    for stage in stages:
        kill_during(script, corpus_dir, db, tiny_config, stage)
        with pytest.raises(IncompatibleError, match="is incomplete .*rerun `retrolm db build`"):
            RetrievalDatabase.open(db)
    build_database(corpus_dir, db, tiny_config)  # resume in this process
    got, want = files(db), files(built_db)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after resume"


def test_a_second_build_into_one_folder_fails_at_once(tmp_path, corpus_dir, tiny_config, built_db):
    """Two builders, one DB_DIR: the second fails naming the folder and the holder's pid.
    Once the first is SIGKILLed its lock is gone: a rerun resumes to the files of a build
    that was alone."""
    from retrolm.locking import LOCK_FILE, LockedError

    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    db = tmp_path / "db"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(corpus_dir), str(db), json.dumps(asdict(tiny_config))]
        + ["0.3"],  # every block slowed: the build holds its lock for seconds
        env=dict(os.environ, PYTHONPATH=SRC),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.time()
        while not (db / LOCK_FILE).exists() or not (db / LOCK_FILE).read_text().strip():
            assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        busy = f"database {db} is being written by another retrolm process (pid {proc.pid})"
        with pytest.raises(LockedError, match=re.escape(busy)):
            build_database(corpus_dir, db, tiny_config)
        assert proc.poll() is None  # the first was still building
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert (db / LOCK_FILE).read_text().strip() == str(proc.pid)  # its lock file stays
    build_database(corpus_dir, db, tiny_config)  # and blocks nobody
    got, want = files(db), files(built_db)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs"


def test_two_embed_workers_equal_one(tmp_path, corpus_dir, tiny_config, db):
    m = build_database(corpus_dir, tmp_path / "db2", replace(tiny_config, workers=2))
    assert m["complete"]
    two = RetrievalDatabase.open(tmp_path / "db2")
    np.testing.assert_allclose(two.embeddings, db.embeddings, atol=1e-6)
    assert (np.asarray(two.neighbours) == np.asarray(db.neighbours)).mean() > 0.999


def test_opening_rules(built_db, other_encoder, tiny_encoder, tmp_path):
    db = RetrievalDatabase.open(
        built_db, encoder=str(tiny_encoder), chunk_size=16, tokenizer=built_db / "tokenizer.json"
    )
    assert db.num_chunks == len(db.chunks) == len(db.doc_ids) == len(db.neighbours)
    with pytest.raises(ValueError, match="read-only"):
        db.chunks[0, 0] = 5
    with pytest.raises(IncompatibleError, match="chunk size 16, but chunk size 64 was requested"):
        RetrievalDatabase.open(built_db, chunk_size=64)
    with pytest.raises(
        IncompatibleError,
        match=f"built with encoder {tiny_encoder.name} .*but encoder {other_encoder.name} ",
    ):
        RetrievalDatabase.open(built_db, encoder=str(other_encoder))
    other_tok = LMTokenizer.train([module_text("json")], vocab_size=500)
    with pytest.raises(
        IncompatibleError,
        match=f"built with LM tokenizer {db.tokenizer.hash[:12]} .*"
        f"but tokenizer {other_tok.hash[:12]} ",
    ):
        RetrievalDatabase.open(built_db, tokenizer=other_tok)
    with pytest.raises(FileNotFoundError, match="is not a retrieval database"):
        RetrievalDatabase.open(tmp_path)
    # one-line messages
    try:
        RetrievalDatabase.open(built_db, chunk_size=64)
    except IncompatibleError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=100, chunk_size=64), "seq_len=100 is not a multiple of chunk_size=64"),
        (dict(pooling="max"), "pooling='max' is not one of"),
        (dict(index="annoy"), "index='annoy' is not one of"),
        (dict(memory_budget="lots"), "memory budget 'lots' is not a size"),
        (dict(neighbours=0), "neighbours=0 must be a positive int"),
        (dict(extra_neighbours=-1), "extra_neighbours=-1 must be >= 0"),
        (dict(vocab_size=10), "vocab_size=10 is too small"),
        (dict(embed_dtype="int8"), "embed_dtype='int8' is not one of"),
        (dict(workers=0), "workers=0 must be a positive int"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig(**kwargs)


def test_bad_build_inputs(tmp_path, corpus_dir, tiny_config, built_db):
    with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.json.* does not exist"):
        build_database(corpus_dir, tmp_path / "a", replace(tiny_config, tokenizer="nope.json"))
    with pytest.raises(FileNotFoundError, match="encoder folder .*no_model.* has no config.json"):
        no_model = replace(tiny_config, encoder=str(tmp_path / "no_model"))
        build_database(corpus_dir, tmp_path / "b", no_model)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="DB_DIR .* is not empty and holds no retrieval database"):
        build_database(corpus_dir, tmp_path / "c", tiny_config)
    with pytest.raises(IncompatibleError, match="other settings \\(chunk_size: 16 vs 32"):
        build_database(corpus_dir, built_db, replace(tiny_config, chunk_size=32))
    assert build_database(corpus_dir, built_db, tiny_config)["complete"]  # complete: a no-op


@pytest.mark.parametrize("as_dir", [False, True])
def test_a_build_killed_inside_its_first_manifest_write_is_restarted(
    tmp_path, corpus_dir, tiny_config, built_db, as_dir
):
    """A SIGKILL between taking the lock and the first manifest's rename leaves the lock
    file and the manifest's temporary (a file, or the empty folder ``atomic_path`` makes
    first): the rerun builds there, and the temporary is gone; anything else is refused."""
    from retrolm.locking import LOCK_FILE

    db = tmp_path / "db"
    db.mkdir()
    (db / LOCK_FILE).write_text("12345\n")  # a dead holder's pid
    tmp = db / ".manifest.json.k1ll3d.tmp"
    tmp.mkdir() if as_dir else tmp.write_text('{"format": ')
    assert build_database(corpus_dir, db, tiny_config)["complete"]
    assert not tmp.exists()
    assert (db / "neighbours.bin").read_bytes() == (built_db / "neighbours.bin").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".notes.txt.tmp").write_text("mine")  # not ours: refused
    with pytest.raises(ValueError, match="is not empty and holds no retrieval database"):
        build_database(corpus_dir, other, tiny_config)


def test_cli_build_info_query_and_one_line_errors(tmp_path, corpus_dir, tiny_encoder, capsys):
    from retrolm.cli import main

    db = str(tmp_path / "db")
    args = [
        "db",
        "build",
        str(corpus_dir),
        db,
        "--encoder",
        str(tiny_encoder),
        "--chunk-size",
        "16",
        "--seq-len",
        "64",
        "--vocab-size",
        "800",
        "--embed-dtype",
        "fp32",
        "--index",
        "ivf",
        "--glob",
        "docs/*.txt",
    ]
    assert main(args) == 0
    assert main(["db", "info", db]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "ivf" in out and "chunks" in out
    assert main(["db", "query", db, "split a string into shell-like words", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "1. chunk" in out and "2. chunk" in out and "docs/" in out
    (tmp_path / "empty").mkdir()
    assert main(["db", "build", str(tmp_path / "empty"), str(tmp_path / "db3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no file in text folder" in err and "'**/*.txt'" in err
    assert main(["db", "query", str(tmp_path), "x"]) == 2
    assert "is not a retrieval database" in capsys.readouterr().err


def test_real_minilm_encoder(tmp_path):
    from retrolm.retrieval import FrozenEncoder

    enc = FrozenEncoder(dtype="fp32")
    assert enc.identity["sha256"].startswith("53aa51172d142c89") and enc.dim == 384
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awful.",
        "   \n\t",
    ]
    x = enc.embed(texts, batch_size=2)
    assert x.shape == (4, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > 0.6 and x[0] @ x[2] < 0.3  # sentence-transformers STS sanity values
    enc.set_dtype("bf16")
    assert (enc.embed(texts) * x).sum(1).min() > 0.995  # bf16 weights keep the keys
    # a small database with the real encoder retrieves by meaning
    from .conftest import write_corpus

    corpus = write_corpus(tmp_path / "c", ["json", "heapq", "calendar"])
    build_database(corpus, tmp_path / "db", BuildConfig(vocab_size=800, embed_dtype="fp32"))
    db = RetrievalDatabase.open(tmp_path / "db", encoder=enc)
    ids, _ = db.search(["push an item onto the heap, keeping the heap invariant"], 1)
    assert db.doc_path(db.doc_ids[ids[0, 0]]).endswith("heapq.txt")
