"""Configuration of the Simple Hierarchical Transformer (``retrolm.models.hierarchical``).

Every per-hierarchy option takes one value for all hierarchies or a tuple with one value
per hierarchy; ``__post_init__`` turns them into tuples and validates the whole config,
raising ``ValueError`` with the offending value and the rule it breaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from retrolm.config import ConfigBase, require_positive_ints
from retrolm.utils import is_power_of_two

PerHierarchy = Any  # a scalar, or a tuple with one value per hierarchy

PRESETS: dict[str, dict[str, Any]] = {
    # tests and the demo: seconds on a CPU
    "hier-tiny": dict(
        num_tokens=256, dim=32, depth=2, heads=2, dim_head=16, seq_len=128,
        hierarchies=(1, 2, 8), window_sizes=(16, 16, None),
    ),
    # the benchmark configuration (shared/bench/bench_hier.py)
    "hier-small": dict(
        num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, seq_len=1024,
        hierarchies=(1, 2, 8), window_sizes=(32, 64, None),
    ),
    # the same width as a plain full-attention decoder, the baseline for "hier-small"
    "flat-small": dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, seq_len=1024),
    # the seed README's "more complex" example: wider dims as the compression grows
    "hier-readme": dict(
        num_tokens=256, dim=(128, 256, 512, 1024), depth=8, seq_len=1024,
        ff_mult=(2, 2, 4, 4), dim_head=(16, 32, 64, 64), heads=(2, 4, 8, 8),
        hierarchies=(1, 2, 4, 16), hierarchical_stride=(1, 1, 1, 8),
        window_sizes=(16, 32, 64, None),
    ),
}  # fmt: skip

_PER_HIERARCHY = ("dim", "dim_head", "heads", "ff_mult", "window_sizes", "hierarchical_stride")


@dataclass
class HierarchicalConfig(ConfigBase):
    family: ClassVar[str] = "hierarchical"
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    num_tokens: int = 256
    """Vocabulary size."""
    dim: PerHierarchy = 256
    """Model width, per hierarchy or one for all; the token embedding is max(dim) wide."""
    depth: int = 4
    """Layers; each runs one block per hierarchy, then one merge."""
    seq_len: int = 2048
    """Longest input of a full forward; window sizes are checked against it."""
    dim_head: PerHierarchy = 64
    """Attention head width (even: rotary), per hierarchy or one for all."""
    heads: PerHierarchy = 8
    """Attention heads, per hierarchy or one for all."""
    ff_mult: PerHierarchy = 4
    """Feed-forward hidden width as a multiple of dim, per hierarchy or one for all."""
    hierarchies: int | tuple[int, ...] = 1
    """Compression factors, unique powers of 2; 1 is the full-resolution stream."""
    window_sizes: PerHierarchy = None
    """Per hierarchy: None = full causal attention, w = causal sliding window of w tokens in
    that hierarchy's units, 0 = no attention (token shift and feed-forward only)."""
    hierarchical_stride: PerHierarchy = 1
    """Compression stride per hierarchy, a power of 2 <= its factor; with stride s a new
    compressed token appears every s positions and is repeated s times in the merge."""
    hierarchy_merge_all: bool = False
    """Add the merge result to every hierarchy, not only to the predicting one."""
    predict_hierarchy: int | None = None
    """Factor of the hierarchy that predicts the next token (default: the smallest)."""
    predict_use_all_hierarchy: bool = False
    """Predict from the concatenation of every hierarchy's final embedding."""
    recon_loss_weight: float = 0.1
    """Weight of the loss where each compressed token reconstructs the tokens it covers;
    0 removes those heads."""
    hierarchical_ar_loss_weight: float = 0.25
    """Weight of the loss where each compressed token predicts the next one (1 - cosine);
    0 removes those heads and skips the computation."""
    detach_ar_target: bool = True
    """Stop the gradient through the AR target (False restores the reference behaviour,
    which can lower that loss by collapsing the compressed embeddings)."""
    ignore_index: int = -100
    """Label ignored by the losses (never a real token id such as 0)."""
    use_flash_attn: bool = True
    """True: attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels where the device has them, the fused CPU kernel otherwise). False: the plain
    einsum reference path (slower, for debugging or comparison). The seed defaults to False;
    both compute the same attention, so the fast path is the default here."""

    def __post_init__(self) -> None:
        if isinstance(self.hierarchies, list | tuple):
            self.hierarchies = tuple(self.hierarchies)
        else:
            self.hierarchies = (self.hierarchies,)
        hs = self.hierarchies
        if not all(is_power_of_two(h) for h in hs) or len(set(hs)) != len(hs):
            raise ValueError(f"hierarchies must be unique powers of 2, got {hs}")
        for name in _PER_HIERARCHY:
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                if len(value) != len(hs):
                    raise ValueError(
                        f"{name}={tuple(value)} has {len(value)} values but there are "
                        f"{len(hs)} hierarchies {hs}; give one value per hierarchy or one value"
                    )
                value = tuple(value)
            else:
                value = (value,) * len(hs)
            setattr(self, name, value)
        self._validate()

    def _validate(self) -> None:
        hs = self.hierarchies
        require_positive_ints(self, ("num_tokens", "depth", "seq_len"))
        for name in ("dim", "dim_head", "heads"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive ints, got {getattr(self, name)}")
        if any(d % 2 for d in self.dim_head):
            raise ValueError(f"dim_head must be even (rotary pairs channels), got {self.dim_head}")
        if any(m <= 0 for m in self.ff_mult):
            raise ValueError(f"ff_mult must be > 0, got {self.ff_mult}")
        for h, s in zip(hs, self.hierarchical_stride):
            if not is_power_of_two(s) or s > h:
                raise ValueError(
                    f"hierarchical_stride={s} for hierarchy {h} must be a power of 2 <= {h}"
                )
        for h, w in zip(hs, self.window_sizes):
            length = math.ceil(self.seq_len / h)
            if w is not None and (not isinstance(w, int) or w < 0):
                raise ValueError(f"window size {w!r} for hierarchy {h} must be None, 0 or > 0")
            if w is not None and w > length:
                raise ValueError(
                    f"window size {w} for hierarchy {h} is larger than that hierarchy's length "
                    f"ceil(seq_len / {h}) = {length}; use at most {length}, or None for full "
                    "attention"
                )
        if self.predict_hierarchy is not None and self.predict_hierarchy not in hs:
            raise ValueError(
                f"predict_hierarchy={self.predict_hierarchy} is not one of the hierarchies {hs}"
            )
        if not self.hierarchy_merge_all and self.hierarchical_stride[self.predict_index] != 1:
            raise ValueError(
                f"the predicting hierarchy {hs[self.predict_index]} has stride "
                f"{self.hierarchical_stride[self.predict_index]}; it must have stride 1 unless "
                "hierarchy_merge_all=True"
            )
        if len(hs) == 1 and (self.hierarchy_merge_all or self.predict_use_all_hierarchy):
            raise ValueError(
                "hierarchy_merge_all and predict_use_all_hierarchy need at least two "
                f"hierarchies, got hierarchies={hs}"
            )
        for name in ("recon_loss_weight", "hierarchical_ar_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def predict_index(self) -> int:
        """Index (not factor) of the hierarchy whose tokens give the logits."""
        if self.predict_hierarchy is None:
            return self.hierarchies.index(min(self.hierarchies))
        return self.hierarchies.index(self.predict_hierarchy)

    @property
    def max_seq_len(self) -> int:
        """``seq_len`` under the name the trainer, evaluation and generation read."""
        return self.seq_len

    @property
    def num_hierarchies(self) -> int:
        return len(self.hierarchies)
