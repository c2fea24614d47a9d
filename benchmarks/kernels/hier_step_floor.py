"""How far is the hierarchical model's cached decoding step from a bare one? Ours vs two
bare eager steps of the benchmark config, one run.

Ours: one cached step of ``retrolm.HierarchicalTransformer`` inside ``model.generate``
(the config of ``compare/bench_hier.py``: dim 256, depth 4, heads 4 x 64, hierarchies (1, 2, 8),
windows (32, 64, None), vocabulary 256; a 992-token prompt, then 32 new tokens), fp32,
timed by wrapping the model's forward. The bare steps do the arithmetic every step of this
config does, as straight-line tensor code over plain weights: the compression of the last
2 and 8 positions (linear over the window, SiLU, linear), then per layer and hierarchy
RMSNorm, one q|k|v matmul, attention of one query over 32 / 64 / 128 fixed keys, the output
projection, the feed-forward, and the merge MLP into the predicting stream; then the logits.
Left out: token shift, rotary, KV-cache writes and sub-sequence bookkeeping. "per hierarchy"
runs the three blocks of a layer one after the other, as ours does; "batched" runs their
projections and feed-forwards as one ``bmm`` over the stacked weights of the three (possible
when the hierarchies have the same widths, as here). ``--cpp`` adds "per hierarchy" written
in C++ against ATen (the same kernels, called without Python; compiled on first use through
``torch.utils.cpp_extension``, which needs a C++ compiler and ninja, ~30 s): how much of the
bare step is Python. Rounds interleave; medians.

    python -m benchmarks.kernels.hier_step_floor [--rounds 3] [--threads 2] [--cpp]
"""

from __future__ import annotations

from benchmarks import common
from benchmarks.common import HIER_NEW, HIER_PROMPT, interleaved_medians

# "per hierarchy" in C++: the same ATen calls in the same order, no Python between them
CPP_STEP = r"""
#include <torch/extension.h>
using torch::Tensor;

// lay: per (layer, hierarchy) qkv, o, f1, f2, n1, n2, k, v; merge: per layer n, f1, f2;
// comp: per compressed hierarchy (factors 2, 8) c, p
Tensor step_per(Tensor win, std::vector<Tensor> lay, std::vector<Tensor> merge,
                std::vector<Tensor> comp, Tensor logits, int64_t layers, int64_t nh) {
  torch::NoGradGuard no_grad;
  const int64_t D = 256, H = 4, DH = 64, factors[2] = {2, 8};
  std::vector<Tensor> xs{win.narrow(1, win.size(1) - 1, 1)};
  for (int i = 0; i < 2; i++) {
    auto w = win.narrow(1, win.size(1) - factors[i], factors[i]).reshape({1, 1, -1});
    xs.push_back(torch::matmul(torch::silu(torch::matmul(w, comp[2 * i])), comp[2 * i + 1]));
  }
  for (int64_t l = 0; l < layers; l++) {
    std::vector<Tensor> out;
    for (int64_t h = 0; h < nh; h++) {
      const Tensor* w = &lay[(l * nh + h) * 8];
      Tensor x = xs[h];
      auto qkv = torch::matmul(at::rms_norm(x, {D}, w[4]), w[0])
                     .view({1, 1, 3, H, DH}).transpose(1, 3).unbind(2);
      auto a = at::scaled_dot_product_attention(qkv[0], w[6], w[7]);
      x = x + torch::matmul(a.transpose(1, 2).reshape({1, 1, H * DH}), w[1]);
      x = x + torch::matmul(torch::gelu(torch::matmul(at::rms_norm(x, {D}, w[5]), w[2])), w[3]);
      out.push_back(x);
    }
    auto pooled = torch::matmul(
        torch::silu(torch::matmul(at::rms_norm(torch::cat(out, -1), {3 * D}, merge[3 * l]),
                                  merge[3 * l + 1])),
        merge[3 * l + 2]);
    out[0] = out[0] + pooled;
    xs = out;
  }
  return torch::matmul(at::layer_norm(xs[0], {D}), logits);
}
"""


def cpp_step(weights):
    """The "per hierarchy" bare step compiled from ``CPP_STEP`` over the same weights."""
    from torch.utils.cpp_extension import load_inline

    ext = load_inline("retrolm_hier_step_floor", CPP_STEP, functions=["step_per"])
    lay, merge, comp, logits, win = weights
    keys = ("qkv", "o", "f1", "f2", "n1", "n2", "k", "v")
    flat = [blk[key] for layer in lay for blk in layer for key in keys]
    merge_flat = [m[key] for m in merge for key in ("n", "f1", "f2")]
    comp_flat = [c[key] for c in comp for key in ("c", "p")]
    return lambda: ext.step_per(win, flat, merge_flat, comp_flat, logits, len(lay), len(lay[0]))


def bare_steps():
    """(per-hierarchy step, batched step, their weights): the bare steps over random
    weights."""
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

    return step_per, step_batched, (lay, merge, comp, logits, win)


def ours_steps(model, prompt) -> list[float]:
    return common.cached_step_times(model, lambda: model.generate(prompt, HIER_NEW, top_k=25))


def timed_calls(fn) -> list[float]:
    """Seconds of each of as many calls of ``fn`` as a generation has cached steps."""
    return common.timed_calls(lambda _: fn(), HIER_NEW - 1)


def main() -> None:
    ap = common.parser(__doc__, threads=2, rounds=3)
    ap.add_argument("--cpp", action="store_true", help="add the per-hierarchy step in C++")
    a = ap.parse_args()
    import torch

    common.set_threads(a.threads)
    model = common.build_hier("ours", 1024).eval()
    prompt = torch.randint(1, 256, (1, HIER_PROMPT))
    per, batched, weights = bare_steps()
    sides = {
        "retrolm": lambda: ours_steps(model, prompt),
        "bare, per hierarchy": lambda: timed_calls(per),
        "bare, batched": lambda: timed_calls(batched),
    }
    if a.cpp:
        cpp = cpp_step(weights)
        with torch.no_grad():
            diff = (cpp() - per()).abs().max().item()
        print(f"C++ step vs Python step: max |difference| {diff:.1e}")
        sides["bare, per hierarchy, C++"] = lambda: timed_calls(cpp)
    with torch.no_grad():
        best = interleaved_medians(sides, a.rounds, "median of 31 per round")
    print(f"retrolm / bare per hierarchy: {best['retrolm'] / best['bare, per hierarchy']:.2f}x")
    print(
        f"bare per hierarchy / batched: {best['bare, per hierarchy'] / best['bare, batched']:.2f}x"
    )
    if a.cpp:
        ratio = best["bare, per hierarchy"] / best["bare, per hierarchy, C++"]
        print(f"bare per hierarchy, Python / C++: {ratio:.2f}x")


if __name__ == "__main__":
    main()
