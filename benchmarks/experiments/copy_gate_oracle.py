"""How much could a match-length-gated copy from the neighbours lower held-out bits/byte?

The diagnosis behind RETRO's neighbour copy head (issue 4, ``retrolm.models.retro.copy_head``).
For every scored token it finds the longest run of the latest tokens that also precedes a
token in the neighbours the position may read (those of the chunk before its own, as CCA
reads them), and the copy distribution over the tokens that follow the longest runs. One
mixing weight per run length is fitted, on training sequences (their document-filtered
neighbours, as training sees them) and, as an upper bound, on the held-out text itself:

    p(x) = (1 - lam[L]) * p_model(x) + lam[L] * p_copy(x)     (L = the longest run, 1..12)

and both are applied to the held-out text. ``p_model`` is the run's model with retrieval off.

    python -m benchmarks.experiments.copy_gate_oracle RUN_DIR DB_DIR HELD_OUT_DIR [-k 2]
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

LMAX = 12


def runs(x: np.ndarray, vals: np.ndarray, m: int, n: int, pad: int):
    """Per position m..n-1: (longest run, copy probability of the target, target, position)."""
    out = []
    for pos in range(m, n):
        src = vals[(pos + 1) // m - 1]  # (k, 2m)
        best = np.zeros(src.shape, dtype=int)
        for length in range(1, LMAX + 1):
            ok = np.zeros(src.shape, bool)
            ok[:, length:] = src[:, :-length] == x[pos - length + 1]
            best = np.where((best == length - 1) & ok, length, best)
        best[src == pad] = 0
        lm, t = int(best.max()), int(x[pos + 1])
        out.append((lm, float((src[best == lm] == t).mean()) if lm else 0.0, t, pos))
    return out


def collect(model, tok, items, m, n, pad) -> np.ndarray:
    recs = []
    for x, vals in items:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(x)[None, :-1]).float(), -1)[0]
        for lm, pc, t, pos in runs(np.asarray(x), vals, m, n, pad):
            recs.append((len(tok.decode([t]).encode()), math.exp(lp[pos, t].item()), lm, pc))
    return np.array(recs)


def fit(recs: np.ndarray) -> dict[int, float]:
    _, p, lm, pc = recs.T
    grid, lam = np.linspace(0, 0.99, 100), {}
    for length in range(1, LMAX + 1):
        s = lm == length
        nll = [-np.log((1 - g) * p[s] + g * pc[s]).sum() for g in grid] if s.any() else [0]
        lam[length] = float(grid[int(np.argmin(nll))]) if s.any() else 0.0
    return lam


def bpb(recs: np.ndarray, lam: dict[int, float] | None) -> float:
    b, p, lm, pc = recs.T
    g = np.array([lam.get(int(x), 0.0) for x in lm]) if lam else np.zeros(len(p))
    return float(-np.log((1 - g) * p + g * pc).sum() / math.log(2) / b.sum())


def main() -> None:
    ap = common.parser(__doc__, threads=2)
    ap.add_argument("run")
    ap.add_argument("db")
    ap.add_argument("text")
    ap.add_argument("-k", "--neighbours", type=int, default=2)
    ap.add_argument("--train-sequences", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=12000, help="per held-out document")
    a = ap.parse_args()
    common.set_threads(a.threads)
    from retrolm.data import RETRODataset

    model, db = common.load_run(a.run, a.db)
    tok, m, n = db.tokenizer, db.chunk_size, model.config.max_seq_len
    pad, k = tok.pad_id, a.neighbours
    ds = RETRODataset(db, seq_len=n, num_neighbours=k)
    rng = np.random.default_rng(0)
    train = []
    for i in rng.choice(len(ds), a.train_sequences, replace=False):
        seq, ret, mask = ds[int(i)]
        train.append((seq.numpy(), (ret * mask[..., None]).numpy()))  # missing -> pad 0
    held = []
    for path in sorted(Path(a.text).glob("*.txt")):
        ids = tok.encode(path.read_text())[: a.max_tokens]
        ids = ids[: len(ids) // m * m]
        nbr, _ = db.search_tokens(np.asarray(ids).reshape(-1, m), k)
        vals = db.retrieved_tokens(nbr)[0].numpy()
        for w in range(0, len(ids) - n - 1, n):
            held.append((np.asarray(ids[w : w + n + 1]), vals[w // m : w // m + n // m]))
    r_train, r_held = collect(model, tok, train, m, n, pad), collect(model, tok, held, m, n, pad)
    off = bpb(r_held, None)
    print(
        f"k = {k}: positions with a run, training {np.mean(r_train[:, 2] > 0):.1%}, "
        f"held out {np.mean(r_held[:, 2] > 0):.1%}; held-out bits/byte, retrieval off {off:.4f}"
    )
    for name, recs in (
        ("training sequences", r_train),
        ("the held-out text (upper bound)", r_held),
    ):
        lam = fit(recs)
        on = bpb(r_held, lam)
        print(
            f"weights fitted on {name}: {on:.4f} ({1 - on / off:.1%} lower); "
            + " ".join(f"{x}:{v:.2f}" for x, v in lam.items())
        )


if __name__ == "__main__":
    main()
