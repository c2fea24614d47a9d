"""Can the demo's RETRO be taught to read its neighbours with planted self-copies?

An experiment for the demo's retrieval gain (issue 4). Training as in the demo (model
``DEMO_MODEL`` + ``share_embeddings``, batch 8, AdamW 2e-3, warm-up then cosine, bf16
autocast), except that a fraction ``--pself`` of the sequences read, as neighbour 1 of
every chunk u, a noisy copy of their *own* chunk u and continuation u+1 (``--noise`` of the
tokens replaced at random). The copy starts exactly aligned (the query predicting token
j of chunk u+1 finds it at neighbour position m+j) and, between steps ``--ramp0`` and
``--ramp1``, its window is shifted by up to ±``--shift`` tokens at random, so that the
aligned copy learnt first has to become content matching, as real parallels need.
Every 50 steps it prints the training loss with neighbours and the same batch without
them; at the end, held-out bits/byte with real retrieval on and off.

    python -m benchmarks.experiments.copy_curriculum DB HELD_OUT_DIR --pself 0.75
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from benchmarks import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("db")
    p.add_argument("held")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--pself", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=16)
    p.add_argument("--ramp0", type=int, default=300)
    p.add_argument("--ramp1", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-tokens", type=int, default=12000)
    a = p.parse_args()
    common.set_threads(1)
    from retrolm import RETRO
    from retrolm.data import RETRODataset
    from retrolm.demo import DEMO_MODEL
    from retrolm.evaluate import EvalConfig, evaluate
    from retrolm.retrieval import RetrievalDatabase

    db = RetrievalDatabase.open(a.db)
    ds = RETRODataset(db, seq_len=DEMO_MODEL["max_seq_len"], num_neighbours=2)
    m, vocab = db.chunk_size, db.tokenizer.vocab_size
    torch.manual_seed(0)
    model = RETRO(num_tokens=vocab, share_embeddings=True, **DEMO_MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    flat = torch.from_numpy(np.asarray(db.chunks)[:, :m].astype(np.int64)).reshape(-1)

    def self_copy(i: int, step: int) -> torch.Tensor:  # (l, 2m)
        ramp = min(1.0, max(0.0, (step - a.ramp0) / max(1, a.ramp1 - a.ramp0)))
        sh = round(a.shift * ramp)
        ids = ds.chunk_ids(i)
        out = torch.full((len(ids), 2 * m), db.tokenizer.pad_id, dtype=torch.long)
        for u, c in enumerate(ids):
            lo = int(c) * m + int(rng.integers(-sh, sh + 1))
            seg = flat[max(lo, 0) : min(lo + 2 * m, flat.numel())].clone()
            noisy = torch.rand(seg.shape, generator=gen) < a.noise
            seg[noisy] = torch.randint(2, vocab, (int(noisy.sum()),), generator=gen)
            out[u, max(lo, 0) - lo : max(lo, 0) - lo + len(seg)] = seg
        return out

    t0 = time.time()
    for s in range(a.steps):
        idx = rng.choice(len(ds), 8)
        items = [ds[i] for i in idx]
        seq, ret, mask = (torch.stack([x[j] for x in items]) for j in range(3))
        for b, i in enumerate(idx):
            if rng.random() < a.pself:
                ret[b, :, 0], mask[b, :, 0] = self_copy(int(i), s), True
        warm = min(1.0, (s + 1) / 30)
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / a.steps))
        for group in opt.param_groups:
            group["lr"] = a.lr * warm * cos
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(seq, ret, neighbour_mask=mask, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if s % 50 == 0:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                off = model(seq, return_loss=True).item()
            print(f"step {s}: loss with neighbours {loss.item():.3f}, without {off:.3f}, "
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
    model.eval()
    cfg = EvalConfig(num_neighbours=2, max_tokens=a.eval_tokens)
    r = evaluate(model, a.held, db, config=cfg)
    print(json.dumps({k: round(v["bits_per_byte"], 4) for k, v in r.modes.items()}))


if __name__ == "__main__":
    main()
