"""Memorizing Transformer: held-out bits/byte with the kNN memory on vs off vs an XL-only
model, on the bundled KJV corpus.

Two models trained the same steps, batch, schedule and seed through ``retrolm.train.train``
(byte-level, see ``kjv_pipeline``): ``memorizing-small`` (kNN layer 3 of 4, XL 128, 16,384
memories, top-32, segments of 128, training windows of 512) and the same model with no kNN
layer (``memorizing_layers=()``: Transformer-XL only). ``retrolm eval`` streams each held-out
book whole through one cache (the family is ``streaming``): the memorizing model is scored
with its memory read (``memory``) and ignored (``no_memory``). Issue 21's target: ``memory``
at least 2% lower than both ``no_memory`` and the XL-only model.

``--knn NAME=VALUE`` (repeatable) overrides an option of the memorizing model only (e.g.
``gate_init=-2``, ``num_retrieved_memories=8``): options the XL-only model does not have.
``--seq-len`` is the training window (``max_seq_len``) of both.

  python -m benchmarks.quality.quality_memorizing [--steps 600] [--seed 0] [--work DIR]
      [--batch 4] [--seq-len 512] [--knn NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import ast
import sys

from benchmarks.quality import kjv_pipeline

KNN_OVERRIDES: dict = {}


def memorizing(knn: bool):
    def config(a) -> dict:
        from retrolm.models.memorizing.config import PRESETS

        cfg = dict(PRESETS["memorizing-small"], max_seq_len=a.seq_len)
        cfg.pop("num_tokens")  # the tokenizer's (258)
        return dict(cfg, **KNN_OVERRIDES) if knn else dict(cfg, memorizing_layers=())

    return config


MODELS = {"memorizing-small": memorizing(True), "XL-only": memorizing(False)}


def knn_overrides(argv: list[str]) -> list[str]:
    """Takes the ``--knn NAME=VALUE`` options out of ``argv`` into ``KNN_OVERRIDES``."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--knn", action="append", default=[])
    known, rest = ap.parse_known_args(argv)
    for item in known.knn:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--knn wants NAME=VALUE, got {item!r}")
        KNN_OVERRIDES[name] = ast.literal_eval(value)
    return rest


if __name__ == "__main__":
    sys.argv[1:] = knn_overrides(sys.argv[1:])
    if KNN_OVERRIDES:
        print(f"memorizing model options: {KNN_OVERRIDES}", flush=True)
    kjv_pipeline.compare(
        __doc__, "memorizing", MODELS, steps=600, seq_len=512, work_name="retrolm-q-memorizing"
    )
