"""What the RETRO neighbour copy head costs per training step (issue 4's demo model).

The demo's RETRO (dec 128x4, CCA (2, 4), enc 128x1, vocabulary 4096, seq 256, k = 2) with
and without ``copy_head``, same weights otherwise, one forward + backward each under the
demo's bf16 autocast, alternating for several rounds; the medians are compared. Two
variants of the head's loss are timed: the one ``RETRO`` uses (the fused loss per token,
then the mixture at the targets only) and the full-vocabulary mixture it replaced (the
model's log-probabilities over all tokens, then the NLL).

    python -m benchmarks.kernels.bench_copy_head [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks import common
from retrolm import RETRO, RetroConfig
from retrolm.demo import DEMO_MODEL


def main() -> None:
    ap = common.parser(__doc__, threads=2, rounds=7)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    common.set_threads(a.threads)
    torch.manual_seed(0)
    model_cfg = {k: v for k, v in DEMO_MODEL.items() if k != "copy_head"}
    plain = RETRO(RetroConfig(num_tokens=4096, copy_head=False, **model_cfg))
    copy = RETRO(RetroConfig(num_tokens=4096, copy_head=True, **model_cfg))
    copy.load_state_dict(plain.state_dict(), strict=False)
    b, n, m = a.batch, plain.config.max_seq_len, plain.config.chunk_size
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(2, 4096, (b, n + 1), generator=g)
    ret = torch.randint(2, 4096, (b, n // m, 2, 2 * m), generator=g)
    ret[:, :, 0, 10:80] = seq[:, None, 20:90]  # some neighbours repeat the text: matches
    mask = torch.ones(b, n // m, 2, dtype=torch.bool)

    def step(model, full_vocab=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if full_vocab:
                logp = model(seq[:, :-1], ret, neighbour_mask=mask)
                loss = F.nll_loss(logp.flatten(0, 1).float(), seq[:, 1:].flatten(), ignore_index=0)
            else:
                loss = model(seq, ret, neighbour_mask=mask, return_loss=True)
        loss.backward()

    sides = {
        "without the head": lambda: step(plain),
        "copy head (targets only)": lambda: step(copy),
        "copy head (full-vocabulary mixture)": lambda: step(copy, full_vocab=True),
    }
    times = common.interleave(sides, a.rounds, warmup=1)
    base = statistics.median(times["without the head"])
    print(f"demo model, batch {b} x {n}, bf16 autocast, {a.threads} threads, {a.rounds} rounds")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:38s} {med * 1e3:7.1f} ms per forward+backward  ({med / base:.2f}x)")


if __name__ == "__main__":
    main()
