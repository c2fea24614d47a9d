"""How far can a training step go? The dense-kernel floor of ours vs the reference, one run.

A training step's matrix products (mm, addmm, bmm, convolutions) are the same work on both
sides and already run at the CPU's rate; everything else (elementwise, norms, masks, casts,
the optimizer, Python) is where an implementation can win. This script times a training
step per side (median of 3 after 2 warm-ups, the sides' steps alternating; each side at its
benchmark dtype: ours bf16 autocast, the reference its faster one), profiles one more step
to split its op time into dense kernels and the rest, and prints the step time a speed-up
target allows and how much of it our dense kernels alone already take.

    python -m benchmarks.kernels.matmul_floor routing --length 4096 --target 1.5
    python -m benchmarks.kernels.matmul_floor hier --length 1024 --target 2

Same configs as compare/bench_routing.py / compare/bench_hier.py (``benchmarks.common``'s
``build_routing`` / ``build_hier``); needs their reference libraries installed.
"""

from __future__ import annotations

import statistics

from benchmarks import common

DENSE = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
)


def step_fn(family: str, side: str, length: int):
    import torch

    if family == "routing":
        model = common.build_routing(side, length)
        bf16 = True  # both sides' faster training dtype (compare/bench_routing.py)

        def loss(x):
            return model(x, return_loss=True)
    else:
        model = common.build_hier(side, length)
        bf16 = side == "ours"  # the reference's xPos rotary fails under autocast

        def loss(x):
            return model(x, return_loss=True)[0]

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(1, 256, (1, length + 1))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = loss(x)
        out.backward()
        opt.step()

    return step


def measure(family: str, length: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """side -> (median step s, profiled dense-kernel s, profiled total op s); the sides'
    steps alternate, so load from other processes on a shared machine hits both alike."""
    from torch.profiler import profile

    steps = {side: step_fn(family, side, length) for side in ("ours", "ref")}
    times = common.interleave(steps, rounds, warmup=2)
    out = {}
    for side, step in steps.items():
        with profile() as prof:
            step()
        ops = prof.key_averages()
        dense = sum(e.self_cpu_time_total for e in ops if e.key in DENSE) / 1e6
        total = sum(e.self_cpu_time_total for e in ops) / 1e6
        out[side] = (statistics.median(times[side]), dense, total)
    return out


def main() -> None:
    ap = common.parser(__doc__, threads=2, rounds=3)
    ap.add_argument("family", choices=("routing", "hier"))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--target", type=float, default=1.5, help="speed-up over the reference")
    a = ap.parse_args()
    common.set_threads(a.threads)
    res = measure(a.family, a.length, a.rounds)
    for side in ("ours", "ref"):
        t, dense, total = res[side]
        print(
            f"{side:4s}: step {t * 1e3:.0f} ms; profiled step: dense kernels {dense * 1e3:.0f} ms "
            f"of {total * 1e3:.0f} ms ({dense / total:.0%})",
            flush=True,
        )
    (ours, o_dense, _), (ref, _, _) = res["ours"], res["ref"]
    allowed = ref / a.target
    print(
        f"speed-up {ref / ours:.2f}x; {a.target}x allows {allowed * 1e3:.0f} ms per step, of "
        f"which our dense kernels take {o_dense * 1e3:.0f} ms: everything else must fit in "
        f"{(allowed - o_dense) * 1e3:.0f} ms (now {(ours - o_dense) * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
