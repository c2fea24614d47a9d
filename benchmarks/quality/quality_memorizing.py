"""Memorizing Transformer: held-out bits/byte with the kNN memory on vs off vs an XL-only
model, on the bundled KJV corpus.

Two models trained the same steps, batch, schedule and seed through ``retrolm.train.train``
(byte-level, see ``kjv_pipeline``): ``memorizing-small`` (kNN layer 3 of 4, XL 128, 16,384
memories, top-32, segments of 128, training windows of 512) and the same model with no kNN
layer (``memorizing_layers=()``: Transformer-XL only). ``retrolm eval`` streams each held-out
book whole through one cache (the family is ``streaming``): the memorizing model is scored
with its memory read (``memory``) and ignored (``no_memory``). Issue 21's target: ``memory``
at least 2% lower than both ``no_memory`` and the XL-only model.

  python -m benchmarks.quality.quality_memorizing [--steps 600] [--seed 0] [--work DIR]
"""

from __future__ import annotations

from benchmarks.quality import kjv_pipeline


def memorizing(knn: bool):
    def config(a) -> dict:
        from retrolm.models.memorizing.config import PRESETS

        cfg = dict(PRESETS["memorizing-small"], max_seq_len=a.seq_len)
        cfg.pop("num_tokens")  # the tokenizer's (258)
        return cfg if knn else dict(cfg, memorizing_layers=())

    return config


MODELS = {"memorizing-small": memorizing(True), "XL-only": memorizing(False)}

if __name__ == "__main__":
    kjv_pipeline.compare(
        __doc__, "memorizing", MODELS, steps=600, seq_len=512, work_name="retrolm-q-memorizing"
    )
