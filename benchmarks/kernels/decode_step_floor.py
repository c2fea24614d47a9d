"""How far is RETRO's cached decoding step from a minimal one? Ours vs a bare eager step and
its ``torch.compile`` version, same shapes, one run.

Ours: one cached step of ``retrolm.RETRO`` inside ``retrolm.generate`` (the benchmark model
of ``compare/bench_generate.py``: decoder 256 x 6, CCA at layers 3 and 6, heads 4 x 64, vocabulary
28996, a 448-token prompt then 64 new tokens, 2 neighbours of 128 tokens per chunk), timed
by wrapping the model's forward, fp32. The bare step is the same arithmetic written as
straight-line tensor code over plain weight tensors: RMSNorm, one fused q|k|v matmul, a
preallocated 512-slot KV cache written by ``index_copy_``, SDPA over the cache, the
feed-forward, CCA against 256 fixed encoded neighbour keys at layers 3 and 6, the
vocabulary projection: ~110 kernels, no modules, no rotary, no copy head, no sampling.
``--compile`` adds that bare step through ``torch.compile(fullgraph=True)`` (inductor;
compiling takes ~10-20 s); ``--packed`` the bare step with bf16 weights (oneDNN packed,
activations and attention in fp32). Rounds interleave the sides; medians over the 63 steps of each.

    python -m benchmarks.kernels.decode_step_floor [--rounds 3] [--threads 2] [--compile] [--packed]
"""

from __future__ import annotations

import time

from benchmarks import common
from benchmarks.common import GEN_L, GEN_NEW, GEN_PROMPT, GEN_VOCAB, interleaved_medians

D, H, DH, LAYERS, CCA, NEIGHBOUR_KEYS = 256, 4, 64, 6, (3, 6), 2 * 128


def ours_steps(model, prompt) -> list[float]:
    from retrolm import generate

    def call():
        generate(model, prompt, GEN_NEW, common.StubRetriever(), top_k=GEN_VOCAB // 10, seed=0)

    return common.cached_step_times(model, call)


def bare_step_fn(packed: bool = False):
    """step(tok (1,), pos () long) -> logits (V,): the minimal eager step. ``packed``: every
    matmul by a weight through oneDNN's packed bf16 weights (``retrolm.nn.decode_linear``'s
    bf16 path; input rounded to bf16, output back to fp32), all else in fp32."""
    import torch
    import torch.nn.functional as F

    from retrolm.nn.decode_linear import pack_weight

    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    layers = [
        dict(
            n1=torch.ones(D),
            qkv=rand(D, 3 * H * DH, scale=D**-0.5),
            o=rand(H * DH, D, scale=(H * DH) ** -0.5),
            n2=torch.ones(D),
            f1=rand(D, 4 * D, scale=D**-0.5),
            f2=rand(4 * D, D, scale=(4 * D) ** -0.5),
            n3=torch.ones(D),
            cq=rand(D, H * DH, scale=D**-0.5),
            co=rand(H * DH, D, scale=(H * DH) ** -0.5),
            ck=rand(1, H, NEIGHBOUR_KEYS, DH, scale=1.0),  # one chunk's encoded neighbours
            cv=rand(1, H, NEIGHBOUR_KEYS, DH, scale=1.0),
            k=torch.zeros(1, H, GEN_L, DH),  # the KV cache, written in place
            v=torch.zeros(1, H, GEN_L, DH),
        )
        for _ in range(LAYERS)
    ]
    emb, norm, out = rand(GEN_VOCAB, D, scale=1.0), torch.ones(D), rand(D, GEN_VOCAB, scale=D**-0.5)
    slots = torch.arange(GEN_L)
    if packed:  # (in, out) -> oneDNN's opaque bf16 layout of the (out, in) weight
        for w in layers:
            for name in ("qkv", "o", "f1", "f2", "cq", "co"):
                w[name] = pack_weight(w[name].t())
        out = pack_weight(out.t())

    def mm(x, w):
        if not packed:
            return x @ w
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, None, "none", [], "")
        return y.float()

    def step(tok, pos):
        x = F.embedding(tok.view(1, 1), emb)  # (1, 1, D)
        mask = (slots <= pos).view(1, 1, 1, GEN_L)
        for i, w in enumerate(layers, start=1):
            h = F.rms_norm(x, (D,), w["n1"])
            q, k, v = mm(h, w["qkv"]).view(1, 1, 3, H, DH).transpose(1, 3).unbind(2)
            w["k"].index_copy_(2, pos.view(1), k)
            w["v"].index_copy_(2, pos.view(1), v)
            a = F.scaled_dot_product_attention(q, w["k"], w["v"], attn_mask=mask)
            x = x + mm(a.transpose(1, 2).reshape(1, 1, H * DH), w["o"])
            if i in CCA:
                h = F.rms_norm(x, (D,), w["n3"])
                q = mm(h, w["cq"]).view(1, 1, H, DH).transpose(1, 2)
                a = F.scaled_dot_product_attention(q, w["ck"], w["cv"])
                x = x + mm(a.transpose(1, 2).reshape(1, 1, H * DH), w["co"])
            h = F.rms_norm(x, (D,), w["n2"])
            x = x + mm(F.gelu(mm(h, w["f1"])), w["f2"])
        return mm(F.rms_norm(x, (D,), norm), out).view(GEN_VOCAB)

    return step


def bare_steps(step) -> list[float]:
    import torch

    tok = torch.tensor([3])
    with torch.no_grad():
        return common.timed_calls(lambda i: step(tok, torch.tensor(GEN_PROMPT + i)), GEN_NEW - 1)


def main() -> None:
    ap = common.parser(__doc__, threads=2, rounds=3)
    ap.add_argument("--compile", action="store_true", help="also time the bare step compiled")
    ap.add_argument("--packed", action="store_true", help="also the bare step, bf16 weights")
    a = ap.parse_args()
    import torch

    from retrolm import RETRO

    common.set_threads(a.threads)
    torch.manual_seed(0)
    prompt = torch.randint(1, GEN_VOCAB, (1, GEN_PROMPT))
    cfg = common.retro_bench_model("num_tokens", "max_seq_len")
    model = RETRO(max_seq_len=GEN_L, num_tokens=GEN_VOCAB, **cfg).eval()
    bare = bare_step_fn()
    sides = {"retrolm": lambda: ours_steps(model, prompt), "bare eager": lambda: bare_steps(bare)}
    if a.packed:
        packed = bare_step_fn(packed=True)
        sides["bare bf16 w"] = lambda: bare_steps(packed)
    if a.compile:
        compiled = torch.compile(bare, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(torch.tensor([3]), torch.tensor(0))
        print(f"compiled the bare step in {time.perf_counter() - t0:.1f} s")
        sides["bare compiled"] = lambda: bare_steps(compiled)
    best = interleaved_medians(sides, a.rounds, "median of 63 per round")
    print(f"retrolm / bare eager: {best['retrolm'] / best['bare eager']:.2f}x")
    if a.packed:
        print(f"bare eager / bare bf16 weights: {best['bare eager'] / best['bare bf16 w']:.2f}x")
    if a.compile:
        print(f"bare eager / bare compiled: {best['bare eager'] / best['bare compiled']:.2f}x")


if __name__ == "__main__":
    main()
