"""Infini-attention memory on vs off: held-out bits/byte on the bundled KJV corpus.

Two ``infini-small`` models (dim 256, depth 4, 4 heads of 64, segments of 128, trained on
512-token windows = 4 segments, truncated BPTT every 2 segments): the linear memory
(eq. 4) and the delta rule (eq. 5). Each is trained through ``retrolm.train.train`` on the
text folder (byte-level tokenizer: vocabulary 258, so bits/byte = nats/token / ln 2 up to
the <eos> tokens; windows never cross a book's end) and scored by ``retrolm eval RUN --text
HELD``: every held-out book (the demo's, its first ``--held-bytes`` bytes) streamed whole,
segment by segment, in the modes ``memory`` and ``no_memory`` (the memory reads nothing:
every segment as if it were the first). Issue 22's target: memory >= 2% lower than off.

  python -m benchmarks.quality.quality_infini [--steps 600] [--segment-len 64] [--work DIR]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks import common

PRESETS = {"linear (eq. 4)": "infini-small", "delta rule (eq. 5)": "infini-small-delta"}


def prepare(work: Path, train_bytes: int, held_bytes: int) -> tuple[Path, Path]:
    """Text folders: the demo's held-out books (their first ``held_bytes``) and the other
    books in name order, about ``train_bytes`` in all."""
    from retrolm.demo import HELD_OUT

    held, text = work / "held", work / "train_text"
    if held.is_dir() and text.is_dir():
        return text, held
    with tarfile.open(common.ROOT / "data" / "kjv.tar.xz") as tar:
        books = {
            Path(m.name).stem: tar.extractfile(m).read().decode("utf-8")
            for m in tar.getmembers()
            if m.isfile() and m.name.endswith(".txt")
        }
    held.mkdir(parents=True, exist_ok=True)
    text.mkdir(exist_ok=True)
    for name in HELD_OUT:
        (held / f"{name}.txt").write_text(books[name][:held_bytes])
    size = 0
    for name in sorted(books):
        if name in HELD_OUT:
            continue
        (text / f"{name}.txt").write_text(books[name])
        size += len(books[name].encode("utf-8"))
        if size >= 1.1 * train_bytes:
            break
    return text, held


def run_one(text: Path, held: Path, run: Path, preset: str, a) -> dict:
    from retrolm.cli import main as cli
    from retrolm.data import TextData
    from retrolm.models.registry import get_family
    from retrolm.train import TrainConfig, train

    values = {"num_tokens": 258, **({"segment_len": a.segment_len} if a.segment_len else {})}
    model_config = get_family("infini").make_config(values, preset=preset).to_dict()
    cfg = TrainConfig(
        steps=a.steps, batch_size=a.batch, lr=1e-3, warmup_steps=max(1, a.steps // 10),
        precision=a.precision, seed=a.seed, eval_every=0, plot=False, num_threads=1,
        save_every=a.steps,
    )  # fmt: skip
    t0 = time.perf_counter()
    res = train(
        TextData(text, vocab_size=258), run, cfg, family="infini", model_config=model_config
    )
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cli(["eval", str(run), "--text", str(held)]) != 0:
        raise SystemExit(f"retrolm eval {run} failed")
    modes = json.loads((run / "eval" / "eval.json").read_text())["modes"]
    on, off = modes["memory"]["bits_per_byte"], modes["no_memory"]["bits_per_byte"]
    return {
        "preset": preset,
        "steps": res.step,
        "precision": res.precision,
        "train_wall_s": round(wall, 1),
        "eval_s": round(time.perf_counter() - t0, 1),
        "tokens": modes["memory"]["tokens"],
        "memory_bpb": round(on, 4),
        "no_memory_bpb": round(off, 4),
        "lower_by": round(1 - on / off, 4),
        "final_train_loss": round(res.loss, 4) if res.loss is not None else None,
    }


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--held-bytes", type=int, default=16384, help="per held-out book")
    ap.add_argument("--precision", default="bf16", help="fp32, bf16 or auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segment-len", type=int, help="instead of the preset's 128")
    ap.add_argument("--only", nargs="+", choices=list(PRESETS))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "retrolm-q-infini"))
    a = ap.parse_args()
    common.set_threads(1)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    work = Path(a.work)
    text, held = prepare(work, a.steps * a.batch * 512, a.held_bytes)
    rows = []
    for i, (name, preset) in enumerate(PRESETS.items()):
        if a.only and name not in a.only:
            continue
        run = work / f"run-{i}"
        shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resume
        rows.append({"model": name, **run_one(text, held, run, preset, a)})
        print(json.dumps(rows[-1]), flush=True)
    print("| memory | steps | held-out tokens | bits/byte on | off | on lower by |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['steps']} | {r['tokens']:,} | {r['memory_bpb']} | "
            f"{r['no_memory_bpb']} | {100 * r['lower_by']:.1f}% |"
        )
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
