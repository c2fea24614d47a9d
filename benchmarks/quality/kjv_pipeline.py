"""Quality runs through the real pipeline on the bundled KJV corpus (``data/kjv.tar.xz``).

What ``retrolm db build``, ``retrolm train`` and ``retrolm eval`` do, for several model
configs on the same data: one database (byte-level tokenizer, i.e. the LM tokenizer with
vocabulary 258 = 256 bytes + <pad> + <eos> and no merges, so bits/byte = nats/token / ln 2
up to the <eos> tokens), then per model ``retrolm.train.train`` and ``retrolm eval RUN
--text HELD`` (in process). The families compared here read no neighbours, so the database
is embedded by a tiny random BERT: its neighbours are never used, only its tokenizer,
chunks and sequences. Held out: the demo's books (``retrolm.demo.HELD_OUT``), never in
the database; training text: the other books in name order, as much as the steps read
once (no sequence is seen twice).

The helper of ``quality_routing.py`` and ``quality_hier.py`` (not a script itself).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common

VOCAB = 258  # bytes + <pad> + <eos>: a BPE with no merges
CHUNK = 64


def prepare(work: Path, seq_len: int, train_tokens: int, held_bytes: int) -> tuple[Path, Path]:
    """Text folders and the database (reused when ``work`` already has them)."""
    from retrolm.demo import HELD_OUT

    db = work / "db"
    held = work / "held"
    if (db / "manifest.json").is_file():
        return db, held
    with tarfile.open(common.ROOT / "data" / "kjv.tar.xz") as tar:
        books = {
            Path(m.name).stem: tar.extractfile(m).read().decode("utf-8")
            for m in tar.getmembers()
            if m.isfile() and m.name.endswith(".txt")
        }
    held.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT:  # the first held_bytes of each held-out book
        (held / f"{name}.txt").write_text(books[name][:held_bytes])
    text = work / "train_text"
    text.mkdir(exist_ok=True)
    size = 0
    for name in sorted(books):
        if name in HELD_OUT:
            continue
        (text / f"{name}.txt").write_text(books[name])
        size += len(books[name].encode("utf-8"))
        if size >= 1.1 * train_tokens:  # ~1 byte per token, and chunk padding per book
            break
    from tests.retrieval.conftest import make_tiny_encoder

    from retrolm.retrieval import BuildConfig, build_database

    t0 = time.perf_counter()
    enc = make_tiny_encoder(work / "enc")
    build_database(
        text,
        db,
        BuildConfig(
            encoder=str(enc),
            chunk_size=CHUNK,
            seq_len=seq_len,
            vocab_size=VOCAB,
            embed_dtype="fp32",
        ),
    )
    manifest = json.loads((db / "manifest.json").read_text())
    print(
        f"database: {size / 1e6:.2f} MB of text, {manifest.get('num_chunks')} chunks, "
        f"built in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return db, held


def train_and_eval(
    db: Path,
    held: Path,
    run: Path,
    family: str,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    max_tokens: int,
) -> dict[str, Any]:
    """``retrolm train`` then ``retrolm eval``; returns one table row."""
    from retrolm.checkpoint import load_model
    from retrolm.cli import main as cli
    from retrolm.train import TrainConfig, train

    cfg = TrainConfig(**{"eval_every": 0, "plot": False, "num_threads": 1, **train_config})
    cfg.save_every = cfg.steps
    t0 = time.perf_counter()
    res = train(db, run, cfg, family=family, model_config=model_config)
    wall = time.perf_counter() - t0
    with open(run / "metrics.csv") as f:
        rates = [float(r["tokens_per_s"]) for r in csv.DictReader(f)]
    model, _ = load_model(run)
    t0 = time.perf_counter()
    if cli(["eval", str(run), "--text", str(held), "--max-tokens", str(max_tokens)]) != 0:
        raise SystemExit(f"retrolm eval {run} failed")
    eval_s = time.perf_counter() - t0
    modes = json.loads((run / "eval" / "eval.json").read_text())["modes"]
    report = modes.get("no_retrieval") or next(iter(modes.values()))  # a family's first mode
    by_mode = {m: round(v["bits_per_byte"], 4) for m, v in modes.items()} if len(modes) > 1 else {}
    return {
        **({"bits_per_byte_by_mode": by_mode} if by_mode else {}),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": res.step,
        "precision": res.precision,
        # per optimizer step, without the first 5 (warm-up); train wall time includes the
        # precision probe and the final checkpoint
        "train_tokens_per_s": round(statistics.median(rates[5:] or rates), 1),
        "train_wall_s": round(wall, 1),
        "held_out_bits_per_byte": round(report["bits_per_byte"], 4),
        "held_out_token_ppl": round(report["perplexity"], 3),
        "held_out_tokens": report["tokens"],
        "eval_s": round(eval_s, 1),
        "final_train_loss": round(res.loss, 4) if res.loss is not None else None,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| model | params | steps | precision | train tokens/s | held-out bits/byte | ppl |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['precision']} | "
            f"{r['train_tokens_per_s']:,} | {r['held_out_bits_per_byte']} | "
            f"{r['held_out_token_ppl']} |"
        )


def compare(
    doc: str,
    family: str,
    models: dict[str, Callable[[argparse.Namespace], dict[str, Any]]],
    *,
    steps: int,
    seq_len: int,
    work_name: str,
    window: int | None = None,
) -> None:
    """The command line of a quality script: train and evaluate every model of ``models``
    (name -> model config from the parsed arguments) on one database, print the table."""
    ap = common.parser(doc)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    if window is not None:
        ap.add_argument("--window", type=int, default=window, help="attention window")
    ap.add_argument("--held-bytes", type=int, default=16384, help="per held-out book")
    ap.add_argument("--precision", default="bf16", help="fp32, bf16 or auto")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), work_name))
    ap.add_argument("--only", nargs="+", choices=list(models), help="run only these models")
    a = ap.parse_args()
    common.set_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    work = Path(a.work)
    db, held = prepare(work, a.seq_len, a.steps * a.batch * a.seq_len, a.held_bytes)
    train = dict(
        steps=a.steps,
        batch_size=a.batch,
        seq_len=a.seq_len,
        lr=1e-3,
        warmup_steps=max(1, a.steps // 10),
        precision=a.precision,
        seed=a.seed,
    )
    rows = []
    for i, (name, make) in enumerate(models.items()):
        if a.only and name not in a.only:
            continue
        run = work / f"run-{i}"
        shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resume
        row = train_and_eval(db, held, run, family, make(a), train, a.held_bytes + 1)
        rows.append({"model": name, **row})
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    print(f"total {time.perf_counter() - t_start:.0f} s")
