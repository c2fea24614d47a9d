"""Configuration of the Memorizing Transformer (Wu et al., ICLR 2022, arXiv 2203.08913).

One typed dataclass with the keyword names of ``memorizing-transformers-pytorch`` 0.4.1 (so
its users can port code) plus retrolm's own (``segment_len``, ``max_seq_len``, ``gate``, ...).
Layer numbers are 1-indexed, as in the reference; an invalid one raises ``ValueError``
(the reference drops it silently). The docstring of each field is its CLI help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from retrolm.config import ConfigBase

GATES = ("sigmoid", "joint_softmax")
KNN_BACKENDS = ("auto", "exact", "faiss")


@dataclass
class MemorizingConfig(ConfigBase):
    family: ClassVar[str] = "memorizing"
    transient_fields: ClassVar[tuple[str, ...]] = ("extra",)

    num_tokens: int = 256
    """Vocabulary size."""
    dim: int = 512
    """Width of the residual stream."""
    depth: int = 6
    """Number of (attention, feed-forward) layers."""
    dim_head: int = 64
    """Head width; also the width of each stored (key, value) pair (one shared K/V head)."""
    heads: int = 8
    """Query heads of the ordinary layers (keys and values are one shared head)."""
    knn_attn_heads: int | None = None
    """Query heads of the kNN layers (None: ``heads``)."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities."""
    ff_mult: float = 4.0
    """Feed-forward expansion factor (GELU MLP)."""
    ff_dropout: float = 0.0
    """Dropout inside the feed-forward."""
    memorizing_layers: tuple[int, ...] | None = None
    """1-indexed layers with kNN-augmented attention (None: ``(max(depth // 2, 1),)``)."""
    max_knn_memories: int = 250_000
    """kNN memory capacity per row and layer: a row keeps its last this many pairs (FIFO)."""
    num_retrieved_memories: int = 32
    """Pairs retrieved per query from the row's kNN memory (top-k by inner product)."""
    clear_memories_on_sos_token_id: int | None = None
    """A segment starting with this id clears its row's kNN and XL memories first (the id
    anywhere else in a segment is an error: documents start at segment boundaries)."""
    clear_memories_on_eos_token_id: int | None = None
    """A segment ending with this id clears its row's memories after it (elsewhere: error)."""
    knn_memories_directory: str | None = None
    """Keep the kNN pairs in memmap files in this folder (None: in RAM)."""
    shift_knn_memories_down: int = 0
    """kNN layer i reads the memory that the kNN layer this many above it (cyclically) writes."""
    pad_id: int | None = 0
    """Padding token: its keys are never attended (segment, XL or kNN memory); None: none.
    The loss ignores ``ignore_index``, never this id."""
    xl_max_memories: int = 0
    """Transformer-XL memory: the previous segments' last this many (key, value) pairs per
    layer, attended with the segment (0: off)."""
    xl_memory_layers: tuple[int, ...] | None = None
    """1-indexed layers with an XL memory (None: every layer)."""
    shift_xl_memories_down: int = 0
    """XL layer i reads the XL memory of the XL layer this many above it (cyclically)."""
    segment_len: int = 512
    """Tokens per segment: the unit after which memories are written (paper: 512)."""
    max_seq_len: int = 2048
    """Training window in tokens (split into segments; memories fresh per window)."""
    gate: str = "sigmoid"
    """``sigmoid``: the paper's learned per-head gate between memory and local attention;
    ``joint_softmax``: the reference's one softmax over [memory | local]."""
    gate_init: float = 0.0
    """Initial gate bias b (the memory weight is sigmoid(b))."""
    attn_scale_init: float = 20.0
    """kNN layers: initial temperature of the cosine-similarity logits (learned per head, in
    log space)."""
    knn_backend: str = "auto"
    """kNN search: ``exact`` (torch), ``faiss`` or ``auto`` (exact up to 65,536 pairs/row)."""
    ignore_index: int = -100
    """Label value the loss ignores."""
    rel_pos_buckets: int = 32
    """T5 relative position bias: number of buckets."""
    rel_pos_max_distance: int = 128
    """T5 relative position bias: distances beyond this share the last bucket."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Unused; must stay empty."""

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "dim_head", "heads", "segment_len"):
            self._positive(name)
        for name in ("max_seq_len", "max_knn_memories", "num_retrieved_memories"):
            self._positive(name)
        if self.knn_attn_heads is not None:
            self._positive("knn_attn_heads")
        for name in ("xl_max_memories", "shift_knn_memories_down", "shift_xl_memories_down"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.memorizing_layers is None:
            self.memorizing_layers = (max(self.depth // 2, 1),)
        if self.xl_memory_layers is None:
            self.xl_memory_layers = tuple(range(1, self.depth + 1))
        for name in ("memorizing_layers", "xl_memory_layers"):
            v = tuple(getattr(self, name))
            bad = [i for i in v if not isinstance(i, int) or not 1 <= i <= self.depth]
            if bad or len(set(v)) != len(v):
                raise ValueError(
                    f"{name} must be distinct 1-indexed layers in [1, depth={self.depth}], got {v}"
                )
            setattr(self, name, tuple(sorted(v)))
        for name in ("attn_dropout", "ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ff_mult <= 0 or self.attn_scale_init <= 0:
            raise ValueError(
                f"ff_mult and attn_scale_init must be > 0, got {self.ff_mult}, "
                f"{self.attn_scale_init}"
            )
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.knn_backend not in KNN_BACKENDS:
            raise ValueError(f"knn_backend must be one of {KNN_BACKENDS}, got {self.knn_backend!r}")
        if self.rel_pos_buckets < 2 or self.rel_pos_max_distance <= self.rel_pos_buckets // 2:
            raise ValueError(
                "rel_pos_buckets must be >= 2 and rel_pos_max_distance > rel_pos_buckets // 2, "
                f"got {self.rel_pos_buckets}, {self.rel_pos_max_distance}"
            )
        if self.extra:
            raise ValueError(f"unknown memorizing options {sorted(self.extra)}")

    def _positive(self, name: str) -> None:
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    # --- derived values ------------------------------------------------------------------
    @property
    def knn_heads(self) -> int:
        return self.knn_attn_heads or self.heads

    @property
    def xl_layers(self) -> tuple[int, ...]:
        """0-indexed layers with an XL memory (none when ``xl_max_memories`` is 0)."""
        return tuple(i - 1 for i in self.xl_memory_layers) if self.xl_max_memories else ()

    @property
    def knn_layers(self) -> tuple[int, ...]:
        """0-indexed kNN layers."""
        return tuple(i - 1 for i in self.memorizing_layers)


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: seconds on a CPU
    "memorizing-tiny": dict(
        num_tokens=256, dim=32, depth=2, heads=2, dim_head=16, memorizing_layers=(2,),
        max_knn_memories=64, num_retrieved_memories=4, segment_len=8, max_seq_len=32,
        xl_max_memories=8,
    ),
    # the demonstration (benchmarks/quality/quality_memorizing.py): minutes on a CPU
    "memorizing-small": dict(
        num_tokens=256, dim=128, depth=4, heads=4, dim_head=32, memorizing_layers=(3,),
        max_knn_memories=16_384, num_retrieved_memories=32, segment_len=128, max_seq_len=512,
        xl_max_memories=128,
    ),
    # the side-by-side benchmark with the reference (benchmarks/compare/bench_memorizing.py)
    "memorizing-bench": dict(
        num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, memorizing_layers=(3,),
        max_knn_memories=16_384, num_retrieved_memories=32, segment_len=512, max_seq_len=2048,
        xl_max_memories=512,
    ),
}  # fmt: skip

MemorizingConfig.presets = PRESETS
