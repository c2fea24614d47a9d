"""retrolm Infini-attention vs infini-transformer-pytorch 0.2.1, side by side.

Config of issue 22: vocabulary 256, dim 256, depth 4, heads 4, dim_head 64, delta rule,
segments of 512, batch 1. Install the reference without its dependencies:
``pip install --no-deps infini-transformer-pytorch==0.2.1 rotary-embedding-torch``.

  train : ``wrapper(seq, backward=True)`` + AdamW on 8 segments (4,096 tokens), BPTT every 2
          segments, through each library's ``InfiniTransformerWrapper``; tokens/s (median
          step) and the child process's peak RSS; fp32 and bf16 autocast per side, each
          side judged at its faster dtype.
  gen   : 64 new tokens after a 2,048-token prompt through each wrapper's ``generate``.
          The reference's prompt skips all but its last segment (its first step feeds only
          the last 512 prompt tokens), retrolm streams all four segments into the memory; so
          the new tokens are timed apart from the prompt: (time of prompt + 64 tokens) -
          (time of prompt + 1 token), over 63 tokens. retrolm's fp32 steps run the fused C++
          blocks (``models.infini.fused``; ``RETROLM_FUSED_DECODE=0`` for the ATen path).

Every (side, mode, dtype) runs in a fresh subprocess (its own peak RSS), sides alternating.
Targets: training tokens/s >= 1.5x, peak RSS <= 1x, new-token tokens/s >= 3x.

  python -m benchmarks.compare.bench_infini [--threads 1] [--steps 3]
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks import common

CFG = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, use_mem_delta_rule=True)
SEG, SEGMENTS, PROMPT, NEW = 512, 8, 2048, 64


def build(side: str):
    import torch

    torch.manual_seed(0)
    if side == "reference":
        from infini_transformer_pytorch import InfiniTransformer, InfiniTransformerWrapper

        net = InfiniTransformer(**CFG)
        return net, InfiniTransformerWrapper(
            net, segment_length=SEG, detach_mems_every_num_segments=2
        )
    from retrolm import InfiniTransformer, InfiniTransformerWrapper

    net = InfiniTransformer(**CFG, segment_len=SEG, max_seq_len=SEG * SEGMENTS)
    return net, InfiniTransformerWrapper(net, detach_mems_every_num_segments=2)


def child(side: str, mode: str, dtype: str, steps: int) -> dict:
    import torch

    net, wrapper = build(side)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    gen = torch.Generator().manual_seed(1)
    if mode == "train":
        seq = torch.randint(0, 256, (1, SEG * SEGMENTS + 1), generator=gen)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        wrapper.train()
        times = []
        for _ in range(steps + 1):  # the first is warm-up
            t0 = time.perf_counter()
            with autocast:
                wrapper(seq, backward=True)
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        value = SEG * SEGMENTS / statistics.median(times[1:])
    else:
        prompt = torch.randint(0, 256, (1, PROMPT), generator=gen)
        # the reference's seq_len is the total length, retrolm's the new tokens
        total = (lambda n: PROMPT + n) if side == "reference" else (lambda n: n)
        runs = {1: [], NEW: []}
        with torch.no_grad(), autocast:
            wrapper.generate(seq_len=total(2), prompt=prompt)  # warm-up
            for _ in range(steps):
                for n in runs:
                    t0 = time.perf_counter()
                    wrapper.generate(seq_len=total(n), prompt=prompt)
                    runs[n].append(time.perf_counter() - t0)
        new_s = statistics.median(runs[NEW]) - statistics.median(runs[1])
        value = (NEW - 1) / new_s
    out = {"tokens_per_s": round(value, 1), "peak_rss_mb": round(common.peak_rss_mb(), 1)}
    if side == "retrolm" and mode == "gen":  # whether its one-token steps ran fused (fp32)
        from retrolm.nn.fused import decode

        out["fused_decode"] = decode.enabled() and decode.extension() is not None
    return out


def main() -> None:
    ap = common.parser(__doc__, threads=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["train", "gen"])
    ap.add_argument("--child", nargs=3, help=argparse_hidden())
    a = ap.parse_args()
    common.set_threads(a.threads)
    if a.child:
        common.emit(child(*a.child, a.steps))
        return
    results: dict = {}
    for mode in a.modes:
        for dtype in ("fp32", "bf16"):
            for side in ("reference", "retrolm"):
                r = common.rerun(
                    __spec__.name, "--child", side, mode, dtype, "--steps", str(a.steps),
                    "--threads", str(a.threads),
                )  # fmt: skip
                results[(mode, side, dtype)] = r
                print(f"{mode:5s} {side:9s} {dtype}: {r}", flush=True)
    for mode in a.modes:
        best = {}
        for side in ("reference", "retrolm"):
            dtype = max(("fp32", "bf16"), key=lambda d: results[(mode, side, d)]["tokens_per_s"])
            best[side] = (dtype, results[(mode, side, dtype)])
        (rd, r), (od, o) = best["reference"], best["retrolm"]
        ratio = o["tokens_per_s"] / r["tokens_per_s"]
        rss = o["peak_rss_mb"] / r["peak_rss_mb"]
        print(
            f"{mode}: retrolm {o['tokens_per_s']:,.0f} tok/s ({od}) vs reference "
            f"{r['tokens_per_s']:,.0f} ({rd}): {ratio:.2f}x; peak RSS {o['peak_rss_mb']:.0f} "
            f"vs {r['peak_rss_mb']:.0f} MB: {rss:.2f}x"
        )
    print(f"threads {a.threads}, load {common.load_average()}", file=sys.stderr)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
