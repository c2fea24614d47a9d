"""RETRO configuration: one typed dataclass, validated, with named presets.

Paper defaults (Borgeaud et al. 2022, §2.5 and Table 10) where the seed API is silent:
chunked cross-attention (CCA) every 3rd decoder layer starting at layer 6 (9 for decoders
deeper than 15 layers), encoder cross-attention in encoder layer 1 only, RMSNorm, 2 encoder
layers. Layer indices are 1-based, as in the paper and the seed API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from retrolm.config import ConfigBase, require_positive_ints
from retrolm.nn.norms import NORMS


def paper_cca_layers(dec_depth: int) -> tuple[int, ...]:
    """Every 3rd layer from 6 (from 9 when depth > 15); the last layer for shallow decoders."""
    start = 6 if dec_depth <= 15 else 9
    layers = tuple(range(start, dec_depth + 1, 3))
    return layers or (dec_depth,)


@dataclass
class RetroConfig(ConfigBase):
    family: ClassVar[str] = "RETRO"

    # vocabulary and geometry
    num_tokens: int = 28996
    """Vocabulary size of the LM tokenizer (28996 = the seed's BERT-cased default)."""
    chunk_size: int = 64
    """m: tokens per retrieval chunk; neighbours are 2m tokens (chunk + continuation)."""
    max_seq_len: int = 2048
    """n: longest sequence the decoder accepts; must be a multiple of chunk_size."""
    pad_id: int = 0
    """Padding token: masked inside neighbours and ignored as a training label."""

    # decoder
    dec_dim: int = 768
    """Decoder width."""
    dec_depth: int = 12
    """Number of decoder layers."""
    dec_cross_attn_layers: tuple[int, ...] | None = None
    """1-based decoder layers with chunked cross-attention; None = paper rule."""
    dec_attn_dropout: float = 0.0
    """Dropout on decoder attention weights (self and chunked cross-attention)."""
    dec_ff_dropout: float = 0.0
    """Dropout inside decoder feed-forward layers."""

    # retrieval encoder
    enc_dim: int = 896
    """Encoder width (896 in every paper model)."""
    enc_depth: int = 2
    """Number of encoder layers."""
    enc_cross_attn_layers: tuple[int, ...] | None = None
    """1-based encoder layers that cross-attend to the decoder's chunk states; None = (1,)."""
    enc_attn_dropout: float = 0.0
    """Dropout on encoder attention weights."""
    enc_ff_dropout: float = 0.0
    """Dropout inside encoder feed-forward layers."""

    # shared
    heads: int = 8
    """Attention heads (decoder and encoder)."""
    dim_head: int = 64
    """Width of each attention head."""
    ff_mult: float = 4.0
    """Feed-forward hidden width as a multiple of the model width."""
    ff_glu: bool = False
    """Gated (GEGLU) feed-forward instead of a GELU MLP."""
    rotary_dim: int | None = None
    """Channels per head that carry rotary positions; None = all of dim_head."""
    norm: str = "rms"
    """Normalisation: rms (paper), layer or scale."""
    use_deepnet: bool = False
    """Post-norm residuals with DeepNet scaling and initialisation (arXiv 2203.00555)."""
    tie_embeddings: bool = False
    """Share the decoder's input embedding with its output projection."""
    share_embeddings: bool = False
    """The encoder reuses the decoder's token embedding (needs enc_dim == dec_dim); the paper
    found no difference (App. B.1.4: 0.823 vs 0.822 bpb) and it saves vocab x dim weights."""

    copy_head: bool = False
    """Add the neighbour copy head (``retrolm.models.retro.copy_head``; not in the paper): the next
    token may be copied from a retrieved neighbour where the latest tokens match it there."""
    copy_max_match: int = 12
    """Longest match (in tokens) the copy head measures; longer matches count as this long."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Free-form metadata carried with checkpoints (not used by the model)."""

    def __post_init__(self) -> None:
        if self.dec_cross_attn_layers is None:
            self.dec_cross_attn_layers = paper_cca_layers(self.dec_depth)
        if self.enc_cross_attn_layers is None:
            self.enc_cross_attn_layers = (1,)
        self.dec_cross_attn_layers = _layers(
            "dec_cross_attn_layers", self.dec_cross_attn_layers, self.dec_depth
        )
        self.enc_cross_attn_layers = _layers(
            "enc_cross_attn_layers", self.enc_cross_attn_layers, self.enc_depth, allow_empty=True
        )
        require_positive_ints(
            self,
            (
                "num_tokens",
                "chunk_size",
                "max_seq_len",
                "dec_dim",
                "dec_depth",
                "enc_dim",
                "enc_depth",
                "heads",
                "dim_head",
            ),
        )
        if self.max_seq_len % self.chunk_size:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be a multiple of chunk_size "
                f"({self.chunk_size})"
            )
        if not 0 <= self.pad_id < self.num_tokens:
            raise ValueError(f"pad_id ({self.pad_id}) must be a token id in [0, {self.num_tokens})")
        if self.share_embeddings and self.enc_dim != self.dec_dim:
            raise ValueError(
                f"share_embeddings needs enc_dim == dec_dim, got {self.enc_dim} and {self.dec_dim}"
            )
        if self.copy_max_match < 1:
            raise ValueError(f"copy_max_match must be >= 1, got {self.copy_max_match}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        rd = self.rotary_dim if self.rotary_dim is not None else self.dim_head
        if rd <= 0 or rd % 2 or rd > self.dim_head:
            raise ValueError(f"rotary_dim ({rd}) must be even and in (0, dim_head={self.dim_head}]")
        for name in ("dec_attn_dropout", "dec_ff_dropout", "enc_attn_dropout", "enc_ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def retrieved_len(self) -> int:
        """r = 2m: neighbour chunk plus its continuation."""
        return 2 * self.chunk_size

    @property
    def head_rotary_dim(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.dim_head


def _layers(name: str, layers, depth: int, allow_empty: bool = False) -> tuple[int, ...]:
    layers = tuple(int(x) for x in layers)
    if not layers and not allow_empty:
        raise ValueError(f"{name} is empty: RETRO needs at least one chunked cross-attention layer")
    bad = [x for x in layers if not 1 <= x <= depth]
    if bad:
        raise ValueError(
            f"{name} {layers}: layers are 1-based and must lie in [1, {depth}]; bad {bad}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} {layers} has duplicates")
    return tuple(sorted(layers))


# the demo on 2 CPU cores
_SMALL = dict(
    num_tokens=8192,
    chunk_size=64,
    max_seq_len=512,
    dec_dim=256,
    dec_depth=6,
    dec_cross_attn_layers=(3, 6),
    enc_dim=256,
    enc_depth=2,
    heads=4,
    dim_head=64,
)

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: tiny and fast
    "retro-tiny": dict(
        _SMALL,
        num_tokens=256,
        chunk_size=4,
        max_seq_len=32,
        dec_dim=32,
        dec_depth=3,
        dec_cross_attn_layers=(2, 3),
        enc_dim=32,
        heads=2,
        dim_head=16,
    ),  # fmt: skip
    "retro-small": _SMALL,
    # `retrolm demo` (num_tokens from the database's tokenizer): with the neighbour copy head
    # (not in the paper; copy_head.py): paper RETRO does not learn to read misaligned
    # parallels in the demo's budget (~0% gain, benchmarks/history/demo.md)
    "retro-demo": dict(
        chunk_size=64,
        max_seq_len=256,
        dec_dim=128,
        dec_depth=4,
        dec_cross_attn_layers=(2, 4),
        enc_dim=128,
        enc_depth=1,
        heads=4,
        dim_head=32,
        copy_head=True,
    ),  # fmt: skip
    # the benchmark configuration (issue 2): dec 256x6, enc 256x2, CCA (3, 6)
    "retro-bench": dict(_SMALL, num_tokens=28996, max_seq_len=2048),
    # the paper's smallest model (172M with retrieval; Table 2 / Table 10)
    "retro-172m": dict(
        num_tokens=128000,
        chunk_size=64,
        max_seq_len=2048,
        dec_dim=896,
        dec_depth=12,
        enc_dim=896,
        enc_depth=2,
        heads=16,
        dim_head=64,
    ),  # fmt: skip
}


RetroConfig.presets = PRESETS
