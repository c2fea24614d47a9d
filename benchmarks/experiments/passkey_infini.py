"""Passkey retrieval with Infini-attention on a CPU: is the memory used at all?

Inputs of S segments of ``--segment`` bytes (byte-level, vocabulary 256): the first segment
opens with ``pass key 12345. `` (a random 5-digit key), the rest is filler (KJV text,
verse numbers and digits removed, from a random place), and the last segment ends with
`` pass key? 12345`` -- the question, then the key. A small model (dim 128, depth 2,
4 heads of 32, segments of 32 bytes) is trained on 4-segment inputs with the loss on the
five key digits of the answer only, then scored on 100 fresh inputs (another seed) at 4,
16 and 64 segments: exact-key accuracy of the greedy answer (all five digits the argmax
given the digits before, i.e. what greedy decoding writes), memory on and off (off: the
memory reads nothing, so the key is out of reach: chance is 1e-5). Linear (eq. 4) and
delta rule (eq. 5). Issue 22's target: >= 90% at 4 segments with memory.

  python -m benchmarks.experiments.passkey_infini [--steps 3000] [--only linear]
"""

from __future__ import annotations

import json
import re
import tarfile
import time

from benchmarks import common

LENGTHS = (4, 16, 64)


def filler_text() -> bytes:
    with tarfile.open(common.ROOT / "data" / "kjv.tar.xz") as tar:
        text = "".join(
            tar.extractfile(m).read().decode("utf-8")
            for m in tar.getmembers()
            if m.isfile() and m.name.endswith(".txt")
        )
    text = re.sub(r"\d+:\d+\s*", "", text)
    text = re.sub(r"[0-9]", "", text)
    return re.sub(r"\s+", " ", text).lower().encode("ascii", "ignore")


def make_batch(filler: bytes, b: int, segments: int, seg: int, gen):
    """(inputs (b, L), labels (b, L) with -100 but on the key's digits in the answer)."""
    import torch

    total = segments * seg
    keys = torch.randint(0, 100_000, (b,), generator=gen)
    starts = torch.randint(0, len(filler) - total, (b,), generator=gen)
    rows, labels = [], []
    for key, start in zip(keys.tolist(), starts.tolist(), strict=True):
        k = f"{key:05d}".encode()
        head = b"pass key " + k + b". "
        tail = b" pass key? " + k
        body = filler[start : start + total - len(head) - len(tail)]
        seq = head + body + tail
        assert len(seq) == total
        row = torch.tensor(list(seq), dtype=torch.long)
        lab = torch.full((total,), -100, dtype=torch.long)
        lab[total - 6 : total - 1] = row[total - 5 :]  # predicting each key digit
        rows.append(row)
        labels.append(lab)
    return torch.stack(rows), torch.stack(labels)


def accuracy(model, filler, segments, seg, n, use_memory, batch=25) -> float:
    import torch

    gen = torch.Generator().manual_seed(1234 + segments)
    hits = 0
    with torch.no_grad():
        for _ in range(n // batch):
            x, lab = make_batch(filler, batch, segments, seg, gen)
            logits = model(x, use_memory=use_memory)
            mask = lab != -100
            pred = logits.argmax(-1)
            ok = ((pred == lab) | ~mask).all(-1)
            hits += int(ok.sum())
    return hits / n


def run(variant: str, a, filler: bytes) -> dict:
    import torch

    from retrolm import InfiniConfig, InfiniLanguageModel

    torch.manual_seed(a.seed)
    cfg = InfiniConfig(
        num_tokens=256, dim=128, depth=2, heads=4, dim_head=32, segment_len=a.segment,
        max_seq_len=4 * a.segment, use_mem_delta_rule=variant == "delta",
        detach_mems_every_num_segments=4,
    )  # fmt: skip
    model = InfiniLanguageModel(cfg)
    gates = [p for n, p in model.named_parameters() if n.endswith("head_gates")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("head_gates")]
    opt = torch.optim.AdamW(
        [{"params": rest}, {"params": gates, "lr": a.lr * cfg.gate_lr_scale, "weight_decay": 0.0}],
        lr=a.lr,
    )
    gen = torch.Generator().manual_seed(a.seed)
    t0, losses = time.perf_counter(), []
    for step in range(a.steps):
        x, lab = make_batch(filler, a.batch, 4, a.segment, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, 256), lab.reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            print(f"{variant} step {step} loss {statistics_mean(losses[-100:]):.3f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    row = {"variant": variant, "steps": a.steps, "train_s": round(train_s, 1)}
    row["final_loss"] = round(statistics_mean(losses[-100:]), 4)
    for s in LENGTHS:
        for mem in (True, False):
            row[f"{s}_{'on' if mem else 'off'}"] = accuracy(model, filler, s, a.segment, 100, mem)
    return row


def statistics_mean(v):
    return sum(v) / max(1, len(v))


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=["linear", "delta"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    common.set_threads(a.threads)
    filler = filler_text()
    rows = []
    for variant in a.only or ["linear", "delta"]:
        rows.append(run(variant, a, filler))
        print(json.dumps(rows[-1]), flush=True)
    head = " | ".join(f"{s} seg on | off" for s in LENGTHS)
    print(f"| memory | steps | {head} |")
    print("|---|---|" + "---|---|" * len(LENGTHS))
    for r in rows:
        cells = " | ".join(f"{r[f'{s}_on']:.0%} | {r[f'{s}_off']:.0%}" for s in LENGTHS)
        print(f"| {r['variant']} | {r['steps']} | {cells} |")


if __name__ == "__main__":
    main()
