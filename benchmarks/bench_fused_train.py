"""The fused training kernels (``retrolm.nn.fused_train``) against the ATen composite, one run.

Per kernel: forward + backward at the hierarchical benchmark model's shapes, the fused call
and the composite it replaces (the same function with ``fused_train.set_enabled(False)``)
alternating for several rounds, medians compared. Then whole training steps of the models
of ``bench_hier.py`` (L=1024) and ``bench_routing.py`` (L=4096), bf16 autocast + AdamW, with
the kernels on and off in turn on one model, the median of per-round ratios.

    PYTHONPATH=src python benchmarks/bench_fused_train.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from retrolm.nn import RMSNorm, RotaryEmbedding, apply_rotary, fused_train

HERE = os.path.dirname(os.path.abspath(__file__))


def alternate(fns: dict, rounds: int, reps: int) -> dict[str, float]:
    """name -> median seconds per call; each fn runs with its own kernel setting."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds + 1):  # the first round warms up
        for name, (on, fn) in fns.items():
            before = fused_train.set_enabled(on)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t0) / reps)
            fused_train.set_enabled(before)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def kernels(rounds: int) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(256)
    x = torch.randn(1, 1024, 256, requires_grad=True)
    g = torch.randn(1, 1024, 256).bfloat16()

    def norm_shift():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fused_train.norm_shift(x, norm, 2).to(torch.bfloat16)
        y.backward(g)

    cos, sin = RotaryEmbedding(64)(torch.arange(128))
    q = torch.randn(8, 128, 4, 64).bfloat16().transpose(1, 2).requires_grad_()
    gq = torch.randn(8, 4, 128, 64).bfloat16()

    def rotary():
        apply_rotary(q, cos, sin).backward(gq)

    logits = torch.randn(8192, 256).bfloat16().requires_grad_()
    labels = torch.randint(0, 256, (8192,))

    def ce():
        fused_train.cross_entropy(logits, labels).backward()

    cases = {
        "norm_shift (1, 1024, 256) -> bf16, shift 2": norm_shift,
        "rotary (8, 4, 128, 64) bf16, heads view": rotary,
        "cross_entropy (8192, 256) bf16": ce,
    }
    for name, fn in cases.items():
        t = alternate({"aten": (False, fn), "fused": (True, fn)}, rounds, reps=20)
        print(
            f"{name}: composite {t['aten'] * 1e3:.3f} ms, fused {t['fused'] * 1e3:.3f} ms "
            f"-> {t['aten'] / t['fused']:.2f}x",
            flush=True,
        )


def train_steps(rounds: int) -> None:
    sys.path.insert(0, HERE)
    import bench_hier
    import bench_routing

    for family, bench, length in (
        ("hierarchical", bench_hier, 1024),
        ("routing", bench_routing, 4096),
    ):
        model = bench.build("ours", length).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(1, 256, (1, length + 1))

        def step(model=model, opt=opt, x=x):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, return_loss=True)
                loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            opt.step()

        times: dict[bool, list[float]] = {False: [], True: []}
        for on in (False, True):  # warm-up
            fused_train.set_enabled(on)
            step()
        for _ in range(rounds):
            for on in (False, True):
                fused_train.set_enabled(on)
                t0 = time.perf_counter()
                step()
                times[on].append(time.perf_counter() - t0)
        fused_train.set_enabled(True)
        ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
        print(
            f"{family} training step, L={length}, bf16: kernels off "
            f"{statistics.median(times[False]) * 1e3:.0f} ms, on "
            f"{statistics.median(times[True]) * 1e3:.0f} ms -> {ratio:.3f}x",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if fused_train.extension() is None:
        sys.exit("the fused training kernels could not be built here (see the warning above)")
    kernels(a.rounds)
    train_steps(a.rounds)


if __name__ == "__main__":
    main()
