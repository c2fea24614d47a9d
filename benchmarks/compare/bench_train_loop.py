"""Training throughput: the full ``retrolm.train`` loop vs the bare train step.

The bare step is forward + backward + clip + AdamW on one batch already in memory. The
full loop adds everything ``retrolm train`` does: reading sequences and neighbours from
a real retrieval database (memmaps, document filtering, retrieved tokens) on a prefetch
thread, the schedule, metrics.csv, progress bar, and a checkpoint inside the timed window.
Both use the same model, batch shape and dtype (fp32), 2 threads, interleaved rounds in
fresh processes; the ratio uses medians from this run.

Config: RETRO dec 256 x 6, enc 256 x 2, CCA (3, 6), heads 4, dim_head 64, chunk 64, k = 2,
sequence 512, batch 4. The database: 12 KJV books (data/kjv.tar.xz) embedded by a tiny
random BERT (the data path's cost does not depend on the encoder's quality).

    python -m benchmarks.compare.bench_train_loop [--rounds 2] [--steps 8]
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks import common

BATCH, WARMUP = 4, 2


def model_config() -> dict:
    """The issue's benchmark model at seq 512; the vocabulary comes from the database."""
    return dict(common.retro_bench_model("num_tokens"), max_seq_len=512)


def make_db(work: Path) -> Path:
    from tests.retrieval.conftest import make_tiny_encoder

    from retrolm.retrieval import BuildConfig, build_database

    db = work / "db"
    if (db / "manifest.json").is_file():
        return db
    with tarfile.open(common.ROOT / "data" / "kjv.tar.xz") as tar:
        tar.extractall(work, filter="data")
    text = work / "text"
    text.mkdir(exist_ok=True)
    for p in sorted((work / "kjv").glob("*.txt"))[:12]:
        (text / p.name).write_text(p.read_text())
    enc = make_tiny_encoder(work / "enc")
    build_database(
        text,
        db,
        BuildConfig(
            encoder=str(enc), chunk_size=64, seq_len=512, vocab_size=4096, embed_dtype="fp32"
        ),
    )
    return db


def bare(db_dir: Path, steps: int) -> float:
    import torch

    from retrolm.data import RETRODataset
    from retrolm.models.registry import get_family
    from retrolm.retrieval import RetrievalDatabase
    from retrolm.train import TrainConfig, collate, param_groups
    from retrolm.train.loop import _model_config

    db = RetrievalDatabase.open(db_dir)
    fam = get_family("retro")
    torch.manual_seed(0)
    model = fam.build(_model_config(fam, db, model_config(), None)).train()
    ds = RETRODataset(db, seq_len=512, num_neighbours=2)
    batch = collate([ds[i] for i in range(BATCH)], True)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    cfg = TrainConfig()
    times = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        loss = fam.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return BATCH * 512 / statistics.median(times)


def loop(db_dir: Path, steps: int) -> float:
    from retrolm.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as run:
        cfg = TrainConfig(
            steps=WARMUP + steps,
            batch_size=BATCH,
            seq_len=512,
            precision="fp32",
            eval_every=0,
            save_every=WARMUP + steps // 2,
            plot=True,
            seed=0,
        )
        train(db_dir, run, cfg, model_config=model_config())
        with open(Path(run) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    # wall time between the end of the warm-up and the end of the last step: data loading,
    # logging and the checkpoint written inside the window all count
    elapsed = float(rows[-1]["elapsed_s"]) - float(rows[WARMUP - 1]["elapsed_s"])
    return BATCH * 512 * steps / elapsed


def main() -> None:
    ap = common.parser(__doc__, rounds=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "retrolm-bench-loop"))
    ap.add_argument("--child", choices=["bare", "loop"])
    a = ap.parse_args()
    work = Path(a.work)
    if a.child:
        import torch

        torch.set_num_threads(2)
        fn = bare if a.child == "bare" else loop
        common.emit({"tok_s": fn(work / "db", a.steps)})
        return
    work.mkdir(parents=True, exist_ok=True)
    make_db(work)
    res: dict[str, list[float]] = {"bare": [], "loop": []}
    for r in range(a.rounds):
        for side in ("bare", "loop"):
            args = ("--child", side, "--steps", str(a.steps), "--work", str(work))
            try:
                tok_s = common.rerun(__spec__.name, *args)["tok_s"]
            except common.ChildFailed as e:
                sys.exit(f"{side} failed:\n{e}")
            res[side].append(tok_s)
            print(f"round {r + 1}: {side}: {tok_s:.1f} tokens/s", flush=True)
    b, lp = statistics.median(res["bare"]), statistics.median(res["loop"])
    print(f"full loop / bare step: {lp / b:.3f} ({100 * (1 - lp / b):.1f}% slower)")


if __name__ == "__main__":
    main()
