"""Configuration of Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143).

One typed dataclass; ``InfiniTransformer(num_tokens, dim, depth, ...)`` (the keyword API of
``infini-transformer-pytorch``) is a thin layer over it. Every field has an effect; its
docstring is its CLI help. ``__post_init__`` refuses bad values with a ``ValueError`` that
names the field, the value and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from retrolm.config import ConfigBase


@dataclass
class InfiniConfig(ConfigBase):
    family: ClassVar[str] = "infini"
    transient_fields: ClassVar[tuple[str, ...]] = ("extra",)

    num_tokens: int = 256
    """Vocabulary size."""
    dim: int = 256
    """Width of the residual stream."""
    depth: int = 4
    """Layers; every layer has its own compressive memory."""
    dim_head: int = 128
    """Per-head width; each head's memory is dim_head x dim_head (+ a dim_head normaliser)."""
    heads: int = 8
    """Attention heads per layer."""
    attn_dropout: float = 0.0
    """Dropout on the local attention probabilities."""
    ff_mult: float = 4.0
    """GEGLU feed-forward size: hidden width int(ff_mult * dim * 2 / 3)."""
    ff_dropout: float = 0.0
    """Dropout inside the feed-forward."""
    use_mem_delta_rule: bool = False
    """Delta-rule memory update (eq. 5): write only what the memory does not already return."""
    learned_delta_update: bool = False
    """A learned per-token, per-head write strength beta = sigmoid(W x) scales each write."""
    head_gate_init_value: float = 0.0
    """Initial gate g per head: out = sigmoid(g) local + (1 - sigmoid(g)) memory (0: 50/50)."""
    gate_lr_scale: float = 10.0
    """The gates' learning rate is this many times the base one (and they get no decay)."""
    segment_len: int = 128
    """Tokens per segment: local attention sees its segment, memory holds the earlier ones."""
    max_seq_len: int = 512
    """Training window in tokens (evaluation and generation stream past it)."""
    detach_mems_every_num_segments: int = 2
    """Truncated BPTT in training: gradients flow back through this many segments' memories."""
    rotary_base: float = 10000.0
    """Base of the rotary embedding of the local path (positions restart every segment)."""
    pad_id: int = 0
    """Token fed where a sequence is padding."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Unused; reserved so configs from newer versions still load (must stay empty)."""

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "dim_head", "heads", "segment_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_seq_len", "detach_mems_every_num_segments"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary pairs channels), got {self.dim_head}")
        for name in ("attn_dropout", "ff_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.ff_mult <= 0:
            raise ValueError(f"ff_mult must be > 0, got {self.ff_mult}")
        if self.gate_lr_scale <= 0:
            raise ValueError(f"gate_lr_scale must be > 0, got {self.gate_lr_scale}")
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base must be > 0, got {self.rotary_base}")
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(
                f"pad_id must be a token id in [0, num_tokens={self.num_tokens}), got {self.pad_id}"
            )
        if self.extra:
            raise ValueError(f"unknown infini options {sorted(self.extra)}")

    @property
    def ff_hidden(self) -> int:
        return max(1, int(self.ff_mult * self.dim * 2 / 3))


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests and smoke runs: seconds on a CPU
    "infini-tiny": dict(
        num_tokens=256, dim=32, depth=2, heads=2, dim_head=16, segment_len=16, max_seq_len=64,
    ),
    # the bundled-corpus benchmark (linear memory, eq. 4) and its delta-rule twin (eq. 5)
    "infini-small": dict(
        num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, segment_len=128, max_seq_len=512,
    ),
    "infini-small-delta": dict(
        num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, segment_len=128, max_seq_len=512,
        use_mem_delta_rule=True,
    ),
    # the side-by-side benchmark against infini-transformer-pytorch (segments of 512, 8 each)
    "infini-bench": dict(
        num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, segment_len=512,
        max_seq_len=4096, use_mem_delta_rule=True,
    ),
}  # fmt: skip

InfiniConfig.presets = PRESETS
