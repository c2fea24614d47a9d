"""RETRO-fit on the bundled corpus (issue 26): does chunked cross-attention learn to read
neighbours when the decoder is already trained and frozen?

The demo's setting (``retrolm.demo``: KJV books with their parallels, the bundled encoder,
a 4096-token BPE, 64-token chunks, the ``retro-demo`` decoder 128 x 4, 2 neighbours in
training, 10 when scored) through the real pipeline:

1. base: the demo's decoder trained without retrieval (``train --no-retrieval``);
2. RETRO-fit: the base frozen, a neighbour encoder and CCA (no copy head) trained for a
   fraction of the base's steps (``train --retrofit runs/base``);
3. RETRO from scratch, paper RETRO (CCA, no copy head), for base + RETRO-fit steps.

Held-out bits/byte (2 Chronicles and Mark, never in the database): base; RETRO-fitted
with retrieval; the same with retrieval off (must equal the base: CCA adds nothing without
neighbours); RETRO from scratch with and without retrieval. Target: RETRO-fit with CCA
alone >= 5% below the base.

Every stage is cached in --work (rerun to resume); --variant NAME=JSON adds a RETRO-fit run
with other settings (e.g. ``lr3e-3='{"lr": 3e-3}'`` or ``l4='{"cca_layers": [4]}'``).

    python -m benchmarks.retrofit.retrofit_demo --base-steps 1200 --retrofit-steps 300
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks import common

BOOKS = 8  # the first books of retrolm.demo.PRIORITY: the held-out books' parallels first


def build_db(work: Path, books: int) -> Path:
    from retrolm.demo import DEMO_MODEL, PRIORITY, _split, default_corpus, extract
    from retrolm.retrieval import BuildConfig, build_database

    kjv = extract(default_corpus(), work)
    train_dir, _ = _split(kjv, work, list(PRIORITY[:books]))
    db = work / "db"
    cfg = BuildConfig(
        chunk_size=64,
        seq_len=DEMO_MODEL["max_seq_len"],
        vocab_size=4096,
        neighbours=2,
        extra_neighbours=8,
    )
    build_database(train_dir, db, cfg)
    return db


def train_run(db: Path, run: Path, family: str, model_config: dict, train: dict) -> dict:
    from retrolm.train import TrainConfig
    from retrolm.train import train as train_fn

    cfg = TrainConfig(**{"eval_every": 0, "plot": False, "weight_decay": 0.1, **train})
    cfg.save_every = cfg.steps
    t0 = time.perf_counter()
    res = train_fn(db, run, cfg, family=family, model_config=model_config)
    return {"steps": res.step, "train_s": round(time.perf_counter() - t0, 1), "loss": res.loss}


def score(run: Path, db: Path, held: Path, max_tokens: int, retrieval: bool) -> dict:
    from retrolm.checkpoint import load_model
    from retrolm.demo import EVAL_NEIGHBOURS
    from retrolm.evaluate import EvalConfig, evaluate
    from retrolm.retrieval import RetrievalDatabase

    model, _ = load_model(run)
    d = RetrievalDatabase.open(db)
    cfg = EvalConfig(num_neighbours=EVAL_NEIGHBOURS, max_tokens=max_tokens)
    if retrieval:
        r = evaluate(model, held, d, config=cfg)
    else:
        r = evaluate(model, held, None, tokenizer=d.tokenizer, config=cfg)
    out = {mode: round(v["bits_per_byte"], 4) for mode, v in r.modes.items()}
    # neighbour quality: the share of held-out chunks whose neighbours overlap them
    out["overlap"] = {str(x["alpha"]): round(x["fraction"], 3) for x in r.leakage}
    return out


def cached(path: Path, make) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    out = make()
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--work", default="/tmp/retrofit-demo")
    ap.add_argument("--base-steps", type=int, default=1200)
    ap.add_argument("--retrofit-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="base and scratch RETRO")
    ap.add_argument("--retrofit-lr", type=float, default=2e-3)
    ap.add_argument("--cca-layers", default="2,4")
    ap.add_argument("--max-tokens", type=int, default=8192, help="scored per held-out book")
    ap.add_argument("--max-minutes", type=float, default=12.0, help="per training run")
    ap.add_argument("--no-scratch", action="store_true", help="skip RETRO from scratch")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from retrolm.demo import DEMO_PRESET
    from retrolm.models.retro.config import PRESETS

    t_start = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    db = build_db(work, BOOKS)
    held = work / "heldout_text"
    common_train = dict(batch_size=a.batch, precision="fp32", seed=0, max_minutes=a.max_minutes)

    def sched(steps: int, lr: float) -> dict:
        return dict(common_train, steps=steps, lr=lr, warmup_steps=max(5, steps // 20))

    demo = dict(PRESETS[DEMO_PRESET])
    rows: dict[str, Any] = {}
    base = work / "runs" / "base"
    rows["base"] = cached(work / "base.json", lambda: {
        **train_run(db, base, "retro", demo, dict(sched(a.base_steps, a.lr), retrieval=False)),
        "bpb": score(base, db, held, a.max_tokens, retrieval=False),
    })  # fmt: skip
    layers = [int(x) for x in a.cca_layers.split(",")]
    variants = {"retrofit": {}}
    for v in a.variant:
        name, _, js = v.partition("=")
        variants[name] = json.loads(js)
    for name, over in variants.items():
        rows[name] = cached(work / f"{name}.json", lambda o=over, n=name: retrofit_row(
            db, base, held, work / "runs" / n, a, dict(o), layers, sched))  # fmt: skip
    if not a.no_scratch:
        scratch = work / "runs" / "scratch"
        # the steps base and RETRO-fit reached (a run cut by --max-minutes stops early)
        steps = rows["base"]["steps"] + rows["retrofit"]["steps"]
        rows["scratch"] = cached(work / "scratch.json", lambda: {
            **train_run(db, scratch, "retro", dict(demo, copy_head=False), sched(steps, a.lr)),
            "bpb": score(scratch, db, held, a.max_tokens, retrieval=True),
        })  # fmt: skip
    report(rows)
    print(f"total {time.perf_counter() - t_start:.0f} s, load {common.load_average()}")


def retrofit_row(db, base, held, run, a, over: dict, layers, sched) -> dict:
    """Train and score one RETRO-fit of ``base`` (``over``: its settings beside the
    defaults; ``lr`` and ``steps`` are the run's)."""
    from retrolm.train.retrofit import retrofit_model_config

    lr, steps = over.pop("lr", a.retrofit_lr), over.pop("steps", a.retrofit_steps)
    batch = over.pop("batch_size", a.batch)
    values = {"cca_layers": layers, "enc_depth": 2, "dim_head": 32, **over}
    model_config = retrofit_model_config(base, db, values)
    return {
        "settings": {"lr": lr, "steps": steps, "batch_size": batch, **values},
        **train_run(db, run, "retrofit", model_config, dict(sched(steps, lr), batch_size=batch)),
        "bpb": score(run, db, held, a.max_tokens, retrieval=True),
    }


def report(rows: dict[str, Any]) -> None:
    base = rows["base"]["bpb"]["no_retrieval"]
    print(f"\n{'held-out bits/byte':44s} {'steps':>6s} {'bpb':>7s} {'vs base':>8s}")

    def line(label: str, steps: int, bpb: float) -> None:
        print(f"{label:44s} {steps:6d} {bpb:7.4f} {100 * (1 - bpb / base):7.1f}%")

    line("base (no retrieval)", rows["base"]["steps"], base)
    for name, r in rows.items():
        if name in ("base", "scratch"):
            continue
        line(f"{name}: RETRO-fit, CCA only", r["steps"], r["bpb"]["retrieval"])
        line(f"{name}: RETRO-fit, retrieval off", r["steps"], r["bpb"]["no_retrieval"])
        print(f"    settings {json.dumps(r['settings'])}, {r['train_s']:.0f} s")
    if "scratch" in rows:
        r = rows["scratch"]
        line("RETRO from scratch (CCA, no copy head)", r["steps"], r["bpb"]["retrieval"])
        line("RETRO from scratch, retrieval off", r["steps"], r["bpb"]["no_retrieval"])


if __name__ == "__main__":
    main()
