"""A build or a query that fails on disk or in faiss says so in one line, leaves nothing
half-written under a final name, and a rerun finishes the build."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retrolm.cli import main
from retrolm.errors import DatabaseError, IncompatibleError
from retrolm.retrieval import RetrievalDatabase, build
from retrolm.retrieval.index import IndexSpec, build_index

from .test_build_inputs import cli_build_args, one_line_error
from .test_database import SRC, files

# faiss's own text for a failed write (index_write.cpp), the disk full
FAISS_WRITE_ERROR = (
    "Error in void faiss::write_index(const faiss::Index*, faiss::IOWriter*, int) at "
    "/project/faiss/impl/index_write.cpp:499: Error: 'ret == (size * 4)' failed: write "
    "error in {}: 9955 != 3200000 (No space left on device)"
)


def leftovers(db) -> list[str]:
    """Temporary files of atomic writes still lying around."""
    return [p.name for p in db.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_during_a_build_is_one_line_and_a_rerun_finishes_it(
    tmp_path, corpus_dir, tiny_encoder, built_db, monkeypatch, capsys
):
    db = tmp_path / "db"
    args = cli_build_args(corpus_dir, db, tiny_encoder)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    # 1. the disk fills while embedding (a plain write() error: it names no file)
    with monkeypatch.context() as mp:
        mp.setattr(build.RowFile, "write", full)
        capsys.readouterr()
        assert main(args) == 2
    line = one_line_error(capsys)
    assert "No space left on device" in line and str(db) in line and "free disk space" in line
    with pytest.raises(IncompatibleError, match="is incomplete"):
        RetrievalDatabase.open(db)

    # 2. then while faiss writes the index
    def faiss_full(index, path):
        with open(path, "wb") as f:  # faiss has begun the file when the disk fills
            f.write(b"\0" * 100)
        raise RuntimeError(FAISS_WRITE_ERROR.format(path))

    with monkeypatch.context() as mp:
        mp.setattr("faiss.write_index", faiss_full)  # index.py imports faiss where used
        assert main(args) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"retrolm db: error: faiss could not write the index file {db}")
    assert "write error in" in line and "No space left on device" in line
    assert "index.faiss" not in {p.name for p in db.iterdir()}  # nothing under its final name
    assert leftovers(db) == []
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["stages_done"] == ["tokenizer", "chunk", "embed"]

    # 3. with space again, the same command finishes: the files of an uninterrupted build
    assert main(args) == 0
    got, want = files(db), files(built_db)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after the disk-full reruns"


def test_a_real_file_size_limit_during_a_build_is_one_line(tmp_path, corpus_dir, tiny_encoder):
    """No mock: the kernel refuses a write (EFBIG under ``ulimit -f``: the first file past
    4 KiB is the tokenizer's) and the build stops with one line and no partial file."""
    db = tmp_path / "db"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # EFBIG instead of a signal
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from retrolm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, *cli_build_args(corpus_dir, db, tiny_encoder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "|" not in line]
    lines = [line for line in lines if " INFO " not in line]  # the build's log lines
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "File too large" in lines[0] and "ulimit -f" in lines[0], lines
    assert leftovers(db) == [] and not (db / "tokenizer.json").exists()


def test_a_damaged_index_file_is_one_line_naming_it(tmp_path, built_db, capsys):
    db = tmp_path / "db"
    shutil.copytree(built_db, db)
    (db / "index.faiss").write_bytes(b"PK\x03\x04 not an index")
    capsys.readouterr()
    assert main(["db", "query", str(db), "split a string into words"]) == 2
    line = one_line_error(capsys)
    assert f"faiss could not read the index file {db / 'index.faiss'}" in line
    assert "not recognized" in line and "--restart" in line and " at /" not in line


def test_an_index_faiss_cannot_make_is_a_database_error():
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    with pytest.raises(DatabaseError, match=r"faiss could not build index IVF4,Nonsense .*--index"):
        build_index(IndexSpec("ivf", "IVF4,Nonsense"), x)
