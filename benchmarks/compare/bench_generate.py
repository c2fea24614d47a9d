"""Generation speed: retrolm.generate vs RETRO-pytorch 0.3.9, side by side in one run.

Config (issue 2/4): decoder 256 x 6, encoder 256 x 2, CCA layers (3, 6), heads 4, dim_head 64,
vocabulary 28996, chunk 64, k = 2 neighbours, max_seq_len 512; batch 1, a 448-token prompt,
64 new tokens, sampling from the top 10% of the vocabulary at temperature 1; 2 threads.

Both sides retrieve at every chunk boundary through a stub that returns random neighbour
tokens (no faiss, no BERT), so the numbers are model cost only:
- anchor: RETRO-pytorch's own TrainingWrapper.generate (reruns the whole prefix and
  re-encodes every neighbour set for each token; it has no KV cache);
- ours:   retrolm.generate (KV cache; each chunk's neighbours encoded once).
Every (side, dtype) runs in a fresh process, sides interleaved round after round; each side
gets its faster dtype; the ratio uses medians from this run. Dtypes: fp32, bf16 (autocast
for the whole call) and, for retrolm, bf16p (``prefill_dtype=bf16``: the prompt under bf16
autocast, the cached steps in fp32). Our fp32 steps take the fused decoding blocks
(``retrolm.nn.fused.decode``); ``bf16p-aten`` is bf16p with them off (the ATen path, the
fastest ours before them), reported for the fused/ATen ratio and not counted as a dtype;
``bf16pw`` is bf16p with the fused blocks reading bf16 copies of the weights
(``fused_decode.set_weight_dtype``).

    python -m benchmarks.compare.bench_generate              # 2 rounds
    python -m benchmarks.compare.bench_generate --rounds 1
    python -m benchmarks.compare.bench_generate --phases     # ours only: prefill / steps / sampling
Needs: pip install --no-deps retro-pytorch==0.3.9 (autofaiss is stubbed if absent).
"""

from __future__ import annotations

import statistics
import sys
import time

from benchmarks import common
from benchmarks.common import StubRetriever

VOCAB, PROMPT, NEW, L = common.GEN_VOCAB, common.GEN_PROMPT, common.GEN_NEW, common.GEN_L


def model_config() -> dict:
    """The issue's benchmark model, less the vocabulary and length set per run."""
    return common.retro_bench_model("num_tokens", "max_seq_len")


def anchor_generate(prompt, dtype: str) -> int:
    import torch

    common.stub_autofaiss()
    from retro_pytorch import RETRO
    from retro_pytorch import training as T

    model = RETRO(max_seq_len=L, num_tokens=VOCAB, **model_config()).eval()
    g = torch.Generator().manual_seed(1)

    def fetch(chunks):  # (b*n, 64) -> (b*n, k, 128), like knn_chunks_from_seq_chunks
        return torch.randint(1, VOCAB, (chunks.shape[0], common.GEN_K, 128), generator=g)

    w = T.TrainingWrapper.__new__(T.TrainingWrapper)
    torch.nn.Module.__init__(w)
    w.retro, w.chunk_size, w.fetch_knn_chunks_fn = model, 64, fetch

    def run(max_len):
        w.max_seq_len = max_len
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return w.generate(start=prompt, filter_thres=0.9, temperature=1.0)

    run(PROMPT + 2)  # warm-up
    t0 = time.perf_counter()
    out = run(PROMPT + NEW)
    return out.shape[-1] - PROMPT, time.perf_counter() - t0


def ours_generate(prompt, dtype: str):
    import torch

    from retrolm import RETRO, generate

    model = RETRO(max_seq_len=L, num_tokens=VOCAB, **model_config()).eval()
    top_k = int(0.1 * VOCAB)

    pre = torch.bfloat16 if dtype == "bf16p" else None

    def run(n):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return generate(
                model, prompt, n, StubRetriever(), temperature=1.0, top_k=top_k, seed=0,
                prefill_dtype=pre,
            )  # fmt: skip

    run(2)  # warm-up
    t0 = time.perf_counter()
    out = run(NEW)
    return out.new_ids.shape[1], time.perf_counter() - t0


def ours_phases(dtype: str) -> None:
    """Where one call of ours goes: the prompt's forward, the cached steps, sampling and the
    rest (retrieval hooks, the loop), by wrapping the model's forward and the sampler."""
    import torch

    import retrolm.sampling as gen_mod  # the one decoding loop samples through it
    from retrolm import RETRO

    torch.set_num_threads(2)
    torch.manual_seed(0)
    prompt = torch.randint(1, VOCAB, (1, PROMPT))
    model = RETRO(max_seq_len=L, num_tokens=VOCAB, **model_config()).eval()
    spent: dict[str, list[float]] = {"prefill": [], "step": [], "sample": []}
    forward, sample = model.forward, gen_mod.sample_next

    def timed_forward(seq, *a, **k):
        t0 = time.perf_counter()
        out = forward(seq, *a, **k)
        spent["prefill" if seq.shape[1] > 1 else "step"].append(time.perf_counter() - t0)
        return out

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        spent["sample"].append(time.perf_counter() - t0)
        return out

    model.forward, gen_mod.sample_next = timed_forward, timed_sample
    pre = torch.bfloat16 if dtype == "bf16p" else None
    for _ in range(2):  # the first call warms up
        for v in spent.values():
            v.clear()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            gen_mod.generate(
                model, prompt, NEW, StubRetriever(), temperature=1.0, top_k=int(0.1 * VOCAB),
                seed=0, prefill_dtype=pre,
            )  # fmt: skip
        total = time.perf_counter() - t0
    print(f"ours {dtype}: one call {total * 1e3:.0f} ms")
    for name, v in spent.items():
        print(f"  {name:8s} {len(v):3d} x median {statistics.median(v) * 1e3:7.2f} ms = "
              f"{sum(v) * 1e3:6.1f} ms")  # fmt: skip
    rest = total - sum(sum(v) for v in spent.values())
    print(f"  rest (retrieval hooks, loop) {rest * 1e3:.1f} ms")


def child(side: str, dtype: str) -> dict:
    import torch

    from retrolm.nn.fused import decode as fused_decode

    if dtype.endswith("-aten"):
        fused_decode.set_enabled(False)
        dtype = dtype.removesuffix("-aten")
    if dtype == "bf16pw":
        fused_decode.set_weight_dtype(torch.bfloat16)
        dtype = "bf16p"

    torch.set_num_threads(2)
    torch.manual_seed(0)
    prompt = torch.randint(1, VOCAB, (1, PROMPT))
    new, secs = (anchor_generate if side == "anchor" else ours_generate)(prompt, dtype)
    return dict(
        side=side, dtype=dtype, new_tokens=new, seconds=round(secs, 3), tok_s=round(new / secs, 2)
    )


def main() -> None:
    ap = common.parser(__doc__, rounds=2)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "DTYPE"))
    ap.add_argument("--phases", action="store_true", help="ours only: time per phase")
    a = ap.parse_args()
    if a.phases:
        for dtype in ("fp32", "bf16", "bf16p"):
            ours_phases(dtype)
        return
    if a.child:
        common.emit(child(*a.child))
        return
    runs: dict[tuple[str, str], list[float]] = {}
    dtypes = dict(anchor=("fp32", "bf16"), ours=("fp32", "bf16", "bf16p", "bf16pw", "bf16p-aten"))
    for r in range(a.rounds):
        for side in ("anchor", "ours"):
            for dtype in dtypes[side]:
                try:
                    res = common.rerun(__spec__.name, "--child", side, dtype)
                except common.ChildFailed as e:
                    sys.exit(f"{side} {dtype} failed:\n{e}")
                runs.setdefault((side, dtype), []).append(res["tok_s"])
                print(
                    f"round {r + 1}: {side:6s} {dtype}: {res['new_tokens']} tokens in "
                    f"{res['seconds']:.2f}s = {res['tok_s']:.2f} tok/s",
                    flush=True,
                )
    best = {}
    for side in ("anchor", "ours"):
        med = {d: statistics.median(runs[(side, d)]) for d in dtypes[side]}
        if side == "ours":
            aten = med.pop("bf16p-aten")
            print(f"ours: fused blocks / ATen path (bf16p): {med['bf16p'] / aten:.2f}x")
        d = max(med, key=med.get)
        best[side] = (med[d], d)
        print(f"{side}: best dtype {d}, median {med[d]:.2f} tok/s")
    ratio = best["ours"][0] / best["anchor"][0]
    print(f"generation tokens/s, retrolm / RETRO-pytorch 0.3.9: {ratio:.1f}x")


if __name__ == "__main__":
    main()
