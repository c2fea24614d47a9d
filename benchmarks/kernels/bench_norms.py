"""RMSNorm forward + backward: retrolm's RMSNorm vs the plain autograd formula, one run.

The baseline is x * rsqrt(mean(x^2) + eps) * w with autograd (statistics in fp32, as ours),
the composite PyTorch writes without a custom backward. Each measurement is a chain of 10
norms with residual adds, minus the same chain without norms, per norm; the two sides
alternate for several rounds and the medians are compared.

    python -m benchmarks.kernels.bench_norms [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import common
from retrolm.nn import RMSNorm

SHAPES = ((1, 1024, 256), (1, 1024, 768), (1, 4096, 256))


def plain(norm: RMSNorm):
    def f(x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        return out.to(x.dtype)

    return f


def chain_time(fn, x0: torch.Tensor, g: torch.Tensor, reps: int = 20, depth: int = 10) -> float:
    def run():
        h = x0
        for _ in range(depth):
            h = fn(h) + h
        (h * g).sum().backward()

    for _ in range(3):
        run()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    a = common.parser(__doc__, threads=2, rounds=5).parse_args()
    common.set_threads(a.threads)
    torch.manual_seed(0)
    print("| dtype | shape | plain autograd (ms per norm) | retrolm (ms per norm) | speed-up |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            norm = RMSNorm(shape[-1])
            x0 = torch.randn(*shape, dtype=dtype, requires_grad=True)
            g = torch.randn(*shape, dtype=dtype)
            sides = {"none": lambda h: h * 1.0, "plain": plain(norm), "ours": norm}
            times: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(a.rounds):
                for k, fn in sides.items():
                    times[k].append(chain_time(fn, x0, g))
            base = statistics.median(times["none"])
            per = {k: (statistics.median(times[k]) - base) / 10 * 1e3 for k in ("plain", "ours")}
            print(
                f"| {str(dtype).split('.')[-1]} | {shape[1:]} | {per['plain']:.3f} | "
                f"{per['ours']:.3f} | {per['plain'] / per['ours']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
