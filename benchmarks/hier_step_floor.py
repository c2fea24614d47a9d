"""How far is the hierarchical model's cached decoding step from a bare one? Ours vs two
bare eager steps of the benchmark config, one run.

Ours: one cached step of ``retrolm.HierarchicalTransformer`` inside ``model.generate``
(the config of ``bench_hier.py``: dim 256, depth 4, heads 4 x 64, hierarchies (1, 2, 8),
windows (32, 64, None), vocabulary 256; a 992-token prompt, then 32 new tokens), fp32,
timed by wrapping the model's forward. The bare steps do the arithmetic every step of this
config does, as straight-line tensor code over plain weights: the compression of the last
2 and 8 positions (linear over the window, SiLU, linear), then per layer and hierarchy
RMSNorm, one q|k|v matmul, attention of one query over 32 / 64 / 128 fixed keys, the output
projection, the feed-forward, and the merge MLP into the predicting stream; then the logits.
Left out: token shift, rotary, KV-cache writes and sub-sequence bookkeeping. "per hierarchy"
runs the three blocks of a layer one after the other, as ours does; "batched" runs their
projections and feed-forwards as one ``bmm`` over the stacked weights of the three (possible
when the hierarchies have the same widths, as here). Rounds interleave; medians.

    python benchmarks/hier_step_floor.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import bench_hier as BH  # noqa: E402  (the benchmark config)
from decode_step_floor import cached_step_times, interleaved_medians  # noqa: E402


def bare_steps():
    """(per-hierarchy step, batched step): the bare steps over random weights."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    D, H, DH, L, NH = 256, 4, 64, 4, 3
    KEYS = (32, 64, 128)  # window 32, 64, full (~124 compressed tokens of hierarchy 8)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.05

    lay = [
        [
            dict(
                qkv=r(D, 3 * H * DH),
                o=r(H * DH, D),
                f1=r(D, 4 * D),
                f2=r(4 * D, D),
                n1=torch.ones(D),
                n2=torch.ones(D),
                k=r(1, H, KEYS[h], DH),
                v=r(1, H, KEYS[h], DH),
            )
            for h in range(NH)
        ]
        for _ in range(L)
    ]
    merge = [dict(n=torch.ones(3 * D), f1=r(3 * D, 2 * D), f2=r(2 * D, D)) for _ in range(L)]
    comp = [dict(c=r(c * D, 4 * D), p=r(4 * D, D)) for c in (2, 8)]
    logits = r(D, 256)
    # stacked
    st = [
        dict(
            qkv=torch.stack([lay[l][h]["qkv"] for h in range(NH)]),
            o=torch.stack([lay[l][h]["o"] for h in range(NH)]),
            f1=torch.stack([lay[l][h]["f1"] for h in range(NH)]),
            f2=torch.stack([lay[l][h]["f2"] for h in range(NH)]),
            n1=torch.ones(NH, 1, D),
            n2=torch.ones(NH, 1, D),
        )
        for l in range(L)
    ]
    win = torch.randn(1, 8, D)

    def rms(x, w):  # RMSNorm with one weight row per hierarchy
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def compress():
        outs = [win[:, -1:]]
        for cw, c in zip(comp, (2, 8)):
            outs.append(F.silu(win[:, -c:].reshape(1, 1, -1) @ cw["c"]) @ cw["p"])
        return outs

    def step_per():
        xs = compress()
        for l in range(L):
            new = []
            for h in range(NH):
                w, x = lay[l][h], xs[h]
                q, k, v = (
                    (F.rms_norm(x, (D,), w["n1"]) @ w["qkv"])
                    .view(1, 1, 3, H, DH)
                    .transpose(1, 3)
                    .unbind(2)
                )
                a = F.scaled_dot_product_attention(q, w["k"], w["v"])
                x = x + a.transpose(1, 2).reshape(1, 1, H * DH) @ w["o"]
                x = x + F.gelu(F.rms_norm(x, (D,), w["n2"]) @ w["f1"]) @ w["f2"]
                new.append(x)
            m = merge[l]
            new[0] = (
                new[0]
                + F.silu(F.rms_norm(torch.cat(new, -1), (3 * D,), m["n"]) @ m["f1"]) @ m["f2"]
            )
            xs = new
        return F.layer_norm(xs[0], (D,)) @ logits

    def step_batched():
        xs = torch.cat(compress(), 0)  # (3, 1, D)
        for l in range(L):
            w = st[l]
            qkv = torch.bmm(rms(xs, w["n1"]), w["qkv"])  # (3, 1, 768)
            outs = []
            for h in range(NH):
                q, k, v = qkv[h : h + 1].view(1, 1, 3, H, DH).transpose(1, 3).unbind(2)
                outs.append(F.scaled_dot_product_attention(q, lay[l][h]["k"], lay[l][h]["v"]))
            a = torch.cat(outs, 0).transpose(1, 2).reshape(NH, 1, H * DH)
            xs = xs + torch.bmm(a, w["o"])
            xs = xs + torch.bmm(F.gelu(torch.bmm(rms(xs, w["n2"]), w["f1"])), w["f2"])
            m = merge[l]
            pooled = (
                F.silu(F.rms_norm(xs.reshape(1, 1, 3 * D), (3 * D,), m["n"]) @ m["f1"]) @ m["f2"]
            )
            xs = torch.cat((xs[:1] + pooled, xs[1:]), 0)
        return F.layer_norm(xs[:1], (D,)) @ logits

    return step_per, step_batched


def ours_steps(model, prompt) -> list[float]:
    return cached_step_times(model, lambda: model.generate(prompt, BH.NEW, top_k=25))


def timed_calls(fn, n: int = BH.NEW - 1) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    model = BH.build("ours", 1024).eval()
    prompt = torch.randint(1, 256, (1, BH.PROMPT))
    per, batched = bare_steps()
    sides = {
        "retrolm": lambda: ours_steps(model, prompt),
        "bare, per hierarchy": lambda: timed_calls(per),
        "bare, batched": lambda: timed_calls(batched),
    }
    with torch.no_grad():
        best = interleaved_medians(sides, a.rounds, "median of 31 per round")
    print(f"retrolm / bare per hierarchy: {best['retrolm'] / best['bare, per hierarchy']:.2f}x")
    print(
        f"bare per hierarchy / batched: {best['bare, per hierarchy'] / best['bare, batched']:.2f}x"
    )


if __name__ == "__main__":
    main()
