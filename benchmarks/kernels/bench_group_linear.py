"""Group linear (GLT) forward + backward FLOP/s against a dense ``nn.Linear``, and the
per-block table of DeLighT's WikiText-103 decoder.

No installable reference implements DeLighT (its code is a 2020 fairseq fork), so the
baseline is the dense layer a GLT replaces: ``nn.Linear(512, 512)`` on 4,096 rows, against
``nn.GroupLinear(512, 512, g)`` (with DeLighT's channel shuffle) for g = 1, 2, 4, 8, 16.
A GLT does 1/g of the dense layer's multiply-accumulates; the question is how much of the
dense layer's FLOP/s it keeps (issue 23's target: >= 50% at 2-4 groups). FLOPs of one
forward + backward: 3 · 2 · rows · 512 · 512 / g (forward, input gradient, weight
gradient). Each side runs in fp32 and in bf16 (weights and input in bf16) and keeps its
faster dtype; the sides alternate for ``--rounds`` rounds and medians are compared.

``--plain`` adds, for each g, the layer written the plain way (autograd through a strided
``bmm``, a permute and ``+ bias``: the formulation before ``GroupLinear``'s fast path) as
a before/after in the same run. ``--clock cpu`` times the process's CPU time instead of the
wall clock: with ``--threads 1`` on a shared machine it leaves out the time other processes
hold the core (it still counts their cache and memory-bandwidth contention); with more
threads it would also count the threads' spin-waits, so use it with one.

Then the table of ``DeLighTLM(dim=512, num_blocks=12, min_depth=4, max_depth=12,
width_mult=2)`` (the reference's WikiText-103 training script), parameters and MACs per
token for each block (a 256-token vocabulary stands in for WikiText-103's; the blocks do
not depend on it).

    python -m benchmarks.kernels.bench_group_linear [--threads 2] [--rounds 5] [--plain]
        [--clock wall|cpu]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from benchmarks import common
from retrolm.models.delight import DeLighTLM
from retrolm.nn import GroupLinear

DIM, ROWS, GROUPS = 512, 4096, (1, 2, 4, 8, 16)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class PlainGroupLinear(GroupLinear):
    """``GroupLinear`` the plain way: autograd through a strided bmm, a permute, ``+ bias``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., i) -> (..., o)
        g = self.groups
        y = torch.bmm(x.reshape(-1, g, self.in_features // g).transpose(0, 1), self.weight)
        y = y.permute(1, 2, 0) if self.shuffle else y.transpose(0, 1)  # (r, o/g, g)
        return y.reshape(*x.shape[:-1], self.out_features) + self.bias


def step_time(layer: nn.Module, x: torch.Tensor, reps: int, clock=time.perf_counter) -> float:
    """Median seconds of one forward + backward (input and weight gradients)."""
    g = torch.randn(x.shape[0], DIM, dtype=x.dtype)
    times = []
    for _ in range(reps):
        xi = x.detach().requires_grad_(True)
        t0 = clock()
        layer(xi).backward(g)
        times.append(clock() - t0)
        layer.zero_grad(set_to_none=True)
    return statistics.median(times)


def measure(rounds: int, reps: int, plain: bool, clock) -> dict[str, dict[str, float]]:
    """GFLOP/s per side and dtype, medians over interleaved rounds."""
    sides: dict[str, nn.Module] = {"dense": nn.Linear(DIM, DIM)}
    for g in GROUPS:
        sides[f"glt g={g}"] = GroupLinear(DIM, DIM, g, shuffle=True)
        if plain and g > 1:  # the same weights
            sides[f"plain g={g}"] = PlainGroupLinear(DIM, DIM, g, shuffle=True)
            sides[f"plain g={g}"].load_state_dict(sides[f"glt g={g}"].state_dict())
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    x32 = torch.randn(ROWS, DIM)
    runs = {}
    for name, layer in sides.items():
        for dname, dt in dtypes.items():
            runs[(name, dname)] = (copy.deepcopy(layer).to(dt), x32.to(dt))
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for layer, x in runs.values():  # warm-up
        step_time(layer, x, 2)
    for _ in range(rounds):
        for k, (layer, x) in runs.items():
            g = 1 if k[0] == "dense" else int(k[0].split("=")[1])
            flops = 3 * 2 * ROWS * DIM * DIM / g
            rates[k].append(flops / step_time(layer, x, reps, clock) / 1e9)
    out: dict[str, dict[str, float]] = {}
    for (name, dname), v in rates.items():
        out.setdefault(name, {})[dname] = statistics.median(v)
    return out


def main() -> None:
    ap = common.parser(__doc__, threads=2, rounds=5)
    ap.add_argument("--reps", type=int, default=5, help="calls per side per round")
    ap.add_argument("--plain", action="store_true", help="add the plain-autograd GLT sides")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="what is timed")
    a = ap.parse_args()
    common.set_threads(a.threads)
    torch.manual_seed(0)
    print(f"threads {a.threads}, clock {a.clock}, load {' '.join(common.load_average())}")
    rates = measure(a.rounds, a.reps, a.plain, CLOCKS[a.clock])
    print(f"load after {' '.join(common.load_average())}")
    dense = max(rates["dense"].values())
    print("\n| layer | MACs vs dense | GFLOP/s fp32 | GFLOP/s bf16 | best / dense best |")
    print("|---|---|---|---|---|")
    for name, r in rates.items():
        g = 1 if name == "dense" else int(name.split("=")[1])
        best = max(r.values())
        print(f"| {name} | 1/{g} | {r['fp32']:.1f} | {r['bf16']:.1f} | **{best / dense:.2f}** |")
    wt103 = DeLighTLM(256, 512, num_blocks=12, min_depth=4, max_depth=12, width_mult=2.0)
    print("\nDeLighT WikiText-103 decoder (d_m 512, 12 blocks, depths 4 ... 12), context 512:")
    print(wt103.describe_blocks())


if __name__ == "__main__":
    main()
