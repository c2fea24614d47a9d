"""Routing vs all-local vs full attention: held-out bits/byte on the bundled KJV corpus.

Three decoders that differ only in their attention, all ``RoutingTransformerLM`` (the
``routing`` family) of the same width, depth, heads and feed-forward:

- routing: 2 local heads (exact causal window w) + 2 routed heads (strictly causal
  sorted-window routing: a query sees the w latest keys of its k-means cluster);
- all-local: every head local, the same window w;
- full: every head local with the window = the sequence length, i.e. full causal attention.

Byte-level (see ``kjv_pipeline``), same database, steps, batch, schedule and seed; each
model through ``retrolm.train.train`` and ``retrolm eval`` (sliding windows, stride half
the window). Issue 6's target: routing <= all-local in bits/byte.

  python -m benchmarks.quality.quality_routing [--steps 3000] [--seed 0] [--work DIR]

3000 steps (the default) is where routing overtakes all-local on this corpus; at 250 and
1000 steps all-local is ahead (history/routing.md).
"""

from __future__ import annotations

from benchmarks.quality import kjv_pipeline


def decoder(local_heads: int, full: bool = False):
    def config(a) -> dict:
        window = dict(local_attn_window_size=a.seq_len) if full else {}
        return dict(
            dim=128, depth=3, heads=4, dim_head=32, causal=True, max_seq_len=a.seq_len,
            window_size=a.window, n_local_attn_heads=local_heads, **window,
        )  # fmt: skip

    return config


MODELS = {
    "routing (2 local + 2 routed)": decoder(2),
    "all-local (4 local)": decoder(4),
    "full attention": decoder(4, full=True),
}

if __name__ == "__main__":
    kjv_pipeline.compare(
        __doc__, "routing", MODELS, steps=3000, seq_len=1024, window=64,
        work_name="retrolm-q-routing",
    )  # fmt: skip
