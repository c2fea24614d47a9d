"""Hierarchical vs flat decoder of the same width on the bundled demo corpus (KJV), bytes.

Byte-level (vocabulary 256, so bits/byte = cross-entropy / ln 2), same steps, batch,
sequence length, optimiser and seed for both models; held-out = the last 5 % of the text.
Small sizes so both finish in a few minutes on 2 shared cores.

  BENCH_THREADS=1 PYTHONPATH=src python benchmarks/quality_hier.py [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
import time

import torch

from retrolm import HierarchicalTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(os.path.dirname(HERE), "data", "kjv.tar.xz")
WIDTH = dict(num_tokens=256, dim=128, depth=3, heads=4, dim_head=32)
MODELS = {
    "flat": dict(),
    "hierarchical": dict(hierarchies=(1, 2, 8), window_sizes=(32, 64, None)),
}


def load_bytes() -> torch.Tensor:
    with tarfile.open(CORPUS) as tar:
        data = b"".join(
            tar.extractfile(m).read() for m in sorted(tar.getmembers(), key=lambda m: m.name)
            if m.isfile() and m.name.endswith(".txt")
        )  # fmt: skip
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data: torch.Tensor, n: int, batch: int, g: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - n - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + n + 1] for s in starts.tolist()])


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, n: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(data) - n - 1, n):
        seq = data[s : s + n + 1][None]
        _, (ce, _, _) = model(seq, return_loss=True)
        total, count = total + ce.item() * n, count + n
    model.train()
    return total / count / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-bytes", type=int, default=32768)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    data = load_bytes()
    split = int(len(data) * 0.95)
    train, held = data[:split], data[split : split + a.eval_bytes]
    rows = []
    for name, extra in MODELS.items():
        torch.manual_seed(0)
        model = HierarchicalTransformer(seq_len=a.seq_len, **WIDTH, **extra)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        it = batches(train, a.seq_len, a.batch, torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        for _ in range(a.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = model(next(it), return_loss=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dt = time.perf_counter() - t0
        rows.append(
            dict(
                model=name,
                params=sum(p.numel() for p in model.parameters()),
                steps=a.steps,
                tokens_per_s=round(a.steps * a.batch * a.seq_len / dt, 1),
                held_out_bits_per_byte=round(bits_per_byte(model, held, a.seq_len), 4),
            )  # fmt: skip
        )
        print(json.dumps(rows[-1]), flush=True)
    print("| model | params | steps | train tokens/s | held-out bits/byte |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['tokens_per_s']:,} | "
            f"{r['held_out_bits_per_byte']} |"
        )


if __name__ == "__main__":
    main()
