"""DeLighT vs the plain decoder, and OpenELM's layer-wise vs uniform blocks: held-out
bits/byte on the bundled KJV corpus, then training and cached-generation speed.

Models (byte-level, see ``kjv_pipeline``; same database, steps, batch, schedule, seed; peak
learning rate ``--lr``, 1e-3 unless given, ``--delight-lr`` a separate one for the DeLighT
rows):

- ``delight-small`` (``delight`` family): d_m 128, 8 blocks, DExTra depths 4 ... 8, rotary
  attention and an untied output as the decoder's;
- ``delight-small paper``: the same with the paper's sinusoids and tied output;
- decoder = params: the project's plain decoder (``hierarchical`` family with one
  full-resolution stream and full attention: ``hier-small``'s ``flat`` baseline), width
  128, 4 heads of 32, its depth and FFN multiple chosen so its parameters equal DeLighT's;
- decoder 2x: the same, with twice DeLighT's non-embedding parameters;
- openelm layer-wise: ``openelm-small`` (4 layers, alpha 0.5 ... 1.0, beta 0.5 ... 4.0);
- openelm uniform: the same layers with constant alpha and beta, beta chosen for equal
  parameters.

Each through ``retrolm.train.train`` and ``retrolm eval`` (sliding windows, stride half the
window). Issue 23's targets: DeLighT's bits/byte <= the equal decoder's and within 1% of
the 2x decoder's. Parameters: all of them; "non-embedding": without the (V, d) tables.

Speed (``--speed-rounds``, interleaved in this process, 1 thread): one training step
(batch 4 x seq_len, fp32 and bf16 autocast, each side its faster) and cached greedy
generation (batch 1, a 16-token prompt, 128 new tokens, fp32), DeLighT against the equal
decoder (target: both ratios >= 0.5).

    python -m benchmarks.quality.quality_delight [--steps 600] [--work DIR] [--only ...]

600 steps (the default) took 1,065 s for all five models plus the speed part on the shared
2-core machine under a load of 2-4 (2026-12-07); ~10 min when quiet. ``--only none`` runs only
the speed part (the database is reused from ``--work``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.quality import kjv_pipeline
from retrolm.models.registry import get_family

VOCAB = kjv_pipeline.VOCAB
FLAT = dict(num_tokens=VOCAB, dim=128, heads=4, dim_head=32)


def params(family: str, cfg: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, non-embedding parameters: without tensors with a V-sized dim)."""
    fam = get_family(family)
    model = fam.build(fam.make_config(cfg))
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for p in model.parameters() if VOCAB in p.shape)
    return total, total - emb


def flat_matching(target: int, non_embedding: bool, seq_len: int) -> dict[str, Any]:
    """The flat decoder (depth, ff_mult in quarters) whose count is closest to ``target``."""
    best = None
    for depth in range(2, 17):
        for q in range(4, 25):
            cfg = dict(FLAT, depth=depth, ff_mult=q / 4, seq_len=seq_len)
            n = params("hierarchical", cfg)[1 if non_embedding else 0]
            if best is None or abs(n - target) < best[0]:
                best = (abs(n - target), cfg)
    return best[1]


def openelm_uniform(target: int, seq_len: int) -> dict[str, Any]:
    """openelm-small's layers with constant multipliers (alpha 0.75), beta for ``target``."""
    best = None
    for q in range(2, 17):
        cfg = dict(preset_cfg("openelm-small", seq_len), qkv_multipliers=0.75)
        cfg["ffn_multipliers"] = q / 4
        n = params("delight", cfg)[0]
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cfg)
    return best[1]


def preset_cfg(name: str, seq_len: int) -> dict[str, Any]:
    from retrolm.models.delight.config import PRESETS

    return dict(PRESETS[name], max_seq_len=seq_len)


def models(seq_len: int) -> dict[str, tuple[str, dict[str, Any]]]:
    delight = preset_cfg("delight-small", seq_len)
    total, non_emb = params("delight", delight)
    elm = preset_cfg("openelm-small", seq_len)
    return {
        "delight-small": ("delight", delight),
        "delight-small paper": ("delight", preset_cfg("delight-small-paper", seq_len)),
        "decoder = params": ("hierarchical", flat_matching(total, False, seq_len)),
        "decoder 2x non-emb": ("hierarchical", flat_matching(2 * non_emb, True, seq_len)),
        "openelm layer-wise": ("delight", elm),
        "openelm uniform": ("delight", openelm_uniform(params("delight", elm)[0], seq_len)),
    }


def _train_step(model, ids: torch.Tensor, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids, return_loss=True)
        (out[0] if isinstance(out, tuple) else out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _generate(model, family: str, prompt: torch.Tensor, new: int):
    fam = get_family(family)

    @torch.no_grad()
    def run() -> None:
        cache = fam.init_cache(model, 1)
        tok = fam.logits(model, prompt, cache)[:, -1:].argmax(-1)
        for _ in range(new - 1):
            tok = fam.logits(model, tok, cache)[:, -1:].argmax(-1)

    return run


def speed(chosen: dict, seq_len: int, rounds: int) -> dict[str, float]:
    """Training and cached-generation tokens/s of DeLighT and the equal decoder."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, seq_len + 1))
    prompt, new = torch.randint(0, VOCAB, (1, 16)), 128
    sides, built = {}, {}
    for name in ("delight-small", "decoder = params"):
        family, cfg = chosen[name]
        fam = get_family(family)
        built[name] = (fam.build(fam.make_config(cfg)), family)
        model = built[name][0]
        sides[f"{name} train fp32"] = _train_step(model, ids, False)
        sides[f"{name} train bf16"] = _train_step(model, ids, True)
    times = common.interleave(sides, rounds)
    out = {}
    for name in ("delight-small", "decoder = params"):
        best = min(statistics.median(times[f"{name} train {d}"]) for d in ("fp32", "bf16"))
        out[f"{name} train tokens/s"] = 4 * seq_len / best
    gen = {}
    for name, (model, family) in built.items():
        model.eval()
        gen[name] = _generate(model, family, prompt, new)
    gtimes = common.interleave(gen, rounds)
    for name in gen:
        out[f"{name} generation tokens/s"] = new / statistics.median(gtimes[name])
    for kind in ("train", "generation"):
        out[f"{kind} ratio"] = (
            out[f"delight-small {kind} tokens/s"] / out[f"decoder = params {kind} tokens/s"]
        )
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--held-bytes", type=int, default=16384, help="per held-out book")
    ap.add_argument("--precision", default="bf16", help="fp32, bf16 or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, every model")
    ap.add_argument(
        "--delight-lr", type=float, help="the DeLighT rows' own peak rate (default: --lr)"
    )
    ap.add_argument("--speed-rounds", type=int, default=5, help="0: skip the speed part")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "retrolm-q-delight"))
    ap.add_argument("--only", nargs="+", help="run only these models (names as printed)")
    a = ap.parse_args()
    common.set_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    chosen = models(a.seq_len)
    for name, (family, cfg) in chosen.items():
        total, non_emb = params(family, cfg)
        print(f"{name}: {family} {json.dumps(cfg)}: {total:,} params, {non_emb:,} non-embedding")
    work = Path(a.work)
    db, held = kjv_pipeline.prepare(work, a.seq_len, a.steps * a.batch * a.seq_len, a.held_bytes)
    train = dict(
        steps=a.steps, batch_size=a.batch, seq_len=a.seq_len, lr=a.lr,
        warmup_steps=max(1, a.steps // 10), precision=a.precision, seed=a.seed,
    )  # fmt: skip
    rows = []
    for i, (name, (family, cfg)) in enumerate(chosen.items()):
        if a.only and name not in a.only:
            continue
        run = work / f"run-{i}"
        shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resume
        lr = a.delight_lr if name.startswith("delight") and a.delight_lr else a.lr
        run_train = dict(train, lr=lr)
        row = kjv_pipeline.train_and_eval(db, held, run, family, cfg, run_train, a.held_bytes + 1)
        rows.append({"model": name, "lr": lr, "non_embedding": params(family, cfg)[1], **row})
        print(json.dumps(rows[-1]), flush=True)
    kjv_pipeline.print_table(rows)
    if a.speed_rounds:
        print(json.dumps(speed(chosen, a.seq_len, a.speed_rounds)))
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
