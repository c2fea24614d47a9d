"""Configuration of the Routing Transformer family (Roy et al., TACL 2021, arXiv 2003.05997).

One typed dataclass; the seed's keyword constructors (``RoutingTransformerLM(...)``,
``RoutingTransformer(...)``) are thin layers over it. Every field has an effect; the
docstring of each field is its CLI help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from retrolm.config import ConfigBase, require_positive_ints

ROUTING_MODES = ("auto", "sorted", "balanced")


@dataclass
class RoutingConfig(ConfigBase):
    family: ClassVar[str] = "routing"
    transient_fields: ClassVar[tuple[str, ...]] = ("extra",)

    dim: int = 256
    """Width of the residual stream."""
    depth: int = 4
    """Number of (attention, feed-forward) layers."""
    max_seq_len: int = 1024
    """Longest sequence; the number of k-means clusters is ``max_seq_len // window_size``."""
    num_tokens: int | None = 256
    """Vocabulary size (None: a bare transformer over embeddings, no token embedding)."""
    heads: int = 8
    """Attention heads per layer, local plus routed."""
    dim_head: int | None = None
    """Per-head width (None: 64 for the LM, ``dim // heads`` for the bare transformer)."""
    window_size: int = 64
    """Routed heads: a query sees at most this many keys of its cluster."""
    local_attn_window_size: int | None = None
    """Local heads: exact causal sliding window (None: ``window_size``)."""
    n_local_attn_heads: int | tuple[int, ...] = 0
    """Heads per layer that use local attention (an int, or one value per layer)."""
    causal: bool = False
    """Autoregressive masking (the LM default is strict causal sorted-window routing)."""
    routing: str = "auto"
    """``sorted`` (per-token routing, sliding window in (cluster, position) order: strictly
    causal), ``balanced`` (the reference's top-k tokens per centroid: leaks future tokens when
    causal), or ``auto`` (sorted)."""
    allow_future_leak: bool = False
    """Required to use ``balanced`` routing with ``causal=True``: it is NOT causal (tokens after
    a position change which earlier keys it sees). Documented, opt-in, for comparison only."""
    shared_qk: bool | None = None
    """Routed heads share one projection for queries and keys (None: same as ``causal``)."""
    num_mem_kv: int = 0
    """Learned memory key/values per routed head that every query may attend (at least 1 is
    used where a query could otherwise see no key: unshared q/k, balanced or cross routing)."""
    emb_dim: int | None = None
    """Token embedding width (None: ``dim``); projected in and out when different."""
    tie_embedding: bool = False
    """Logits are ``h @ E^T`` with the token embedding E."""
    weight_tie: bool = False
    """Every layer reuses the first layer's modules (ALBERT-style)."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities."""
    attn_layer_dropout: float = 0.0
    """Dropout on the attention sub-layer's output."""
    ff_dropout: float = 0.0
    """Dropout inside the feed-forward."""
    layer_dropout: float = 0.0
    """LayerDrop: probability of skipping a whole layer in training (one always runs)."""
    ff_mult: float = 4.0
    """Feed-forward expansion factor."""
    ff_glu: bool = False
    """GLU feed-forward."""
    ff_activation: str = "gelu"
    """Feed-forward activation: gelu, relu or silu."""
    ff_chunks: int = 1
    """Compute the feed-forward in this many sequence chunks (less activation memory)."""
    reversible: bool = False
    """Reversible layers (activations recomputed in backward)."""
    pkm_layers: tuple[int, ...] = ()
    """1-indexed layers whose feed-forward is a product-key memory."""
    pkm_num_keys: int = 128
    """Sub-keys per half of each product-key memory (``pkm_num_keys**2`` slots)."""
    moe_layers: tuple[int, ...] = ()
    """1-indexed layers whose feed-forward is a mixture of experts (MoE wins over PKM)."""
    moe_num_experts: int = 4
    """Experts per MoE layer."""
    moe_loss_coef: float = 1e-2
    """Weight of the MoE load-balancing loss (part of ``aux_loss``)."""
    use_scale_norm: bool = False
    """ScaleNorm instead of LayerNorm in the pre-norm residuals."""
    use_rezero: bool = False
    """ReZero residuals (no norm, learned gate from 0) instead of pre-norm."""
    shift_tokens: bool = False
    """Token shift before every sub-layer (half the features from the previous position)."""
    kmeans_ema_decay: float = 0.999
    """EMA decay of the k-means counts and sums."""
    commitment_factor: float = 1e-4
    """Weight of the k-means commitment loss (part of ``aux_loss``)."""
    receives_context: bool = False
    """Decoder of an encoder-decoder: a routed cross-attention + feed-forward per layer."""
    return_embeddings: bool = False
    """The LM returns final hidden states instead of logits."""
    register_kmeans_update: bool = True
    """Update the centroids automatically after each backward (else ``update_kmeans()``)."""
    rotary_base: float = 10000.0
    """Base of the rotary position embedding used by every head."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Unused; reserved so configs from newer versions still load (must stay empty)."""

    def __post_init__(self) -> None:
        require_positive_ints(
            self, ("dim", "depth", "max_seq_len", "heads", "window_size", "ff_chunks")
        )
        if self.max_seq_len % self.window_size:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be divisible by window_size "
                f"({self.window_size}): the number of clusters is their ratio"
            )
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.routing == "balanced" and self.causal and not self.allow_future_leak:
            raise ValueError(
                "routing='balanced' with causal=True lets future tokens choose which past keys "
                "a query sees (not causal); pass allow_future_leak=True to use it anyway"
            )
        if isinstance(self.n_local_attn_heads, list):
            self.n_local_attn_heads = tuple(self.n_local_attn_heads)
        locs = self.local_heads_per_layer()
        for h in locs:
            if not 0 <= h <= self.heads:
                raise ValueError(
                    f"n_local_attn_heads entries must be in [0, heads={self.heads}], got {h}"
                )
        if self.weight_tie and len(set(locs)) > 1:
            raise ValueError(
                f"weight_tie needs the same n_local_attn_heads in every layer, got {locs}"
            )
        for name in ("pkm_layers", "moe_layers"):
            v = tuple(getattr(self, name))
            setattr(self, name, v)
            bad = [i for i in v if not isinstance(i, int) or not 1 <= i <= self.depth]
            if bad:
                raise ValueError(
                    f"{name} are 1-indexed layers in [1, depth={self.depth}], got {bad}"
                )
        for name in ("attn_dropout", "attn_layer_dropout", "ff_dropout", "layer_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if not 0.0 <= self.kmeans_ema_decay < 1.0:
            raise ValueError(f"kmeans_ema_decay must be in [0, 1), got {self.kmeans_ema_decay}")
        if self.commitment_factor < 0 or self.moe_loss_coef < 0:
            raise ValueError("commitment_factor and moe_loss_coef must be >= 0")
        if self.use_rezero and self.use_scale_norm:
            raise ValueError(
                "use_rezero replaces the norm; it cannot be combined with use_scale_norm"
            )
        if (
            self.num_mem_kv < 0
            or self.ff_mult <= 0
            or self.pkm_num_keys < 1
            or self.moe_num_experts < 1
        ):
            raise ValueError(
                "num_mem_kv must be >= 0, ff_mult > 0, pkm_num_keys and moe_num_experts >= 1; got "
                f"{self.num_mem_kv}, {self.ff_mult}, {self.pkm_num_keys}, {self.moe_num_experts}"
            )
        if self.local_attn_window_size is not None and self.local_attn_window_size < 1:
            raise ValueError(
                f"local_attn_window_size must be >= 1, got {self.local_attn_window_size}"
            )
        if self.extra:
            raise ValueError(f"unknown routing options {sorted(self.extra)}")

    # --- derived values ------------------------------------------------------------------
    def local_heads_per_layer(self) -> tuple[int, ...]:
        v = self.n_local_attn_heads
        if isinstance(v, int):
            return (v,) * self.depth
        if len(v) != self.depth:
            raise ValueError(f"n_local_attn_heads has {len(v)} entries for depth {self.depth}")
        return tuple(v)

    @property
    def num_clusters(self) -> int:
        return self.max_seq_len // self.window_size

    @property
    def head_dim(self) -> int:
        if self.dim_head is not None:
            return self.dim_head
        return 64 if self.num_tokens is not None else self.dim // self.heads

    @property
    def is_shared_qk(self) -> bool:
        return self.causal if self.shared_qk is None else self.shared_qk

    @property
    def routing_mode(self) -> str:
        return "sorted" if self.routing == "auto" else self.routing

    @property
    def local_window(self) -> int:
        return self.local_attn_window_size or self.window_size

    # --- (de)serialisation and presets ---------------------------------------------------


# the config of the side-by-side benchmark (shared/bench/bench_routing.py)
_BENCH = dict(
    num_tokens=256,
    dim=256,
    depth=4,
    heads=4,
    max_seq_len=4096,
    window_size=128,
    n_local_attn_heads=2,
    causal=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests and smoke runs
    "routing-tiny": dict(_BENCH, dim=64, depth=2, dim_head=16, max_seq_len=256, window_size=32),
    "routing-bench": _BENCH,
    # the paper's enwik8 configuration (12 layers, 4 routed + 4 local heads, 16 x 512)
    "routing-enwik8": dict(
        _BENCH, dim=512, depth=12, heads=8, max_seq_len=8192, window_size=512, n_local_attn_heads=4
    ),
}


RoutingConfig.presets = PRESETS
