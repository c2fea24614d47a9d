"""A database knows what it was built from: its encoder's weights, its input files, and
no stage of a build that failed; every failure of a build is one line for the user."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from retrolm.errors import IncompatibleError
from retrolm.retrieval import RetrievalDatabase, build, build_database
from retrolm.retrieval.encoder import sha256_file

from .conftest import TINY_DB, module_text, write_corpus
from .test_database import files


def cli_build_args(text: Path, db: Path, encoder: Path) -> list[str]:
    """``retrolm db build`` with the settings of ``tiny_config``."""
    args = ["db", "build", str(text), str(db), "--encoder", str(encoder)]
    for k, v in TINY_DB.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def one_line_error(capsys) -> str:
    """The one line a failed command printed (progress bars aside), checked to be alone."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "|" not in line]
    assert len(lines) == 1 and lines[0].startswith("retrolm db: error: "), err
    return lines[0]


def partial_build(text: Path, db: Path, config, monkeypatch, stop_at: str = "embed") -> None:
    """A build that stops (disk full) when stage ``stop_at`` starts: the ones before it done."""
    real = getattr(build, f"_stage_{stop_at}")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build, f"_stage_{stop_at}", full_disk)
    with pytest.raises(OSError):
        build_database(text, db, config)
    monkeypatch.setattr(build, f"_stage_{stop_at}", real)
    assert "chunk" in json.loads((db / "manifest.json").read_text())["stages_done"]


# ---- (a) the encoder's weights --------------------------------------------------------------
def test_a_different_encoder_at_the_recorded_path_is_refused(
    tmp_path, built_db, tiny_encoder, other_encoder, capsys
):
    db_dir, enc = tmp_path / "db", tmp_path / "enc"
    shutil.copytree(built_db, db_dir)
    shutil.copytree(tiny_encoder, enc)
    manifest = json.loads((db_dir / "manifest.json").read_text())
    manifest["encoder"]["path"] = str(enc)  # the database now records the copy
    (db_dir / "manifest.json").write_text(json.dumps(manifest))
    query = ["push an item onto the heap"]
    ids, _ = RetrievalDatabase.open(db_dir).search(query, 2)  # the build's weights: fine

    shutil.copy(other_encoder / "model.safetensors", enc / "model.safetensors")  # swapped
    built = sha256_file(tiny_encoder / "model.safetensors")[:16]
    found = sha256_file(other_encoder / "model.safetensors")[:16]
    assert built != found
    with pytest.raises(IncompatibleError, match=f"sha256 {built}.*sha256 {found}.*--restart"):
        RetrievalDatabase.open(db_dir).search(query, 2)

    from retrolm.cli import main

    capsys.readouterr()
    assert main(["db", "query", str(db_dir), query[0]]) == 2
    line = one_line_error(capsys)
    assert built in line and found in line and str(enc) in line
    # the original encoder from another folder is accepted, and is the one that embeds
    db = RetrievalDatabase.open(db_dir, encoder=str(tiny_encoder))
    again, _ = db.search(query, 2)
    assert db.encoder.path == tiny_encoder and (again == ids).all()
    assert main(["db", "query", str(db_dir), query[0], "--encoder", str(tiny_encoder)]) == 0


def test_a_resumed_embed_refuses_other_encoder_weights(
    tmp_path, corpus_dir, tiny_config, tiny_encoder, other_encoder, monkeypatch
):
    enc = tmp_path / "enc"
    shutil.copytree(tiny_encoder, enc)
    config = replace(tiny_config, encoder=str(enc))
    from retrolm.retrieval import encoder as encoder_module

    real_embed, calls = encoder_module.FrozenEncoder.embed, []

    def embed_then_die(self, texts, batch_size=64):  # one block embedded, then killed
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_embed(self, texts, batch_size)

    monkeypatch.setattr(encoder_module.FrozenEncoder, "embed", embed_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_database(corpus_dir, tmp_path / "db", config)
    monkeypatch.setattr(encoder_module.FrozenEncoder, "embed", real_embed)
    shutil.copy(other_encoder / "model.safetensors", enc / "model.safetensors")
    with pytest.raises(IncompatibleError, match="encoder the build started with.*--restart"):
        build_database(corpus_dir, tmp_path / "db", config)


# ---- (b) the input files --------------------------------------------------------------------
def test_a_resume_after_the_text_folder_changed_refuses_and_restart_rebuilds(
    tmp_path, tiny_config, monkeypatch, capsys
):
    text = write_corpus(tmp_path / "text", ["json", "csv", "heapq"])
    db = tmp_path / "db"
    partial_build(text, db, tiny_config, monkeypatch)
    target = text / "lib" / "csv.txt"
    st = target.stat()

    def touch():
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    def append():
        target.write_text(target.read_text() + "one more line\n")

    changes = {
        "1 file added (docs/new.txt)": lambda: (text / "docs" / "new.txt").write_text("new\n"),
        "1 file removed (lib/csv.txt)": target.unlink,
        "1 file resized (lib/csv.txt)": append,
        "1 file modified (same size, new time) (lib/csv.txt)": touch,
    }
    original = target.read_bytes()
    for what, change in changes.items():
        change()
        with pytest.raises(
            IncompatibleError, match=r"changed since .* was started .*--restart"
        ) as e:
            build_database(text, db, tiny_config)
        assert what in str(e.value), (what, str(e.value))
        # undo: the same files, sizes and times again
        (text / "docs" / "new.txt").unlink(missing_ok=True)
        target.write_bytes(original)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    # the changed folder, rebuilt from scratch with --restart, equals a fresh build of it
    (text / "docs" / "new.txt").write_text(module_text("bisect"))
    from retrolm.cli import main

    capsys.readouterr()
    assert main(cli_build_args(text, db, Path(tiny_config.encoder))) == 2
    assert "--restart" in one_line_error(capsys)
    assert main([*cli_build_args(text, db, Path(tiny_config.encoder)), "--restart"]) == 0
    build_database(text, tmp_path / "fresh", tiny_config)
    got, want = files(db), files(tmp_path / "fresh")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after --restart"
    # a complete database whose text folder changed says so too, rather than "complete"
    (text / "docs" / "new.txt").unlink()
    with pytest.raises(IncompatibleError, match=r"changed since .* was built \(1 file removed"):
        build_database(text, db, tiny_config)


def test_restart_leaves_files_that_are_not_the_databases(tmp_path, tiny_config, monkeypatch):
    text = write_corpus(tmp_path / "text", ["json", "heapq"])
    db = tmp_path / "db"
    partial_build(text, db, tiny_config, monkeypatch, stop_at="index")
    (db / "notes.txt").write_text("mine")
    build_database(text, db, tiny_config, restart=True)
    assert (db / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not a retrolm database"):
        other = tmp_path / "other"
        other.mkdir()
        (other / "manifest.json").write_text('{"name": "something else"}')
        build_database(text, other, tiny_config, restart=True)


# ---- (c) a failed build records nothing -----------------------------------------------------
def test_a_build_that_failed_leaves_no_stage_and_a_rerun_equals_a_fresh_build(
    tmp_path, tiny_config
):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_bytes(b"")
    (text / "b.txt").write_bytes(b"\x00\x01binary")
    db = tmp_path / "db"
    with pytest.raises(ValueError, match=r"no text in the 2 file\(s\).*1 empty, 1 binary"):
        build_database(text, db, tiny_config)
    assert not db.exists()  # refused before anything was written

    for i, name in enumerate(["json", "heapq"]):
        (text / f"good{i}.txt").write_text(module_text(name))
    build_database(text, db, tiny_config)
    build_database(text, tmp_path / "fresh", tiny_config)
    got, want = files(db), files(tmp_path / "fresh")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from a fresh build"
    assert len(json.loads((db / "tokenizer.json").read_text())["model"]["vocab"]) > 258


def test_a_build_that_failed_before_its_first_stage_takes_new_settings(
    tmp_path, corpus_dir, tiny_config
):
    bad = replace(tiny_config, encoder=str(tmp_path / "no_model"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_database(corpus_dir, tmp_path / "db", bad)
    assert build_database(corpus_dir, tmp_path / "db", tiny_config)["complete"]


@pytest.mark.parametrize("crash_in", ["write_manifest", "write_inputs"])
def test_a_kill_while_a_build_starts_leaves_a_folder_the_rerun_builds(
    tmp_path, corpus_dir, tiny_config, built_db, monkeypatch, crash_in
):
    """A crash in either first write of a new build (the manifest, then the input list) leaves
    a DB_DIR that the same command builds to a fresh build's files (the input list written
    first, a kill before the manifest left a folder refused as "not empty")."""
    owner = build.inputs if crash_in == "write_inputs" else build

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for a kill: nothing after it runs

    real = getattr(owner, crash_in)
    monkeypatch.setattr(owner, crash_in, killed)
    with pytest.raises(KeyboardInterrupt):
        build_database(corpus_dir, tmp_path / "db", tiny_config)
    monkeypatch.setattr(owner, crash_in, real)
    assert build_database(corpus_dir, tmp_path / "db", tiny_config)["complete"]
    got, want = files(tmp_path / "db"), files(built_db)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from a fresh build"
