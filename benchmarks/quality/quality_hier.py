"""Hierarchical vs flat decoder of the same width on the bundled KJV corpus, byte-level.

Both are ``HierarchicalTransformer`` (the ``hierarchical`` family): the flat decoder has
one full-resolution stream with full causal attention, the hierarchical one adds streams
compressed 2x and 8x (windows 32 and 64 on the first two, full attention on the 8x one).
Same width (dim 128, depth 3, heads 4, dim_head 32), database, steps, batch, schedule and
seed; each through ``retrolm.train.train`` and ``retrolm eval`` (sliding windows, stride
half the window). See ``kjv_pipeline`` for the data.

  python -m benchmarks.quality.quality_hier [--steps 300] [--work DIR]
"""

from __future__ import annotations

from benchmarks.quality import kjv_pipeline

WIDTH = dict(dim=128, depth=3, heads=4, dim_head=32)
MODELS = {
    "flat": lambda a: dict(WIDTH, seq_len=a.seq_len),
    "hierarchical": lambda a: dict(
        WIDTH, seq_len=a.seq_len, hierarchies=(1, 2, 8), window_sizes=(32, 64, None)
    ),
}

if __name__ == "__main__":
    kjv_pipeline.compare(
        __doc__, "hierarchical", MODELS, steps=300, seq_len=512, work_name="retrolm-q-hier"
    )
