"""Does a trained Memorizing Transformer read its kNN memory? A probe of runs that
``quality_memorizing.py`` trained (its ``--work`` folder).

For each run: the kNN layers' learned gates sigmoid(b) and temperatures exp(s) per head,
then held-out bits/byte per mode (``memory``, ``no_memory``) on the held-out books (as
the benchmark scores them) and on the same books *repeated* (each text twice in one
document). The second copy lies far beyond the XL window, so a model that learned to
retrieve predicts it better with its memory read than without; an XL-only model has no
such path. ``second copy``: 2 x repeated - single (bits/byte over the second copy alone,
up to the <eos> tokens: the first copy is scored the same in both).

``--capacity N`` (repeatable): also score with the kNN memory capped at N pairs per row
at evaluation (the trained weights unchanged; the memory is not a parameter).

  python -m benchmarks.quality.probe_memorizing WORK [WORK ...] [--capacity N ...]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from benchmarks import common


def gates(run: Path) -> list[str]:
    from retrolm.checkpoint import load_model

    model, _ = load_model(run)
    out = []
    for i, blk in enumerate(model.net.layers):
        a = blk.attn
        if getattr(a, "gate_bias", None) is not None:
            g = [round(float(x), 3) for x in a.gate_bias.detach().sigmoid().flatten()]
            t = [round(math.exp(float(x)), 1) for x in a.scale.detach().flatten()]
            out.append(f"layer {i + 1}: gate {g}, temperature {t}")
    return out


def scores(run: Path, text: Path, capacity: int | None) -> dict[str, float]:
    """bits/byte per mode of ``retrolm eval RUN --text TEXT`` (in process)."""
    from retrolm.checkpoint import load_model, open_run_data, resolve_checkpoint
    from retrolm.evaluate import EvalConfig, evaluate

    model, meta = load_model(run)
    if capacity is not None and hasattr(model.config, "max_knn_memories"):
        model.config.max_knn_memories = capacity  # read when a cache is made
    _, tok = open_run_data(meta, resolve_checkpoint(run), None)
    res = evaluate(model, text, None, tokenizer=tok, config=EvalConfig(), family=meta["family"])
    return {m: v["bits_per_byte"] for m, v in res.modes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="+", help="quality_memorizing --work folders")
    ap.add_argument("--capacity", type=int, action="append", default=[])
    a = ap.parse_args()
    common.set_threads(1)
    for work in map(Path, a.work):
        held, rep = work / "held", work / "held_repeated"
        rep.mkdir(exist_ok=True)
        for f in sorted(held.glob("*.txt")):
            (rep / f.name).write_text(f.read_text() * 2)
        for run in sorted(work.glob("run-*")):
            print(f"{run}: {'; '.join(gates(run)) or 'no kNN layer'}", flush=True)
            knn = bool(gates(run))
            for cap in [None, *(a.capacity if knn else [])]:
                single, twice = scores(run, held, cap), scores(run, rep, cap)
                for m, s in single.items():
                    r = twice[m]
                    print(
                        f"  capacity {cap or 'preset'}, {m}: single {s:.4f}, repeated {r:.4f}, "
                        f"second copy ~{2 * r - s:.4f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
