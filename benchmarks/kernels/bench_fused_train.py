"""The fused training kernels (``retrolm.nn.fused.train``, ``retrolm.nn.fused.window``)
against the ATen composite, one run.

Per kernel: forward + backward at the benchmark models' shapes, the fused call and the
composite it replaces (the same function with the module's ``set_enabled(False)``)
alternating for several rounds, medians compared. Then whole training steps of the models
of ``compare/bench_hier.py`` (L=1024) and ``compare/bench_routing.py`` (L=4096), bf16 autocast
+ AdamW (``benchmarks.common.build_hier`` / ``build_routing``), with
each module's kernels on and off in turn on one model, the median of per-round ratios.

    python -m benchmarks.kernels.bench_fused_train [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import statistics
import sys

import torch

from benchmarks import common
from retrolm.nn import RMSNorm, RotaryEmbedding, apply_rotary, cross_entropy
from retrolm.nn.fused import train as fused_train
from retrolm.nn.fused import window as fused_window
from retrolm.nn.local_attention import local_attend
from retrolm.nn.sorted_window import sorted_window_attend


def alternate(fns: dict, rounds: int, reps: int, switch=fused_train) -> dict[str, float]:
    """name -> median seconds per call; each fn runs with its own setting of ``switch``'s
    kernels (a module with ``set_enabled``)."""

    def calls(on, fn):
        before = switch.set_enabled(on)
        for _ in range(reps):
            fn()
        switch.set_enabled(before)

    sides = {name: lambda on=on, fn=fn: calls(on, fn) for name, (on, fn) in fns.items()}
    times = common.interleave(sides, rounds, warmup=1)
    return {k: statistics.median(v) / reps for k, v in times.items()}


def kernels(rounds: int) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(256)
    x = torch.randn(1, 1024, 256, requires_grad=True)
    g = torch.randn(1, 1024, 256).bfloat16()

    def norm_shift():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm_shift(x, norm, 2).to(torch.bfloat16)
        y.backward(g)

    cos, sin = RotaryEmbedding(64)(torch.arange(128))
    q = torch.randn(8, 128, 4, 64).bfloat16().transpose(1, 2).requires_grad_()
    gq = torch.randn(8, 4, 128, 64).bfloat16()

    def rotary():
        apply_rotary(q, cos, sin).backward(gq)

    logits = torch.randn(8192, 256).bfloat16().requires_grad_()
    labels = torch.randint(0, 256, (8192,))

    def ce():
        cross_entropy(logits, labels).backward()

    cases = {
        "norm_shift (1, 1024, 256) -> bf16, shift 2": norm_shift,
        "rotary (8, 4, 128, 64) bf16, heads view": rotary,
        "cross_entropy (8192, 256) bf16": ce,
    }
    report(cases, rounds, fused_train, reps=20)
    if fused_window.applies(q):
        # the routing benchmark's attention: 2 heads of each kind, window 128, L=4096
        qa, ka, va = (torch.randn(1, 2, 4096, 64).bfloat16().requires_grad_() for _ in range(3))
        ga = torch.randn(1, 2, 4096, 64).bfloat16()
        group = torch.randint(0, 32, (1, 2, 4096))
        windows = {
            "local_attend (1, 2, 4096, 64) bf16, window 128": lambda: local_attend(
                qa, ka, va, 128
            ).backward(ga),
            "sorted_window_attend (1, 2, 4096, 64) bf16, 32 groups, shared q/k": lambda: (
                sorted_window_attend(qa, ka, va, group, 128, exclude_self=True).backward(ga)
            ),
        }
        report(windows, rounds, fused_window, reps=3)


def report(cases: dict, rounds: int, switch, reps: int) -> None:
    for name, fn in cases.items():
        t = alternate({"aten": (False, fn), "fused": (True, fn)}, rounds, reps, switch)
        print(
            f"{name}: composite {t['aten'] * 1e3:.3f} ms, fused {t['fused'] * 1e3:.3f} ms "
            f"-> {t['aten'] / t['fused']:.2f}x",
            flush=True,
        )


def train_steps(rounds: int) -> None:
    for family, build, length, switch in (
        ("hierarchical", common.build_hier, 1024, fused_train),
        ("routing", common.build_routing, 4096, fused_train),
        ("routing", common.build_routing, 4096, fused_window),
    ):
        model = build("ours", length).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(1, 256, (1, length + 1))

        def step(model=model, opt=opt, x=x):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, return_loss=True)
                loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            opt.step()

        def switched(on, step=step, switch=switch):
            switch.set_enabled(on)
            step()

        sides = {on: lambda on=on: switched(on) for on in (False, True)}
        times = common.interleave(sides, rounds, warmup=1)
        switch.set_enabled(True)
        ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
        print(
            f"{family} training step, L={length}, bf16: {switch.__name__} off "
            f"{statistics.median(times[False]) * 1e3:.0f} ms, on "
            f"{statistics.median(times[True]) * 1e3:.0f} ms -> {ratio:.3f}x",
            flush=True,
        )


def main() -> None:
    a = common.parser(__doc__, threads=2, rounds=5).parse_args()
    common.set_threads(a.threads)
    if fused_train.extension() is None:
        sys.exit("the fused training kernels could not be built here (see the warning above)")
    kernels(a.rounds)
    train_steps(a.rounds)


if __name__ == "__main__":
    main()
