"""Configuration of the DeLighT family (Mehta et al., ICLR 2021) and of OpenELM's layer-wise
scaled blocks (Mehta et al., 2024), both built by ``DeLighTLM``.

One typed dataclass; ``DeLighTLM(num_tokens, dim, ...)`` is a thin constructor over it.
``block`` picks the block kind: ``"delight"`` (DExTra + single-head attention + light FFN,
depths and widths from block-wise scaling) or ``"openelm"`` (pre-RMSNorm GQA + SwiGLU with
heads and FFN widths from layer-wise scaling). Each kind's own options must stay at their
defaults under the other kind (an option set there would have no effect), and every value
is checked in ``__post_init__``: a ``ValueError`` names the field, the bad value and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from retrolm.config import ConfigBase
from retrolm.models.delight.dextra import GLT_GROUPS, NORM_TYPES
from retrolm.nn.scaling import BlockScale, LayerScale, depth_width_schedule

BLOCKS = ("delight", "openelm")
SCALINGS = ("block", "uniform")
POS_EMBS = ("sinusoidal", "learned", "rotary")

PRESETS: dict[str, dict[str, Any]] = {
    # tests and the CLI: seconds on a CPU
    "delight-tiny": dict(
        num_tokens=256, dim=32, min_depth=2, max_depth=3, width_mult=2.0, max_seq_len=128,
        emb_map_dim=16, dropout=0.0, attn_dropout=0.0,
    ),
    # the benchmark model (benchmarks/quality/quality_delight.py): minutes on 2 CPU cores.
    # Positions and output as the plain decoder it is compared with (rotary, untied), not the
    # paper's: with sinusoids added to the input, positions reach each block's attention only
    # through DExTra's norms and activations, and a block never learns position-based
    # attention at 256 positions in a CPU budget; the tied sqrt(d)-scaled lookup starts with
    # a ~sqrt(d) logit on the current token (loss 8.5 at init, ln 258 = 5.6). Both slow the
    # model far more than DExTra does (benchmarks/history/delight.md).
    "delight-small": dict(
        num_tokens=258, dim=128, min_depth=4, max_depth=8, width_mult=2.0, max_seq_len=256,
        dropout=0.0, attn_dropout=0.0, pos_emb="rotary", tie_embedding=False,
    ),
    # the same with the paper's sinusoids added to the input and the tied output
    "delight-small-paper": dict(
        num_tokens=258, dim=128, min_depth=4, max_depth=8, width_mult=2.0, max_seq_len=256,
        dropout=0.0, attn_dropout=0.0,
    ),
    "openelm-tiny": dict(
        block="openelm", num_tokens=256, dim=32, num_blocks=3, head_dim=8, max_seq_len=128,
        ffn_dim_divisor=16, dropout=0.0, attn_dropout=0.0,
    ),
    "openelm-small": dict(
        block="openelm", num_tokens=258, dim=128, num_blocks=4, head_dim=32, max_seq_len=256,
        ffn_dim_divisor=64, dropout=0.0, attn_dropout=0.0,
    ),
}  # fmt: skip

# options that belong to one block kind: set away from their default under the other kind
# they would do nothing, so they are refused
DELIGHT_ONLY = (
    "min_depth", "max_depth", "width_mult", "max_groups", "ffn_red", "scaling", "glt_groups",
    "glt_shuffle", "norm_type", "delight_dropout", "emb_map_dim", "pos_emb",
)  # fmt: skip
OPENELM_ONLY = (
    "head_dim", "qkv_multipliers", "ffn_multipliers", "num_gqa_groups", "ffn_dim_divisor",
    "normalize_qk_projections",
)  # fmt: skip


@dataclass
class DeLighTConfig(ConfigBase):
    family: ClassVar[str] = "delight"
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    num_tokens: int = 256
    """Vocabulary size."""
    dim: int = 256
    """Model width d_m (the residual stream)."""
    num_blocks: int | None = None
    """Blocks in the stack (None: ``max_depth``, as every DeLighT preset; required for
    ``block="openelm"``)."""
    min_depth: int = 4
    """DeLighT: DExTra depth N_min of the first block."""
    max_depth: int = 8
    """DeLighT: DExTra depth N_max of the last block."""
    width_mult: float = 2.0
    """DeLighT: DExTra width multiplier w_m of the first block (grows with the depth)."""
    max_groups: int | None = None
    """DeLighT: most GLT groups g_max, a power of two (None: 2^ceil(log2(d/32)))."""
    ffn_red: int = 4
    """DeLighT: light-FFN reduction r, hidden width dim / r."""
    scaling: str = "block"
    """DeLighT: ``block`` (depth and width grow from block to block) or ``uniform`` (every
    block the same; needs min_depth == max_depth)."""
    glt_groups: str = "paper"
    """DeLighT: GLT groups min(2^(l-1), g_max) (``paper``) or min(2^l, g_max)
    (``reference``: the authors' code, 2 groups first)."""
    glt_shuffle: bool = True
    """DeLighT: channel shuffle after every GLT."""
    norm_type: str = "ln"
    """DeLighT: norm of the blocks, DExTra and the final norm: ln, rms or scale."""
    act_type: str = "swish"
    """Activation: swish, gelu or relu (DeLighT: DExTra and the light FFN; OpenELM: the GLU
    gate, swish = SwiGLU)."""
    dropout: float = 0.1
    """Dropout on the residual branches and (one mask per sequence) on the input embeddings."""
    attn_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    delight_dropout: float = 0.0
    """DeLighT: dropout inside DExTra (and the DeFINE embedding's DExTra)."""
    emb_map_dim: int | None = None
    """DeLighT: DeFINE embedding, a lookup of this width (x sqrt(width)) then a DExTra to
    ``dim``; None: a plain lookup of width ``dim``."""
    pos_emb: str = "sinusoidal"
    """DeLighT: absolute positions added to the embeddings, ``sinusoidal`` (the paper) or
    ``learned``; or ``rotary``: queries and keys of each block's attention rotated instead
    (not in the paper; it learns attention far faster at a CPU budget, see
    benchmarks/history/delight.md). OpenELM always rotates."""
    max_seq_len: int = 512
    """Longest sequence (learned positions, the sinusoid table, generation's window)."""
    tie_embedding: bool = True
    """Logits from the input lookup table (after a dim -> emb_map_dim projection with
    DeFINE); False: a separate output matrix."""
    block: str = "delight"
    """Block kind: ``delight`` or ``openelm``."""
    head_dim: int = 64
    """OpenELM: width of one attention head (even: rotary)."""
    qkv_multipliers: float | tuple[float, ...] = (0.5, 1.0)
    """OpenELM: attention width multiplier alpha, (first, last) layer or one for all."""
    ffn_multipliers: float | tuple[float, ...] = (0.5, 4.0)
    """OpenELM: SwiGLU width multiplier beta, (first, last) layer or one for all."""
    num_gqa_groups: int = 1
    """OpenELM: query heads per key/value head."""
    ffn_dim_divisor: int = 256
    """OpenELM: FFN widths are rounded to a multiple of this."""
    normalize_qk_projections: bool = True
    """OpenELM: RMSNorm on every query and key head before the rotary."""
    ignore_index: int = -100
    """Label ignored by the loss (never a real token id such as 0)."""

    def __post_init__(self) -> None:
        for name in ("qkv_multipliers", "ffn_multipliers"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; choose one of {BLOCKS}")
        self._refuse_other_kind()
        for name in ("num_tokens", "dim", "max_seq_len"):
            _positive(name, getattr(self, name))
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        for name in ("dropout", "attn_dropout", "delight_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.act_type not in ("swish", "gelu", "relu"):
            raise ValueError(f"unknown act_type {self.act_type!r}; choose swish, gelu or relu")
        if self.block == "delight":
            self._check_delight()
        else:
            self._check_openelm()
        self.schedule()  # the schedule's own checks (depths, multipliers, divisors)

    def _refuse_other_kind(self) -> None:
        other = OPENELM_ONLY if self.block == "delight" else DELIGHT_ONLY
        defaults = {f.name: f.default for f in fields(self)}
        changed = [n for n in other if getattr(self, n) != defaults[n]]
        if changed:
            kind = "openelm" if self.block == "delight" else "delight"
            raise ValueError(
                f"{', '.join(f'{n}={getattr(self, n)!r}' for n in changed)}: only for "
                f"block={kind!r}, not block={self.block!r}; drop it or set block={kind!r}"
            )

    def _check_delight(self) -> None:
        if not 1 <= self.min_depth <= self.max_depth:
            raise ValueError(
                f"need 1 <= min_depth <= max_depth, got min_depth={self.min_depth}, "
                f"max_depth={self.max_depth}"
            )
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; choose one of {SCALINGS}")
        if self.glt_groups not in GLT_GROUPS:
            raise ValueError(f"unknown glt_groups {self.glt_groups!r}; choose one of {GLT_GROUPS}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(
                f"unknown norm_type {self.norm_type!r}; choose one of {list(NORM_TYPES)}"
            )
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"unknown pos_emb {self.pos_emb!r}; choose one of {POS_EMBS}")
        if self.pos_emb == "rotary" and self.dim % 4:
            raise ValueError(
                f"pos_emb='rotary' rotates the dim/2-wide attention in pairs: dim must be a "
                f"multiple of 4, got {self.dim}"
            )
        if self.dim % 2:
            raise ValueError(f"dim must be even (attention is dim/2 wide), got {self.dim}")
        if self.ffn_red < 1 or self.dim % self.ffn_red:
            raise ValueError(f"ffn_red={self.ffn_red} must be >= 1 and divide dim={self.dim}")
        if self.emb_map_dim is not None and (self.emb_map_dim < 2 or self.emb_map_dim % 2):
            raise ValueError(f"emb_map_dim must be None or even and >= 2, got {self.emb_map_dim}")

    def _check_openelm(self) -> None:
        if self.num_blocks is None:
            raise ValueError("block='openelm' needs num_blocks (the number of layers)")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 (rotary), got {self.head_dim}")

    @property
    def depth(self) -> int:
        """The number of blocks: ``num_blocks``, or ``max_depth`` when it is None."""
        return self.max_depth if self.num_blocks is None else self.num_blocks

    def schedule(self) -> list[BlockScale] | list[LayerScale]:
        """Per-block scales: ``nn.BlockScale`` (DExTra depth, width multiplier) for DeLighT,
        ``nn.LayerScale`` (query heads, key/value heads, FFN width) for OpenELM."""
        if self.block == "openelm":
            return depth_width_schedule(
                "openelm",
                self.depth,
                model_dim=self.dim,
                head_dim=self.head_dim,
                qkv_multipliers=self.qkv_multipliers,
                ffn_multipliers=self.ffn_multipliers,
                num_gqa_groups=self.num_gqa_groups,
                ffn_dim_divisor=self.ffn_dim_divisor,
            )
        return depth_width_schedule(
            self.scaling,
            self.depth,
            min_depth=self.min_depth,
            max_depth=self.max_depth,
            width_mult=self.width_mult,
        )


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
