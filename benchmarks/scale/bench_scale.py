"""Database build at scale: time and peak memory of each stage at 0.1M, 0.3M and 1M chunks.

Every stage is the build's own code (``retrolm.retrieval.build`` and ``index``), run in its
own process so that its peak memory is its own: peak RSS (``VmHWM``) and the peak of its
anonymous memory (``RssAnon``, sampled every 5 ms; file pages a stage maps are not in it).

- chunk: real text. The bundled KJV (``data/kjv.tar.xz``) is repeated as separate
  documents (symlinked copies) until the corpus holds N chunks of 64 tokens, tokenized with
  a 16384-token BPE trained once on the KJV (the tokenizer stage is not timed).
- embed: the real encoder (the bundled MiniLM, ``embed_dtype auto``) on ``--embed-blocks``
  evenly spaced blocks of 1024 chunks of that database (the rest are marked done; blocks of
  1024, not the build's 4096, to keep the run short on 2 cores); the stage time is
  extrapolated: fixed cost + N / (chunks per second of the encoder calls).
- index train / index add: synthetic keys in the database's file format, drawn to resemble
  real ones (a mixture of 4096 Gaussian clusters in 384-d, unit-normalised), with the index
  the build chooses for N (``choose_index``, ``--index auto``, ``--memory-budget 4G``).
  Train and add are ``index.train_index`` and ``index.add_vectors``, which ``build_index``
  chains; each runs whole.
- neighbours: the build's stage over ``--query-blocks`` evenly spaced query blocks of 4096
  (the rest marked done); its time is extrapolated: fixed cost + blocks x mean block time.

Memory that holds the product itself grows with N by design: the index (add, neighbours),
the training sample (train: ``train_size`` rows, capped at 1M) and the doc_ids (N x 4
bytes, neighbours). ``working`` = peak RSS minus those bytes; the target is that it stays
flat (at most 1.2x from 0.1M to 1M chunks).

Writes ``benchmarks/scale/results.json`` (every row) and, with ``--save-rates``, the rates
``retrolm db plan`` ships (``src/retrolm/retrieval/scale_rates.json``).

    python -m benchmarks.scale.bench_scale [--sizes 100000,300000,1000000] [--save-rates]
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

HERE = Path(__file__).resolve().parent
RATES_FILE = common.ROOT / "src" / "retrolm" / "retrieval" / "scale_rates.json"
DIM, BLOCK, EMBED_BLOCK, CENTRES = 384, 4096, 1024, 4096


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def prepare_kjv(work: Path) -> tuple[Path, Path, int]:
    """The KJV books, a tokenizer trained on them, and the chunks one copy makes."""
    from retrolm.retrieval import chunking
    from retrolm.retrieval.tokenizer import LMTokenizer

    books, tok_file = work / "kjv", work / "tokenizer.json"
    if not tok_file.is_file():
        books.mkdir(parents=True, exist_ok=True)
        with tarfile.open(common.ROOT / "data" / "kjv.tar.xz") as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".txt"):
                    (books / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        paths = chunking.list_documents(books)
        LMTokenizer.train(chunking.iter_texts(paths), 16384).save(tok_file)
    tok = LMTokenizer.from_file(tok_file)
    paths = chunking.list_documents(books)
    per_copy = sum(
        len(r) for p in paths for r in chunking.document_rows(chunking.read_document(p), tok, 64)
    )
    return books, tok_file, per_copy


def make_corpus(books: Path, out: Path, copies: int) -> None:
    if out.exists():
        shutil.rmtree(out)
    for c in range(copies):
        d = out / f"copy{c:04d}"
        d.mkdir(parents=True)
        for p in sorted(books.glob("*.txt")):
            (d / p.name).symlink_to(p)


def write_synthetic_keys(path: Path, n: int, seed: int = 0) -> None:
    """n unit vectors (n, 384) float32: 4096 Gaussian clusters, written block by block."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with open(path, "r+b") as f:
        for s in range(0, n, 65536):
            b = min(65536, n - s)
            x = centres[rng.integers(0, CENTRES, b)]
            x = x + 0.06 * rng.standard_normal((b, DIM)).astype(np.float32)  # cos to centre ~0.6
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.seek(s * DIM * 4)
            f.write(x.astype(np.float32).tobytes())


def mark_all_but(db: Path, stage: str, n: int, keep: int, block: int = BLOCK) -> list[int]:
    """Mark every block of ``stage`` done except ``keep`` evenly spaced ones (returned)."""
    from retrolm.retrieval.store import _Blocks

    blocks = _Blocks(db, stage, n, block)
    sample = sorted({int(i) for i in np.linspace(0, blocks.count - 1, min(keep, blocks.count))})
    for i in range(blocks.count):
        if i not in sample:
            blocks.mark(i)
    return sample


def stage(name: str, db: Path, *extra: str) -> dict:
    row = common.rerun("benchmarks.scale.scale_stage", name, str(db), *extra)
    print(
        f"  {name:10s} {row['seconds']:8.1f} s  peak RSS {row['peak_rss_mb']:7.0f} MB  "
        f"anon {row['peak_anon_mb']:7.0f} MB  {row.get('note', '')}",
        flush=True,
    )
    return row


def rerun_stages(old: dict, work: Path, stages: list[str], args) -> dict:
    """``old`` (a size's row of an earlier run) with ``stages`` measured again on its
    database (still in ``work``); the stages' inputs must be there (train before add)."""
    db = work / f"db-{old['target']}"
    print(f"N = {old['num_chunks']}: rerunning {stages}", flush=True)
    for name in stages:
        if name == "add" and not (db / "trained.faiss").is_file():
            raise FileNotFoundError(f"{db}/trained.faiss: rerun train first")
        blocks = {"embed": args.embed_blocks, "neighbours": args.query_blocks}.get(name)
        extra = () if blocks is None else (str(blocks),)
        if name == "neighbours":
            shutil.rmtree(db / ".progress" / "neighbours", ignore_errors=True)
        old["stages"][name] = dict(stage(name, db, *extra), rerun=True)
    return old


def run_size(n_target: int, work: Path, books: Path, tok_file: Path, per_copy: int, args) -> dict:
    from retrolm.retrieval.build import BuildConfig
    from retrolm.retrieval.store import EMBEDDINGS_FILE, _preallocate, write_manifest

    text, db = work / f"text-{n_target}", work / f"db-{n_target}"
    make_corpus(books, text, math.ceil(n_target / per_copy))
    shutil.rmtree(db, ignore_errors=True)
    db.mkdir(parents=True)
    shutil.copy(tok_file, db / "tokenizer.json")
    config = BuildConfig(tokenizer=str(tok_file), chunk_size=64, seq_len=2048)
    write_manifest(
        db,
        {
            "text_dir": str(text.resolve()),
            "report": {},
            "stages_done": ["tokenizer"],
            "config": config.output_settings(),
            "tokenizer": {"file": "tokenizer.json"},
        },
    )
    print(f"N ~ {n_target}: {math.ceil(n_target / per_copy)} copies of the KJV", flush=True)
    rows = {"chunk": stage("chunk", db)}
    n = rows["chunk"]["num_chunks"]
    rows["embed"] = stage("embed", db, str(args.embed_blocks))
    # the synthetic keys replace every row (the embedded sample too)
    manifest = json.loads((db / "manifest.json").read_text())
    _preallocate(db / EMBEDDINGS_FILE, n * DIM * 4)
    write_synthetic_keys(db / EMBEDDINGS_FILE, n)
    manifest["stages_done"].append("embed")
    write_manifest(db, manifest)
    rows["train"] = stage("train", db)
    rows["add"] = stage("add", db)
    rows["neighbours"] = stage("neighbours", db, str(args.query_blocks))
    return {"target": n_target, "num_chunks": n, "stages": rows}


def working_mb(row: dict) -> float:
    return row["peak_rss_mb"] - row.get("resident_data_mb", 0.0)


def report(results: list[dict]) -> None:
    print(
        "\nstage        N         time s  peak RSS MB  data MB  working MB  (data = index, "
        "training sample, doc_ids)"
    )
    for r in results:
        for name, row in r["stages"].items():
            print(
                f"{name:10s} {r['num_chunks']:9d} {row['seconds']:9.1f} {row['peak_rss_mb']:11.0f}"
                f" {row.get('resident_data_mb', 0):8.0f} {working_mb(row):10.0f}"
                f"{'  (extrapolated)' if row.get('extrapolated') else ''}"
            )
    first, last = results[0], results[-1]
    print(f"\nworking memory, {last['num_chunks']} vs {first['num_chunks']} chunks:")
    for name in first["stages"]:
        a, b = working_mb(first["stages"][name]), working_mb(last["stages"][name])
        print(f"  {name:10s} {b / a:5.2f}x  {'ok' if b / a <= 1.2 else 'NOT FLAT'} (<= 1.2x)")


def rates(results: list[dict], cmd: str) -> dict:
    """What ``retrolm db plan`` needs: per-stage cost coefficients and memory overheads."""
    from retrolm.retrieval import plan

    out = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": cmd,
        "dim": DIM,
        "block_size": BLOCK,
        "stages": {},
        "measured": [
            {
                "num_chunks": r["num_chunks"],
                **{k: {"seconds": v["seconds"], "peak_rss_mb": v["peak_rss_mb"]}
                   for k, v in r["stages"].items()},
            }
            for r in results
        ],
    }  # fmt: skip
    return plan.fit_rates(results, out)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--sizes", default="100000,300000,1000000", help="chunks per database")
    ap.add_argument("--work", default="/tmp/retrolm-bench-scale", help="corpora and databases")
    ap.add_argument("--embed-blocks", type=int, default=1, help="blocks of 1024 embedded")
    ap.add_argument("--query-blocks", type=int, default=2, help="blocks of 4096 searched")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="every measured row")
    ap.add_argument(
        "--rerun",
        help="measure stages again on the last run's databases, e.g. 300000:train+add",
    )
    ap.add_argument("--save-rates", action="store_true", help=f"write {RATES_FILE.name}")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    books, tok_file, per_copy = prepare_kjv(work)
    print(f"KJV: {per_copy} chunks per copy; CPU {cpu_name()}, load {common.load_average()}")
    if args.rerun:  # "SIZE:stage+stage,SIZE:stage" on the databases of the last run
        results = json.loads(Path(args.out).read_text())["results"]
        for item in args.rerun.split(","):
            size, stages = item.split(":")
            row = next(r for r in results if r.get("target", r["num_chunks"]) == int(size))
            rerun_stages(row, work, stages.split("+"), args)
    else:
        results = [
            run_size(int(s), work, books, tok_file, per_copy, args) for s in args.sizes.split(",")
        ]
    Path(args.out).write_text(json.dumps({"results": results}, indent=1))  # kept if below fails
    report(results)
    cmd = "python -m benchmarks.scale.bench_scale " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("sizes",)
    )
    summary = rates(results, cmd)
    Path(args.out).write_text(json.dumps({"results": results, "rates": summary}, indent=1))
    if args.save_rates:
        RATES_FILE.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwall {time.time() - t0:.0f} s; rows in {args.out}; load {common.load_average()}")


if __name__ == "__main__":
    main()
