"""``retrolm export RUN OUT_DIR``: a training run as a folder to share.

The run's newest checkpoint becomes a pretrained folder (``retrolm.models.pretrained``:
``model.safetensors``, ``config.json``, ``tokenizer.json``, ``README.md``) that
``retrolm.from_pretrained`` loads and ``push_to_hub`` uploads. The model card records the
family, parameters, steps, training data and, when ``RUN/eval/eval.json`` exists, the
evaluation table (bits/byte with and without retrieval or memory). A RETRO run also records
the identity of its retrieval database (encoder name and sha256, tokenizer hash, chunk size),
read from the database's manifest, so a user can rebuild a database it can read.

Absolute paths of this machine (the run's text folder, the database, the encoder) are left
out of what is shared: folder names, sizes and digests identify the data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from retrolm.checkpoint import load_model, resolve_checkpoint, run_of, run_tokenizer
from retrolm.errors import IncompatibleError
from retrolm.model_card import model_card
from retrolm.models.pretrained import parameter_count
from retrolm.models.registry import get_family

log = logging.getLogger(__name__)

EVAL_REPORT = Path("eval") / "eval.json"
"""Where ``retrolm eval RUN`` leaves its report (read for the card's table)."""


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR must be new or an empty folder (an export never overwrites)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"{out_dir} already exists and is not an empty folder; choose a new OUT_DIR "
            "(an export never overwrites)"
        )


def _database_folder(meta: dict[str, Any], ckpt: Path, override: Any) -> Path:
    saved = meta.get("database") or {}
    path = override or saved.get("path")
    if path is None:
        raise ValueError(f"{ckpt} records no database; pass --db DB_DIR")
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"database {path} (recorded in {ckpt}) does not exist; the export needs its "
            "tokenizer and manifest: pass --db DB_DIR"
        )
    return Path(path)


def run_tokenizer_and_database(
    meta: dict[str, Any], ckpt: Path, db: str | os.PathLike | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """(LM tokenizer, database manifest or None) of a run, without opening its index: a text
    run keeps ``RUN/tokenizer.json``; a database run reads the database's tokenizer (checked
    against the hash the run recorded) and manifest."""
    from retrolm.retrieval.store import TOKENIZER_FILE, read_manifest
    from retrolm.retrieval.tokenizer import LMTokenizer

    if meta.get("text") is not None and meta.get("database") is None:
        if db is not None:
            raise ValueError(f"{ckpt} was trained from text without a database; drop --db")
        return run_tokenizer(meta, ckpt), None
    folder = _database_folder(meta, ckpt, db)
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        raise IncompatibleError(f"{folder} is not a complete retrolm database; pass --db DB_DIR")
    tok = LMTokenizer.from_file(folder / TOKENIZER_FILE)
    saved = (meta.get("database") or {}).get("tokenizer_hash")
    if saved is not None and tok.hash != saved:
        raise IncompatibleError(
            f"{folder} has tokenizer {tok.hash[:12]}, but {ckpt} was trained with "
            f"{saved[:12]}: pass the run's own database with --db"
        )
    return tok, manifest


def database_identity(manifest: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """What a RETRO model needs of any database it reads: the encoder that embedded the
    chunks (name, sha256, pooling, length), the tokenizer, the chunk size."""
    enc = manifest.get("encoder") or {}
    saved = meta.get("database") or {}
    return {
        "encoder": enc.get("name"),
        "encoder_sha256": enc.get("sha256"),
        "encoder_pooling": enc.get("pooling"),
        "encoder_max_length": enc.get("max_length"),
        "tokenizer_hash": manifest["tokenizer"]["hash"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "chunk_size": int(manifest["chunk_size"]),
        "num_chunks": saved.get("num_chunks", manifest.get("num_chunks")),
    }


def training_data(meta: dict[str, Any], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What the run was trained on, by folder name, size and digest (no local paths)."""
    text = meta.get("text")
    if text is not None:
        return {
            "kind": "text folder",
            "name": Path(text["path"]).name,
            "files": text.get("files"),
            "bytes": text.get("bytes"),
            "sha256": text.get("sha256"),
        }
    inputs = (manifest or {}).get("inputs") or {}
    return {
        "kind": "retrieval database",
        "name": Path((meta.get("database") or {}).get("path") or "database").name,
        "files": inputs.get("files"),
        "bytes": inputs.get("bytes"),
        "sha256": inputs.get("sha256"),
        "chunks": (manifest or {}).get("num_chunks"),
    }


def read_eval_report(run: Path) -> dict[str, Any] | None:
    """``RUN/eval/eval.json`` (what ``retrolm eval`` wrote), or None if absent or unreadable."""
    path = run / EVAL_REPORT
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): the card gets no evaluation table", path, e)
        return None
    modes = report.get("modes") if isinstance(report, dict) else None
    ok = isinstance(modes, dict) and all(
        isinstance(r, dict) and isinstance(r.get("bits_per_byte"), (int, float))
        for r in modes.values()
    )
    return report if ok and modes else None


def eval_markdown(report: dict[str, Any]) -> str:
    """An ``eval.json`` report as the Markdown table ``retrolm eval`` writes (``eval.md``)."""
    from retrolm.evaluate import EvalResult

    def nan(row: dict[str, Any]) -> dict[str, Any]:  # strict JSON kept empty bins as null
        return {k: math.nan if v is None else v for k, v in row.items()}

    leakage = [nan(r) for r in report.get("leakage") or [] if isinstance(r, dict)]
    return EvalResult(modes=report["modes"], leakage=leakage).markdown()


def export_run(
    run: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    db: str | os.PathLike | None = None,
    name: str | None = None,
) -> Path:
    """Write the pretrained folder of ``run``'s newest checkpoint to ``out_dir`` (new or
    empty) and return it. ``db``: the run's database, where it moved; ``name``: the Hub
    repository id the card's loading example names (default: the folder's name)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    ckpt = resolve_checkpoint(run)
    model, meta = load_model(ckpt)
    fam = get_family(meta["family"])
    tok, manifest = run_tokenizer_and_database(meta, ckpt, db)
    database = database_identity(manifest, meta) if fam.uses_retrieval and manifest else None
    data = training_data(meta, manifest)
    report = read_eval_report(run_of(ckpt))
    eval_data = table = None
    if report is not None:
        table = eval_markdown(report)
        eval_data = {"held-out documents": report.get("documents")}
        if report.get("chunks"):  # retrieval chunks scored (RETRO only)
            eval_data["chunks"] = report["chunks"]
    steps = meta.get("step")
    card = model_card(
        family=fam.name,
        model_class=type(model).__name__,
        parameters=parameter_count(model),
        config=meta["model_config"],
        steps=steps,
        training_data=data,
        database=database,
        eval_modes=report["modes"] if report else None,
        eval_data=eval_data,
        eval_table=table,
        name=name or out_dir.name,
    )
    metadata = {
        "steps": steps,
        "seq_len": meta.get("seq_len"),
        "training_data": data,
        "train_config": meta.get("train_config"),
        "eval": report["modes"] if report else None,
    }
    return model.save_pretrained(
        out_dir, tokenizer=tok, database=database, card=card, metadata=metadata
    )
