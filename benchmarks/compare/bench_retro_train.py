"""RETRO training speed and memory: retrolm vs RETRO-pytorch 0.3.9, side by side.

Config (issue 2): decoder 256 x 6, encoder 256 x 2, CCA layers (3, 6), heads 4, dim_head 64,
vocabulary 28996, chunk 64, k = 2 neighbours; L=512 batch 4 and L=2048 batch 1; 2 threads.
One train step = forward + backward + AdamW step on random tokens.

Speed: both libraries in one process, one training step each in turn (anchor fp32, anchor
bf16, ours fp32, ours bf16), so that load from other processes on a shared machine slows
them alike; ratios are medians of per-round ratios. Peak RSS: every (config, side, dtype)
in a fresh process (ru_maxrss is that run's own).

    python -m benchmarks.compare.bench_retro_train                # both configs, 5 rounds
    python -m benchmarks.compare.bench_retro_train --steps 3 --configs L512_b4   # quicker
Needs: pip install --no-deps retro-pytorch==0.3.9 (faiss-cpu installed; autofaiss is stubbed).
"""

from __future__ import annotations

import json
import statistics
import time

from benchmarks import common

VOCAB = common.GEN_VOCAB
CONFIGS = {"L512_b4": (512, 4), "L2048_b1": (2048, 1)}


def model_config() -> dict:
    """The issue's benchmark model, less the vocabulary and length set per run."""
    return common.retro_bench_model("num_tokens", "max_seq_len")


def build(side: str, L: int):
    if side == "anchor":
        common.stub_autofaiss()
        from retro_pytorch import RETRO as AnchorRETRO

        return AnchorRETRO(max_seq_len=L, num_tokens=VOCAB, **model_config())
    from retrolm import RETRO

    # share_embeddings: one token embedding for encoder and decoder, as the anchor has, so
    # both sides train the same number of parameters
    return RETRO(max_seq_len=L, num_tokens=VOCAB, share_embeddings=True, **model_config())


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
        peak_rss_mb=common.peak_rss_mb(),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )


def interleaved_speed(cfg: str, warmup: int, rounds: int) -> dict:
    """Both sides in one process, one step each in turn, so outside load hits them alike.

    Returns per-(side, dtype) median step times and the median of per-round ratios.
    """
    import torch

    torch.set_num_threads(2)
    L, B = CONFIGS[cfg]
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, VOCAB, (B, L + 1), generator=g)
    ret = torch.randint(1, VOCAB, (B, L // 64, 2, 128), generator=g)
    runners = {}
    for side in ("anchor", "ours"):
        torch.manual_seed(0)
        model = build(side, L).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for dtype in ("fp32", "bf16"):

            def step(model=model, opt=opt, dtype=dtype) -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = model(seq, ret, return_loss=True)
                loss.backward()
                opt.step()

            runners[(side, dtype)] = step
    times = common.interleave(runners, rounds, warmup)
    med = {f"{s}-{d}": statistics.median(t) for (s, d), t in times.items()}
    anchor_best = [min(a, b) for a, b in zip(times[("anchor", "fp32")], times[("anchor", "bf16")])]
    ratios = {
        f"ours-{d} / anchor-best": statistics.median(
            a / o for a, o in zip(anchor_best, times[("ours", d)])
        )
        for d in ("fp32", "bf16")
    }
    ratios["ours-bf16 / anchor-fp32"] = statistics.median(
        a / o for a, o in zip(times[("anchor", "fp32")], times[("ours", "bf16")])
    )
    ratios["ours-fp32 / anchor-fp32"] = statistics.median(
        a / o for a, o in zip(times[("anchor", "fp32")], times[("ours", "fp32")])
    )
    return dict(
        config=cfg,
        tokens_per_step=B * L,
        median_step_s=med,
        tok_s={k: B * L / v for k, v in med.items()},
        speed_ratios=ratios,
        rounds=rounds,
    )


def loss_parity(steps: int = 30) -> dict:
    """Train the same model from the same init on the same batches in fp32 and bf16 autocast."""
    import torch

    torch.set_num_threads(2)
    curves = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        from retrolm import RETRO

        model = RETRO(max_seq_len=256, num_tokens=VOCAB, **model_config())
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
    return common.rerun(__spec__.name, *args_list)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "CONFIG", "DTYPE"))
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--speed", metavar="CONFIG", help="interleaved speed run for one config")
    ap.add_argument("--rounds", type=int, default=1, help="(child runs only)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="measured steps / interleaved rounds")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", help="append raw results to this file")
    a = ap.parse_args()
    if a.child:
        common.emit(child(*a.child, a.warmup, a.steps))
        return
    if a.parity:
        common.emit(loss_parity())
        return
    if a.speed:
        common.emit(interleaved_speed(a.speed, a.warmup, a.rounds))
        return
    runs = [("anchor", "fp32"), ("ours", "fp32"), ("ours", "bf16"), ("anchor", "bf16")]
    for cfg in a.configs.split(","):
        speed = run_child(["--speed", cfg, "--warmup", str(a.warmup), "--rounds", str(a.steps)])
        print(
            f"\n{cfg}: train tokens/s (median of {a.steps} interleaved steps): "
            + ", ".join(f"{k} {v:.1f}" for k, v in speed["tok_s"].items())
        )
        print(
            f"{cfg}: speed ratios (median of per-round ratios): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in speed["speed_ratios"].items()),
            flush=True,
        )
        rss = {}
        for side, dtype in runs:  # peak RSS: a fresh process each, 2 steps
            res = run_child(["--child", side, cfg, dtype, "--warmup", "1", "--steps", "1"])
            rss[(side, dtype)] = res["peak_rss_mb"]
        print(
            f"{cfg}: peak RSS MB (fresh process, 2 steps): "
            + ", ".join(f"{s}-{d} {v:.0f}" for (s, d), v in rss.items())
        )
        for d in ("fp32", "bf16"):
            print(
                f"{cfg}: ours-{d} peak RSS = {rss[('ours', d)] / rss[('anchor', 'fp32')]:.2f}x "
                f"anchor-fp32, {rss[('ours', d)] / rss[('anchor', 'bf16')]:.2f}x anchor-bf16",
                flush=True,
            )
        if a.json:
            row = dict(speed=speed, rss={f"{s}-{d}": v for (s, d), v in rss.items()})
            common.append_jsonl(a.json, row)
    print("\nLoss parity, ours bf16 autocast vs fp32 (30 steps, same init and batches):")
    print("  " + json.dumps(run_child(["--parity"])))


if __name__ == "__main__":
    main()
