"""Checkpoints: versioned directories behind an atomically replaced pointer.

    RUN/checkpoints/
        step-00000300/          one whole checkpoint (the newest ``KEEP`` are kept)
            model.safetensors   weights (no pickle)
            config.json         format, model family + config, train config, database identity, step
            train_state.pt      optimizer, step, RNG, data position; loaded with weights_only=True
        latest.json             {"checkpoint": "step-00000300", "step": 300}

Saving (``save_checkpoint``) goes: write the files into a hidden temporary folder and
fsync them; rename the folder to ``step-N`` (the commit: a ``step-N`` folder is whole by
construction); write ``latest.json`` to a temporary file and rename it over the old one;
then move older checkpoints aside (a rename, so a half-deleted folder never carries a
``step-N`` name) and delete them. A kill at any point leaves the previous checkpoint
whole, plus at most the new one whole, so ``find_checkpoint`` (the newest whole
checkpoint, the pointer's if nothing newer) never falls back to step 0 while a whole
checkpoint exists. ``FAULT_HOOK`` lets tests stop the protocol between any two steps.

A run directory ``RUN`` also holds metrics (``metrics.csv``, ``loss.png``) and, for a run
trained from a text folder (no database), its tokenizer (``tokenizer.json``). Every reader
accepts ``RUN`` or a checkpoint folder, including the older single ``RUN/checkpoint/``
layout, which is still read (and replaced by the new layout at a resumed run's next save).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrolm.errors import IncompatibleError
from retrolm.utils import fsync_path, move_aside, unwrap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
POINTER = "latest.json"
LEGACY_DIR = "checkpoint"  # the single-folder layout of older runs (still read)
RUN_TOKENIZER = "tokenizer.json"
"""The tokenizer of a run trained from a text folder (a database run uses its database's)."""
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
KEEP = 2
"""Checkpoints a run keeps: the newest, and one before it in case the newest is damaged."""
_STEP_NAME = re.compile(r"step-(\d+)")

FAULT_POINTS = (
    "weights-written",
    "files-written",
    "folder-renamed",
    "pointer-written",
    "pointer-replaced",
    "old-moved-aside",
    "old-deleted",
)
"""The places ``save_checkpoint`` calls ``FAULT_HOOK``: between every two steps on disk."""
FAULT_HOOK: Callable[[str], None] | None = None
"""Tests only: called with each of ``FAULT_POINTS`` in turn (to kill the process there)."""


def _fault(point: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point)


def database_identity(db: Any) -> dict[str, Any]:
    """What a trained model depends on in its database (tokenizer and chunking)."""
    tok = getattr(db, "tokenizer", None)
    path = getattr(db, "path", None)
    return {
        "path": str(Path(path).resolve()) if path is not None else None,
        "tokenizer_hash": getattr(tok, "hash", None),
        "vocab_size": getattr(tok, "vocab_size", None),
        "chunk_size": int(db.chunk_size),
        "num_chunks": int(db.num_chunks) if hasattr(db, "num_chunks") else None,
        # training sequences from another corpus, neighbours in this database
        # (``retrolm train --db DB --neighbours DIR``): the neighbour set's folder
        "neighbours": _resolved(getattr(db, "neighbours_path", None)),
    }


def _resolved(path: Any) -> str | None:
    return str(Path(path).resolve()) if path is not None else None


def check_database(
    saved: dict[str, Any] | None, db: Any, where: Path, *, exact: bool = False
) -> None:
    """Raise IncompatibleError if ``db`` cannot serve a model trained on ``saved``.

    Tokenizer and chunk size must match; ``exact`` (resuming training) also needs the
    same chunk count, since the data position indexes the database's sequences.
    """
    if not saved:
        return
    now = database_identity(db)
    keys = ["tokenizer_hash", "chunk_size"] + (["num_chunks"] if exact else [])
    if exact and saved.get("neighbours") != now["neighbours"]:
        raise IncompatibleError(
            f"{where} was trained on the sequences of "
            f"{saved.get('neighbours') or 'its database'}, but this run reads "
            f"{now['neighbours'] or 'the database'}'s; rerun with the same --db and "
            "--neighbours to resume, or train a new run with --out elsewhere"
        )
    for key in keys:
        if saved.get(key) is not None and now.get(key) is not None and saved[key] != now[key]:
            raise IncompatibleError(
                f"{where} was trained with a database whose {key} is {saved[key]!r}, but "
                f"{now['path'] or 'the given database'} has {now[key]!r}; use the run's own "
                f"database ({saved.get('path')}) or train a new run with --out elsewhere"
            )


def check_data(meta: dict[str, Any], data: Any, where: Path) -> None:
    """Raise IncompatibleError unless a resumed run reads the data it was trained on:
    the same kind (a database, or a text folder: ``data.identity()``), the same database
    (``check_database``, exact) or the same files and tokenizer."""
    text = hasattr(data, "identity")
    check_data_kind(meta, text, where)
    if not text:
        check_database(meta.get("database"), data, where, exact=True)
        return
    saved_text, now = meta["text"], data.identity()
    for key in ("files", "bytes", "sha256", "tokenizer_hash", "glob"):
        if saved_text.get(key) != now[key]:
            raise IncompatibleError(
                f"{where} was trained from text whose {key} is {saved_text.get(key)!r}, but "
                f"{now['path']} now has {now[key]!r} (files added, removed or changed); "
                "restore the text to resume, or train a new run with --out elsewhere"
            )


def check_data_kind(meta: dict[str, Any], text: bool, where: Path) -> None:
    """Refuse to resume a database run from a text folder (``text``) or the reverse."""
    saved_text = meta.get("text")
    if text and saved_text is None:
        raise IncompatibleError(
            f"{where} was trained on the database {(meta.get('database') or {}).get('path')}; "
            "rerun with --db to resume it, or use another --out"
        )
    if not text and saved_text is not None:
        raise IncompatibleError(
            f"{where} was trained from the text folder {saved_text['path']}; rerun with "
            f"--text {saved_text['path']} to resume it, or use another --out"
        )


def run_tokenizer(meta: dict[str, Any], ckpt: Path) -> Any:
    """The tokenizer a run trained from a text folder keeps in ``RUN/tokenizer.json``,
    checked against the one its checkpoint records."""
    from retrolm.retrieval.tokenizer import LMTokenizer

    path = run_of(ckpt) / RUN_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {ckpt} was trained from text and reads it with that "
            "tokenizer; copy the run folder whole (or retrain)"
        )
    tok = LMTokenizer.from_file(path)
    saved = (meta.get("text") or {}).get("tokenizer_hash")
    if saved is not None and tok.hash != saved:
        raise IncompatibleError(
            f"{path} is not the tokenizer {ckpt} was trained with (hash {tok.hash[:12]}, "
            f"recorded {saved[:12]}); restore the run's own tokenizer.json"
        )
    return tok


def open_run_data(
    meta: dict[str, Any], where: Path, override: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """(database or None, tokenizer) of a run: a run trained from a text folder has no
    database and brings its own tokenizer; the others open theirs (``open_run_database``)."""
    if meta.get("text") is not None and meta.get("database") is None:
        if override is not None:
            raise ValueError(
                f"{where} was trained from text without a database (it reads no "
                "neighbours); drop --db"
            )
        return None, run_tokenizer(meta, where)
    db = open_run_database(meta, where, override)
    return db, db.tokenizer


def _is_whole(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def _saved_step(folder: Path) -> int:
    """The step in a checkpoint's config.json (-1 if unreadable)."""
    try:
        return int(json.loads((folder / CONFIG).read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def list_checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """The whole checkpoints of ``run`` as (step, folder), oldest first (legacy layout too)."""
    run = Path(run)
    found = []
    root = run / CHECKPOINTS_DIR
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_NAME.fullmatch(d.name)
            if m and d.is_dir() and _is_whole(d):
                found.append((int(m.group(1)), d))
    legacy = run / LEGACY_DIR
    if _is_whole(legacy):
        found.append((_saved_step(legacy), legacy))
    # at equal steps the versioned folder wins over the legacy one
    return sorted(found, key=lambda sd: (sd[0], sd[1].parent.name == CHECKPOINTS_DIR))


def find_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest whole checkpoint of run directory ``run``, or None if it has none.

    ``latest.json`` names the newest one unless a save was killed after its folder was
    committed but before the pointer moved; the newer whole folder wins then (logged).
    """
    found = list_checkpoints(run)
    if not found:
        return None
    step, newest = found[-1]
    pointer = Path(run) / CHECKPOINTS_DIR / POINTER
    try:
        named = json.loads(pointer.read_text())["checkpoint"]
    except FileNotFoundError:
        named = None
    except (OSError, ValueError, KeyError, TypeError):
        named = "(unreadable)"
    if newest.parent.name == CHECKPOINTS_DIR and named != newest.name:
        log.info(
            "%s names %s, but %s (step %d) is the newest whole checkpoint: using it",
            pointer,
            named,
            newest,
            step,
        )
    return newest


def resolve_checkpoint(run: str | os.PathLike) -> Path:
    """``RUN`` or a checkpoint folder -> the checkpoint folder (with a clear error)."""
    run = Path(run)
    if (run / CONFIG).is_file():
        return run
    found = find_checkpoint(run)
    if found is not None:
        return found
    if not run.exists():
        raise FileNotFoundError(
            f"run directory {run} does not exist; train one with `retrolm train --out {run}`"
        )
    raise FileNotFoundError(
        f"no checkpoint in {run} (expected {run / CHECKPOINTS_DIR / POINTER}); "
        f"train first with `retrolm train --out {run}`, or let a killed run save once"
    )


def run_of(ckpt: Path) -> Path:
    """The run directory that holds checkpoint folder ``ckpt`` (where eval reports go)."""
    if ckpt.parent.name == CHECKPOINTS_DIR and _STEP_NAME.fullmatch(ckpt.name):
        return ckpt.parent.parent
    return ckpt.parent


def read_config(ckpt: Path) -> dict[str, Any]:
    path = ckpt / CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IncompatibleError(
            f"{path} is corrupt ({e.__class__.__name__}: {e}); delete {ckpt} and retrain"
        ) from None
    if not isinstance(meta, dict) or "family" not in meta or "model_config" not in meta:
        raise IncompatibleError(
            f"{path} is not a retrolm checkpoint config; delete {ckpt} and retrain"
        )
    if meta.get("format", 0) > FORMAT_VERSION:
        raise IncompatibleError(
            f"{path} has format {meta['format']} (this retrolm reads <= {FORMAT_VERSION}); "
            "upgrade retrolm"
        )
    return meta


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    *,
    keep: int = KEEP,
) -> Path:
    """Write ``RUN/checkpoints/step-N`` (N = ``meta["step"]``) and point ``latest.json`` at it.

    Every intermediate state on disk is recoverable (see the module docstring); the
    ``keep`` newest checkpoints stay. The caller holds the run's lock (``train`` does).
    """
    from safetensors.torch import save_model

    if keep < 1:
        raise ValueError(f"keep={keep} must be at least 1 (the checkpoint just written)")
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("step", 0))
    dest = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=root))
    try:
        save_model(unwrap(model), str(tmp / WEIGHTS))
        _fault("weights-written")
        (tmp / CONFIG).write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for f in tmp.iterdir():  # durable before the rename makes it visible
            fsync_path(f)
        fsync_path(tmp)
        _fault("files-written")
        if dest.exists():  # a damaged checkpoint of this step, skipped by the resume
            move_aside(dest)
        os.replace(tmp, dest)
        fsync_path(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fault("folder-renamed")
    _write_pointer(root, dest.name, step)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        trash = move_aside(old)
        _fault("old-moved-aside")
        shutil.rmtree(trash, ignore_errors=True)
        _fault("old-deleted")
    # what saves killed earlier left: temporaries and checkpoints moved aside
    for left in [*root.glob(".*.tmp"), *run_dir.glob(f".{LEGACY_DIR}.old.*.tmp")]:
        shutil.rmtree(left) if left.is_dir() else left.unlink()
    log.debug("saved %s", dest)
    return dest


def _write_pointer(root: Path, name: str, step: int) -> None:
    tmp = root / f".{POINTER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"checkpoint": name, "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    _fault("pointer-written")
    os.replace(tmp, root / POINTER)
    fsync_path(root)
    _fault("pointer-replaced")


def load_weights(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_model

    path = ckpt / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete, retrain")
    try:
        load_model(unwrap(model), str(path), strict=True)
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise IncompatibleError(
            f"{path} cannot be loaded ({first}); the checkpoint is corrupt or from another "
            f"model: delete {ckpt} and retrain"
        ) from None


def load_train_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; cannot resume training from {ckpt}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IncompatibleError(
            f"{path} cannot be read ({e.__class__.__name__}); delete {ckpt} to start over"
        ) from None


def load_model(
    run: str | os.PathLike, *, family: str | None = None, map_location: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in ``run`` (a run or checkpoint directory).

    ``family``: the expected model family; a run of another family is refused.
    Returns (model in eval mode, config.json contents).
    """
    from retrolm.models.registry import get_family

    ckpt = resolve_checkpoint(run)
    meta = read_config(ckpt)
    if family is not None and meta["family"] != family:
        raise IncompatibleError(
            f"{ckpt} holds a {meta['family']!r} model, not {family!r}; "
            f"use --model {meta['family']} or another run directory"
        )
    fam = get_family(meta["family"])
    try:
        cfg = fam.make_config(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise IncompatibleError(f"{ckpt / CONFIG}: bad model_config ({e}); retrain") from None
    model = fam.build(cfg)
    load_weights(model, ckpt)
    return model.to(map_location).eval(), meta


def open_run_database(meta: dict[str, Any], where: Path, override: str | os.PathLike | None = None):
    """The retrieval database a run was trained with (or ``override``), checked compatible."""
    from retrolm.retrieval import RetrievalDatabase

    saved = meta.get("database") or {}
    path = override or saved.get("path")
    if path is None:
        raise ValueError(f"{where} records no database; pass --db DB_DIR")
    if not Path(path).exists():
        raise FileNotFoundError(
            f"database {path} (recorded in {where}) does not exist; pass --db DB_DIR"
        )
    db = RetrievalDatabase.open(path)
    check_database(saved, db, where)
    return db
