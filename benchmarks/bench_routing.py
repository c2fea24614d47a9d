"""Side-by-side benchmark: retrolm's Routing Transformer vs routing-transformer 1.6.1.

Config of shared/bench/bench_routing.py: num_tokens 256, dim 256, depth 4, heads 4 of which
2 local, window 128, batch 1, causal. Every (config, side, dtype, mode) runs in a fresh
subprocess, so ``ru_maxrss`` is that run's own peak RSS. Each side gets its better dtype
(fp32 or bf16 autocast, the faster of the two measured here). Ratios are computed from
this one run; the machine is shared and noisy, so only the ratios mean anything.

    PYTHONPATH=src python benchmarks/bench_routing.py            # everything (~10-15 min)
    PYTHONPATH=src python benchmarks/bench_routing.py --quick    # fewer steps, smoke check

Needs ``pip install --no-deps routing-transformer==1.6.1 local-attention==1.11.2
product_key_memory==0.3.0 mixture-of-experts==0.2.3 CoLT5-attention==0.11.2`` for the
reference side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

V, DIM, DEPTH, HEADS, LOCAL, WINDOW = 256, 256, 4, 4, 2, 128
THREADS = 2


def build(side: str, L: int):
    import torch

    kw = dict(
        num_tokens=V,
        dim=DIM,
        heads=HEADS,
        depth=DEPTH,
        max_seq_len=L,
        causal=True,
        window_size=WINDOW,
        n_local_attn_heads=LOCAL,
    )
    if side == "ours":
        from retrolm import AutoregressiveWrapper, RoutingTransformerLM
    else:
        from routing_transformer import AutoregressiveWrapper, RoutingTransformerLM
    torch.manual_seed(0)
    return AutoregressiveWrapper(RoutingTransformerLM(**kw))


def child(side: str, mode: str, L: int, dtype: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    model = build(side, L)
    x = torch.randint(1, V, (1, L + 1))
    bf16 = dtype == "bf16"
    res = dict(side=side, mode=mode, L=L, dtype=dtype)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, return_loss=True)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        res.update(step_s=[round(t, 3) for t in ts], tokens_per_s=round(L / med, 1))
    else:  # gen: 32 new tokens after a (L - 32)-token prompt, each library's own loop
        if side == "ours":  # centroids as after training (a generate never initialises them)
            model.train()
            with torch.no_grad():
                model.net.init_kmeans(x[:, :L])
        model.eval()
        prompt = x[:, : L - 32]
        kw = dict(top_k=26) if side == "ours" else {}
        model.generate(prompt, 4, **kw)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(prompt, 32, **kw)
        dt = time.perf_counter() - t0
        res.update(
            new_tokens=int(out.shape[-1] - (prompt.shape[-1] if side == "ref" else 0)),
            gen_s=round(dt, 3),
            tokens_per_s=round(32 / dt, 2),
        )
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


def run(side, mode, L, dtype, steps, timeout=900) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        side,
        mode,
        str(L),
        dtype,
        str(steps),
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["load"] = open("/proc/loadavg").read().split()[0]
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(r), flush=True)
            return r
    raise RuntimeError(f"{cmd} failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results_routing.jsonl")
    )
    a = ap.parse_args()
    if a.child:
        side, mode, L, dtype, steps = a.child
        print("RESULT " + json.dumps(child(side, mode, int(L), dtype, int(steps))), flush=True)
        return
    steps = 2 if a.quick else 3
    rows = []
    for L in (4096, 8192):
        for side in ("ours", "ref"):
            for dtype in ("fp32", "bf16"):
                rows.append(run(side, "train", L, dtype, steps))
    best = {}
    for side in ("ours", "ref"):  # a side's better dtype: faster summed over both lengths
        tot = {
            d: sum(r["tokens_per_s"] for r in rows if r["side"] == side and r["dtype"] == d)
            for d in ("fp32", "bf16")
        }
        best[side] = max(tot, key=tot.get)
    rows.append(run("ours", "train", 1024, best["ours"], steps))
    rows.append(run("ours", "gen", 1024, "fp32", 1))
    rows.append(run("ref", "gen", 1024, "fp32", 1))

    def get(side, mode, L, dtype=None):
        dtype = dtype or best[side]
        return next(
            r for r in rows if (r["side"], r["mode"], r["L"], r["dtype"]) == (side, mode, L, dtype)
        )

    summary = dict(best_dtype=best)
    for L in (4096, 8192):
        o, r = get("ours", "train", L), get("ref", "train", L)
        summary[f"train_speedup_L{L}"] = round(o["tokens_per_s"] / r["tokens_per_s"], 2)
        summary[f"train_rss_mb_L{L}"] = dict(ours=o["peak_rss_mb"], ref=r["peak_rss_mb"])
    summary["ours_tokps_L8192_over_L1024"] = round(
        get("ours", "train", 8192)["tokens_per_s"] / get("ours", "train", 1024)["tokens_per_s"], 2
    )
    summary["gen_speedup"] = round(
        get("ours", "gen", 1024, "fp32")["tokens_per_s"]
        / get("ref", "gen", 1024, "fp32")["tokens_per_s"],
        1,
    )
    print("SUMMARY " + json.dumps(summary), flush=True)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(dict(summary=summary, time=time.strftime("%Y-%m-%d %H:%M"))) + "\n")


if __name__ == "__main__":
    main()
