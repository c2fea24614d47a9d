"""RETRO-fit configuration: which base, where chunked cross-attention goes, and the size of
the new neighbour encoder and CCA layers (RETRO paper §4.4: a frozen pretrained decoder,
only the encoder and the CCA layers trained).

The decoder's sizes (width, depth, vocabulary) are the base's: ``retro_config`` turns this
config and a base into the ``RetroConfig`` that RETRO's own ``ChunkedCrossAttention`` and
``RetroEncoder`` are built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from retrolm.config import ConfigBase, require_positive_ints
from retrolm.models.retro.config import RetroConfig, paper_cca_layers
from retrolm.nn.norms import NORMS


@dataclass
class RetrofitConfig(ConfigBase):
    family: ClassVar[str] = "RETRO-fit"

    base: str = ""
    """The frozen decoder: a retrolm run trained without retrieval, or a local Hugging Face
    causal-LM folder (``config.json`` + weights + ``tokenizer.json``)."""
    base_hash: str | None = None
    """sha256 of the base's weights and config when the model was made: loading refuses a
    base that changed since (None: not checked, set by ``retrofit``)."""
    cca_layers: tuple[int, ...] | None = None
    """1-based base layers that chunked cross-attention follows; None = the paper's rule
    (every 3rd from layer 6, or the last layer of a shallow base)."""
    unfreeze: tuple[str, ...] = ()
    """Base parameters trained too (names or name prefixes, e.g. ``final_norm``); the
    rest of the base stays frozen."""
    chunk_size: int = 64
    """m: tokens per retrieval chunk (the database's)."""
    max_seq_len: int = 2048
    """Longest sequence; capped at the base's context length, a multiple of chunk_size."""
    pad_id: int = 0
    """The database tokenizer's padding id (masked in neighbours, ignored as a label)."""
    num_tokens: int | None = None
    """The tokenizer's vocabulary (from the database); checked against the base's."""
    enc_dim: int | None = None
    """Neighbour encoder width; None = the base's width (no projection of its embeddings)."""
    enc_depth: int = 2
    """Neighbour encoder layers."""
    heads: int | None = None
    """Attention heads of the encoder and CCA; None = width // dim_head."""
    dim_head: int = 64
    """Width of each attention head (capped at the base's width)."""
    ff_mult: float = 4.0
    """Encoder feed-forward width as a multiple of enc_dim."""
    norm: str = "rms"
    """Norm of the new layers (the CCA pre-norm and the encoder's)."""
    dropout: float = 0.0
    """Dropout in the new layers (CCA and encoder attention, encoder feed-forward)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Free-form metadata carried with checkpoints (not used by the model)."""

    def __post_init__(self) -> None:
        require_positive_ints(self, ("chunk_size", "max_seq_len", "enc_depth", "dim_head"))
        if self.max_seq_len % self.chunk_size:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be a multiple of chunk_size "
                f"({self.chunk_size})"
            )
        if self.cca_layers is not None:
            self.cca_layers = tuple(int(x) for x in self.cca_layers)
            if not self.cca_layers:
                raise ValueError("cca_layers is empty: RETRO-fit needs at least one CCA layer")
        self.unfreeze = tuple(str(x) for x in self.unfreeze)
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def retrieved_len(self) -> int:
        """r = 2m: neighbour chunk plus its continuation."""
        return 2 * self.chunk_size

    def layers_for(self, depth: int) -> tuple[int, ...]:
        """The CCA layers for a base of ``depth`` layers, checked."""
        layers = self.cca_layers or paper_cca_layers(depth)
        bad = [x for x in layers if not 1 <= x <= depth]
        if bad:
            raise ValueError(
                f"cca_layers {layers}: the base has {depth} layers (1-based); bad {bad}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"cca_layers {layers} has duplicates")
        return tuple(sorted(layers))

    def retro_config(self, width: int, depth: int, vocab: int) -> RetroConfig:
        """The RetroConfig of the new modules for a base of this width, depth, vocabulary."""
        dim_head = min(self.dim_head, width)
        heads = self.heads or max(1, width // dim_head)
        return RetroConfig(
            num_tokens=vocab,
            chunk_size=self.chunk_size,
            max_seq_len=self.max_seq_len,
            pad_id=self.pad_id,
            dec_dim=width,
            dec_depth=depth,
            dec_cross_attn_layers=self.layers_for(depth),
            dec_attn_dropout=self.dropout,
            enc_dim=self.enc_dim or width,
            enc_depth=self.enc_depth,
            enc_attn_dropout=self.dropout,
            enc_ff_dropout=self.dropout,
            heads=heads,
            dim_head=dim_head,
            ff_mult=self.ff_mult,
            norm=self.norm,
        )


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests
    "retrofit-tiny": dict(chunk_size=4, max_seq_len=32, enc_depth=1, dim_head=16),
    # the demo's decoder (retro-demo: 128 wide, 4 layers, 64-token chunks)
    "retrofit-demo": dict(chunk_size=64, max_seq_len=256, enc_depth=2, dim_head=32),
}

RetrofitConfig.presets = PRESETS
