"""RETRO training speed and memory: retrolm vs RETRO-pytorch 0.3.9, side by side.

Config (issue 2): decoder 256 x 6, encoder 256 x 2, CCA layers (3, 6), heads 4, dim_head 64,
vocabulary 28996, chunk 64, k = 2 neighbours; L=512 batch 4 and L=2048 batch 1; 2 threads.
One train step = forward + backward + AdamW step on random tokens.

Every (config, side, dtype) runs in a fresh process so that peak RSS (ru_maxrss) is its own,
and the sides run interleaved, round after round, so that a noisy machine slows them alike.
Ratios (ours / anchor) are computed from medians measured in the same run.

    python benchmarks/bench_retro_train.py                # full run
    python benchmarks/bench_retro_train.py --rounds 1 --steps 3   # quicker
Needs: pip install --no-deps retro-pytorch==0.3.9 (faiss-cpu installed; autofaiss is stubbed).
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

VOCAB = 28996
CONFIGS = {"L512_b4": (512, 4), "L2048_b1": (2048, 1)}
MODEL = dict(
    chunk_size=64,
    enc_dim=256,
    enc_depth=2,
    dec_dim=256,
    dec_depth=6,
    dec_cross_attn_layers=(3, 6),
    heads=4,
    dim_head=64,
)


def build(side: str, L: int):

    if side == "anchor":
        import types

        if "autofaiss" not in sys.modules:  # retro_pytorch imports it at module import only
            stub = types.ModuleType("autofaiss")
            stub.build_index = None
            sys.modules["autofaiss"] = stub
        from retro_pytorch import RETRO as AnchorRETRO

        return AnchorRETRO(max_seq_len=L, num_tokens=VOCAB, **MODEL)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from retrolm import RETRO

    # share_embeddings: one token embedding for encoder and decoder, as the anchor has, so
    # both sides train the same number of parameters
    return RETRO(max_seq_len=L, num_tokens=VOCAB, share_embeddings=True, **MODEL)


def child(side: str, cfg: str, dtype: str, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    L, B = CONFIGS[cfg]
    model = build(side, L).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = torch.randint(1, VOCAB, (B, L + 1))
    ret = torch.randint(1, VOCAB, (B, L // 64, 2, 128))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(seq, ret, return_loss=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return dict(
        side=side,
        config=cfg,
        dtype=dtype,
        step_s=med,
        tok_s=B * L / med,
        times=[round(t, 3) for t in times],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )


def loss_parity(steps: int = 30) -> dict:
    """Train the same model from the same init on the same batches in fp32 and bf16 autocast."""
    import torch

    torch.set_num_threads(2)
    curves = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
        from retrolm import RETRO

        model = RETRO(max_seq_len=256, num_tokens=VOCAB, **MODEL)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        g = torch.Generator().manual_seed(1)
        seq = torch.randint(1, 2000, (2, 257), generator=g)
        ret = torch.randint(1, 2000, (2, 4, 2, 128), generator=g)
        curve = []
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(seq, ret, return_loss=True)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[dtype] = curve
    rel = [abs(a - b) / a for a, b in zip(curves["fp32"], curves["bf16"])]
    return dict(
        fp32_first=curves["fp32"][0],
        fp32_last=curves["fp32"][-1],
        bf16_first=curves["bf16"][0],
        bf16_last=curves["bf16"][-1],
        max_rel_diff=max(rel),
    )


def run_child(args_list: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "CONFIG", "DTYPE"))
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", help="append raw results to this file")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.warmup, a.steps)))
        return
    if a.parity:
        print(json.dumps(loss_parity()))
        return
    runs = [("anchor", "fp32"), ("ours", "fp32"), ("ours", "bf16"), ("anchor", "bf16")]
    results: dict[tuple, list[dict]] = {}
    for cfg in a.configs.split(","):
        for r in range(a.rounds):
            for side, dtype in runs:
                res = run_child(
                    [
                        "--child",
                        side,
                        cfg,
                        dtype,
                        "--warmup",
                        str(a.warmup),
                        "--steps",
                        str(a.steps),
                    ]
                )
                results.setdefault((cfg, side, dtype), []).append(res)
                print(
                    f"[round {r}] {cfg:9s} {side:6s} {dtype}: {res['tok_s']:7.1f} tok/s  "
                    f"peak RSS {res['peak_rss_mb']:6.0f} MB  steps {res['times']}",
                    flush=True,
                )
    if a.json:
        with open(a.json, "a") as f:
            for rs in results.values():
                for r in rs:
                    f.write(json.dumps(r) + "\n")
    print("\n| config | side | dtype | train tok/s (median) | peak RSS MB |")
    print("|---|---|---|---|---|")
    summary = {}
    for (cfg, side, dtype), rs in results.items():
        tok = statistics.median(r["tok_s"] for r in rs)
        rss = max(r["peak_rss_mb"] for r in rs)
        summary[(cfg, side, dtype)] = (tok, rss)
        print(f"| {cfg} | {side} | {dtype} | {tok:.1f} | {rss:.0f} |")
    print("\nRatios against the anchor's better dtype (same run):")
    for cfg in a.configs.split(","):
        best_anchor = max(
            (summary[(cfg, "anchor", d)] for d in ("fp32", "bf16")), key=lambda x: x[0]
        )
        for d in ("fp32", "bf16"):
            tok, rss = summary[(cfg, "ours", d)]
            print(
                f"  {cfg} ours-{d}: speed {tok / best_anchor[0]:.2f}x, "
                f"peak RSS {rss / summary[(cfg, 'anchor', 'fp32')][1]:.2f}x of anchor fp32"
            )
    print("\nLoss parity, ours bf16 autocast vs fp32 (30 steps, same init and batches):")
    print("  " + json.dumps(run_child(["--parity"])))


if __name__ == "__main__":
    main()
