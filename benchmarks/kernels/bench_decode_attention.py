"""One decoding query against a KV cache: SDPA on CPU in bf16 vs fp32 (and casting per step).

Explains why bf16 decode steps are not faster than fp32 ones here (history/generation.md):
one query, 4 heads, ``--keys`` cached keys, head dim 64, batch 1.

    python -m benchmarks.kernels.bench_decode_attention --threads 2 --keys 512
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks import common


def per_call_us(fn, reps: int = 500) -> float:
    for _ in range(50):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    p = common.parser(__doc__, threads=2)
    p.add_argument("--keys", type=int, default=512)
    a = p.parse_args()
    common.set_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g) for n in (1, a.keys, a.keys))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    cases = {
        "fp32 (baseline)": lambda: F.scaled_dot_product_attention(q, k, v),
        "bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb),
        "bf16 cache cast to fp32 per call": lambda: F.scaled_dot_product_attention(
            qb.float(), kb.float(), vb.float()
        ),
    }
    times = {name: per_call_us(fn) for name, fn in cases.items()}
    base = times["fp32 (baseline)"]
    for name, us in times.items():
        print(f"{name:34s} {us:7.1f} us per call  ({us / base:.2f}x the fp32 time)")


if __name__ == "__main__":
    main()
