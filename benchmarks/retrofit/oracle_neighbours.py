"""Can CCA, RETRO-fitted onto the demo's frozen decoder, use neighbours at all? An oracle.

The RETRO-fit demonstration (``retrofit_demo.py``) finds CCA alone gains almost nothing over
the base with the database's real neighbours. This separates the two possible causes, the
mechanism or the neighbours, by training the same RETRO-fit (same base, CCA layers, encoder,
learning rate, steps) on three kinds of neighbours for every chunk u of a training window:

- ``oracle``: the text that actually follows chunk u (chunks u+1 and u+2 of the same document,
  i.e. the neighbour a perfect database would return, continuation included; position
  u*m+m-1 on reads it, so the next 64 tokens are in plain view);
- ``database``: the database's own stored neighbours of chunk u (what training uses);
- ``random``: chunks drawn at random from the database.

It reports the held-out loss of each against the frozen base's on the same windows (windows
of the last 10% of each document, never trained on). If ``oracle`` drops far below the base,
CCA works and the demo's small gain is the neighbours' (a 4,428-chunk database of one
translation holds few passages that continue a held-out one).

    python -m benchmarks.retrofit.oracle_neighbours --work /work/runs/retrofit14 --steps 150
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

log = logging.getLogger("oracle_neighbours")


def windows(db, m: int, chunks_per_window: int, held: bool) -> list[tuple[int, int]]:
    """(first chunk row, document) of each window of whole chunks whose 2 following chunks are
    in the same document; the last 10% of each document's windows when ``held``."""
    doc = np.asarray(db.doc_ids)
    out = []
    for d in np.unique(doc):
        rows = np.flatnonzero(doc == d)
        starts = list(range(rows[0], rows[-1] - chunks_per_window - 2 + 1, chunks_per_window))
        cut = int(len(starts) * 0.9)
        out += [(s, int(d)) for s in (starts[cut:] if held else starts[:cut])]
    return out


def batch(db, picks, chunks_per_window: int, kind: str, rng) -> tuple[torch.Tensor, ...]:
    """(seq (b, n+1), retrieved (b, L, k, 2m), mask (b, L, k)) for the windows ``picks``."""
    chunks = np.asarray(db.chunks)  # (N, m+1): a chunk and the token after it
    m = chunks.shape[1] - 1
    n_all, k = chunks.shape[0], 2
    seqs, rets = [], []
    for s in picks:
        body = chunks[s : s + chunks_per_window, :m].reshape(-1)
        seqs.append(np.append(body, chunks[s + chunks_per_window - 1, m]))
        ret = np.zeros((chunks_per_window, k, 2 * m), dtype=np.int64)
        for u in range(chunks_per_window):
            c = s + u
            if kind == "oracle":
                pair = [(c + 1, c + 2)] * k
            elif kind == "database":
                pair = [(int(j), min(int(j) + 1, n_all - 1)) for j in db.neighbours[c, :k]]
            else:
                pair = [(int(j), min(int(j) + 1, n_all - 1)) for j in rng.integers(0, n_all, k)]
            for i, (a, b) in enumerate(pair):
                ret[u, i] = np.concatenate([chunks[a, :m], chunks[b, :m]])
        rets.append(ret)
    seq = torch.as_tensor(np.stack(seqs), dtype=torch.long)
    retrieved = torch.as_tensor(np.stack(rets))
    return seq, retrieved, torch.ones(retrieved.shape[:3], dtype=torch.bool)


def run(args, kind: str, db, train_w, held_w) -> dict:
    from retrolm import retrofit

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = Path(args.work) / "runs" / "base"
    model = retrofit(str(base), chunk_size=64, cca_layers=(2, 4), enc_depth=2, dim_head=32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    L = args.seq_len // 64
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        picks = [train_w[i][0] for i in rng.integers(0, len(train_w), args.batch)]
        seq, ret, mask = batch(db, picks, L, kind, rng)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 10)
        loss = model(seq, ret, neighbour_mask=mask, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log.info("%s step %d loss %.4f", kind, step, loss.item())
    model.eval()
    with_ret, without = [], []
    erng = np.random.default_rng(1)
    with torch.no_grad():
        for i in range(0, len(held_w), args.batch):
            picks = [w[0] for w in held_w[i : i + args.batch]]
            seq, ret, mask = batch(db, picks, L, kind, erng)
            with_ret.append(model(seq, ret, neighbour_mask=mask, return_loss=True).item())
            without.append(model(seq, None, return_loss=True).item())
    return {
        "kind": kind,
        "held_loss": float(np.mean(with_ret)),
        "base_loss": float(np.mean(without)),  # retrieval off = the frozen base exactly
        "train_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/retrofit-demo", help="retrofit_demo.py's --work")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--kinds", default="oracle,database,random")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from retrolm.retrieval import RetrievalDatabase

    db = RetrievalDatabase.open(Path(a.work) / "db")
    L = a.seq_len // 64
    train_w, held_w = windows(db, 64, L, held=False), windows(db, 64, L, held=True)
    rows = [run(a, kind, db, train_w, held_w) for kind in a.kinds.split(",")]
    print(f"\nheld-out windows {len(held_w)}, {a.steps} steps, lr {a.lr}, load "
          f"{common.load_average()}")  # fmt: skip
    print(f"{'neighbours':10s} {'CCA loss':>9s} {'base loss':>9s} {'vs base':>8s}")
    for r in rows:
        gain = 100 * (1 - r["held_loss"] / r["base_loss"])
        print(f"{r['kind']:10s} {r['held_loss']:9.4f} {r['base_loss']:9.4f} {gain:7.1f}%")
    out = Path(a.work) / "oracle_neighbours.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
