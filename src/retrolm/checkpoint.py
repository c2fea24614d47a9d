"""Checkpoints: a directory written atomically.

    RUN/checkpoint/
        model.safetensors   weights (no pickle)
        config.json         format, model family + config, train config, database identity, step
        train_state.pt      optimizer, step, RNG, data position; loaded with weights_only=True

A run directory ``RUN`` holds ``checkpoint/`` plus metrics (``metrics.csv``, ``loss.png``).
Every reader accepts either ``RUN`` or ``RUN/checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrolm.errors import IncompatibleError
from retrolm.utils import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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
    }


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
    for key in keys:
        if saved.get(key) is not None and now.get(key) is not None and saved[key] != now[key]:
            raise IncompatibleError(
                f"{where} was trained with a database whose {key} is {saved[key]!r}, but "
                f"{now['path'] or 'the given database'} has {now[key]!r}; use the run's own "
                f"database ({saved.get('path')}) or train a new run with --out elsewhere"
            )


def resolve_checkpoint(run: str | os.PathLike) -> Path:
    """``RUN`` or ``RUN/checkpoint`` -> the checkpoint directory (with a clear error)."""
    run = Path(run)
    for cand in (run / CHECKPOINT_DIR, run):
        if (cand / CONFIG).is_file():
            return cand
    if not run.exists():
        raise FileNotFoundError(
            f"run directory {run} does not exist; train one with `retrolm train --out {run}`"
        )
    raise FileNotFoundError(
        f"no checkpoint in {run} (expected {run / CHECKPOINT_DIR / CONFIG}); "
        f"train first with `retrolm train --out {run}`, or let a killed run save once"
    )


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
) -> Path:
    """Write ``RUN/checkpoint`` atomically: readers see the old one or the new one, whole."""
    from safetensors.torch import save_model

    dest = Path(run_dir) / CHECKPOINT_DIR
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        save_model(unwrap(model), str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for f in tmp.iterdir():  # durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return dest


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
