"""retrolm HierarchicalTransformer vs simple-hierarchical-transformer 0.4.0, side by side.

Config of shared/bench/bench_hier.py (``benchmarks.common.build_hier``): vocab 256, dim 256,
depth 4, heads 4, dim_head 64, hierarchies (1, 2, 8), windows (32, 64, None), batch 1, each
library's default losses (reference: CE + 0.25 next-latent + 0.1 recon; retrolm: CE + 0.25 AR
+ 0.1 recon).

  train : forward + backward + AdamW at L = 1024 and 4096, fp32 and bf16 autocast per side
          (a side's better dtype is the faster one that runs); tokens/s and peak RSS; then
          both sides at their better dtype in one process, steps alternating, for a ratio
          that machine load cannot skew (median of per-round ratios).
          gen also tries bf16 weights (``bf16w``) and, for retrolm, ``bf16p`` (the prompt
          under bf16 autocast, the cached steps in fp32: ``prefill_dtype``) and ``bf16pw``
          (bf16p with the fused decoding blocks reading bf16 copies of the weights,
          ``retrolm.nn.fused.decode.set_weight_dtype``).
  gen   : 992-token prompt, 32 new tokens, batch 1, whole generate call timed (prefill
          included); the reference's own loop (full recompute per token) vs retrolm's cache.

Every (side, mode, L, dtype) runs in a fresh subprocess so ru_maxrss is that run's own
peak; the sides alternate so both see the same background load, and each run records how
many cores other processes used meanwhile (the machine is shared).

  python -m benchmarks.compare.bench_hier            # everything (~10 minutes)
  BENCH_THREADS=1 python -m benchmarks.compare.bench_hier   # on an oversubscribed
      machine: with 2 threads, OpenMP barriers wait for descheduled threads at every op
  python -m benchmarks.compare.bench_hier --lengths 1024 --modes gen

Raw rows are appended to ``benchmarks/results/hier.jsonl`` (``--out``).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from benchmarks import common
from benchmarks.common import build_hier as build

THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # the anchors were measured with 2
PROMPT, NEW = common.HIER_PROMPT, common.HIER_NEW


def cpu_snapshot() -> tuple[float, int, int]:
    """(wall, system busy ticks, this process's ticks)."""
    with open("/proc/stat") as f:
        vals = list(map(int, f.readline().split()[1:9]))
    with open("/proc/self/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return time.perf_counter(), sum(vals) - vals[3] - vals[4], int(st[11]) + int(st[12])


def foreign_cores(a, b) -> float:
    """Cores used by other processes between two snapshots (children excluded)."""
    dw = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / os.sysconf("SC_CLK_TCK") / dw)


def child(side: str, mode: str, length: int, dtype: str) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    model = build(side, length)
    if dtype == "bf16pw":  # the fused decoding blocks read bf16 copies of the weights
        from retrolm.nn.fused import decode as fused_decode

        fused_decode.set_weight_dtype(torch.bfloat16)
    if dtype == "bf16w":  # bf16 weights (generation only): half the bytes read per token
        model = model.to(torch.bfloat16)
    x = torch.randint(1, 256, (1, length + 1))
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    times, foreign = [], []
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss, _ = model(x, return_loss=True)
            loss.backward()
            opt.step()

        warm, measure = (1, 3) if length <= 1024 else (1, 2)
    else:
        model.eval()
        prompt = x[:, :PROMPT]

        def run(new=NEW):
            with torch.no_grad(), torch.autocast(**amp):
                if side == "ref":
                    model.generate(prompt, new)
                else:  # top 25: ~the reference's top 10% filter
                    pre = torch.bfloat16 if dtype in ("bf16p", "bf16pw") else None
                    model.generate(prompt, new, top_k=25, prefill_dtype=pre)

        run(4)  # warm-up: a few tokens, as the anchor harness does
        warm, measure = 0, (1 if side == "ref" else 3)  # the reference takes minutes per call
    for _ in range(warm):
        run()
    for _ in range(measure):
        a = cpu_snapshot()
        run()
        b = cpu_snapshot()
        times.append(b[0] - a[0])
        foreign.append(round(foreign_cores(a, b), 2))
    med, best = statistics.median(times), min(times)
    work = length if mode == "train" else NEW
    return dict(
        side=side, mode=mode, L=length, dtype=dtype, times_s=[round(t, 3) for t in times],
        tokens_per_s=round(work / med, 2), tokens_per_s_best=round(work / best, 2),
        foreign_cores=foreign, peak_rss_mb=round(common.peak_rss_mb(), 1),
        params=sum(p.numel() for p in model.parameters()), threads=THREADS,
    )  # fmt: skip


def child_pair(length: int, dt_ours: str, dt_ref: str, rounds: int) -> dict:
    """Training speed with both sides in one process, steps alternating (ours, ref, ours,
    ...), each at its dtype: load on the shared machine hits both alike, so the median of
    per-round ratios is steadier than a ratio of two separate processes' rates."""
    import torch

    torch.set_num_threads(THREADS)
    x = torch.randint(1, 256, (1, length + 1))
    steps = {}
    for side, dtype in (("ours", dt_ours), ("ref", dt_ref)):
        model = build(side, length).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run(model=model, opt=opt, bf16=dtype == "bf16"):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model(x, return_loss=True)
            loss.backward()
            opt.step()

        steps[side] = run
    times = common.interleave(steps, rounds, warmup=1)
    ratios = [r / o for o, r in zip(times["ours"], times["ref"])]
    return dict(
        mode="train-pair", L=length, dtype=dict(ours=dt_ours, ref=dt_ref),
        ours_s=[round(t, 3) for t in times["ours"]], ref_s=[round(t, 3) for t in times["ref"]],
        speedup=round(statistics.median(ratios), 2), threads=THREADS,
    )  # fmt: skip


def launch(side, mode, length, dtype, timeout) -> dict:
    args = ("--child", side, mode, str(length), dtype)
    try:
        env = dict(OMP_NUM_THREADS=str(THREADS))
        return common.rerun(__spec__.name, *args, timeout=timeout, env=env)
    except common.ChildFailed as e:
        err = "timeout" if e.timed_out else (e.stderr.strip().splitlines() or ["?"])[-1][-200:]
        return dict(side=side, mode=mode, L=length, dtype=dtype, error=err)


def table(results: list[dict]) -> str:
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["mode"], r["L"], r["side"])
        if "error" not in r and (key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]):
            best[key] = r
    lines = [
        "| mode | L | side | better dtype | tokens/s (median) | best | peak RSS MB | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, length in sorted({(m, L) for m, L, _ in best}):
        ref, ours = best.get((mode, length, "ref")), best.get((mode, length, "ours"))
        for r in (ref, ours):
            if r is None:
                continue
            ratio = ""
            if r is ours and ref is not None:
                ratio = f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
            lines.append(
                f"| {mode} | {length} | {r['side']} | {r['dtype']} | {r['tokens_per_s']:,} | "
                f"{r['tokens_per_s_best']:,} | {r['peak_rss_mb']:,.0f} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--modes", default="train,gen")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--gen-dtypes", default="fp32,bf16,bf16w,bf16p,bf16pw")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--pair-rounds", type=int, default=5, help="interleaved training rounds")
    ap.add_argument("--out", default=str(common.RESULTS / "hier.jsonl"))
    a = ap.parse_args()
    if a.child:
        side, mode, length, dtype = a.child
        if side == "pair":  # mode: "ours_dtype,ref_dtype"; dtype: rounds
            d_ours, d_ref = mode.split(",")
            res = child_pair(int(length), d_ours, d_ref, int(dtype))
        else:
            res = child(side, mode, int(length), dtype)
        common.emit(res)
        return
    plan = []
    modes = a.modes.split(",")
    for length in map(int, a.lengths.split(",")):
        if "train" in modes:
            plan += [("train", length, d) for d in a.dtypes.split(",")]
    if "gen" in modes:
        plan += [("gen", PROMPT + NEW, d) for d in a.gen_dtypes.split(",")]
    results = []
    for mode, length, dtype in plan:
        for side in ("ref", "ours"):  # alternate so both see the same background load
            if side == "ref" and dtype in ("bf16p", "bf16pw"):
                continue  # the reference has no separate prompt precision
            r = launch(side, mode, length, dtype, a.timeout)
            r["loadavg"] = common.load_average()
            results.append(r)
            print(json.dumps(r), flush=True)
            common.append_jsonl(a.out, r)
    print(table(results))
    for length in sorted({r["L"] for r in results if r["mode"] == "train"}):
        # the interleaved ratio, each side at the faster dtype of its own runs above
        best = {}
        for r in results:
            if r["mode"] == "train" and r["L"] == length and "error" not in r:
                if r["side"] not in best or r["tokens_per_s"] > best[r["side"]]["tokens_per_s"]:
                    best[r["side"]] = r
        if len(best) < 2:
            continue
        dts = f"{best['ours']['dtype']},{best['ref']['dtype']}"
        r = launch("pair", dts, length, str(a.pair_rounds), a.timeout * 2)
        r["loadavg"] = common.load_average()
        print(json.dumps(r), flush=True)
        common.append_jsonl(a.out, r)
        if "speedup" in r:
            print(f"train L={length}, interleaved in one process (ours {best['ours']['dtype']} "
                  f"vs reference {best['ref']['dtype']}): {r['speedup']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
