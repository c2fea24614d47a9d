"""Routing Transformer (Roy, Saffar, Vaswani, Grangier: "Efficient Content-Based Sparse
Attention with Routing Transformers", TACL 2021, arXiv 2003.05997).

The idea: some heads attend only among tokens whose queries/keys fall in the same k-means
cluster (content-based sparsity), the others attend a local window. Centroids are learned by
online spherical k-means (``nn.kmeans``), not by gradient.

retrolm's causal routing is strict (research/attention-anchors.md §1.6): every token is
routed on its own to its nearest centroid, and a query attends the ``window_size`` latest
keys of its cluster at positions <= its own (``nn.sorted_window``), so no future token can
change which keys it sees. The reference's balanced top-k routing (each centroid takes its
``window_size`` most similar tokens of the whole sequence) is ``routing="balanced"``; with
``causal=True`` it needs ``allow_future_leak=True`` because it leaks.

Notation: b batch, n positions, h heads (hl local + hr routed), d head dim, k clusters,
w window, m memory key/values.

Beside this file: ``attention.py`` (routing attention itself), ``cache.py`` (incremental
decoding: the cache and one cached routed step), ``balanced.py`` (the reference's balanced
routing), ``config.py``, ``encdec.py`` (the encoder-decoder), ``fused.py`` (the one-token
fast path).
"""

from __future__ import annotations

import logging
import weakref
from functools import partial

import torch
from torch import Tensor, nn

from retrolm.models.autoregressive import AutoregressiveWrapper
from retrolm.models.pretrained import PreTrainedMixin
from retrolm.models.routing import fused
from retrolm.models.routing.attention import RoutingAttention
from retrolm.models.routing.cache import RoutingCache
from retrolm.models.routing.config import RoutingConfig
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.kmeans import update_after_backward, update_kmeans
from retrolm.nn.layer_drop import layer_drop_keep
from retrolm.nn.moe import MixtureOfExperts
from retrolm.nn.norms import LayerNorm
from retrolm.nn.pkm import ProductKeyMemory, pkm_param_groups
from retrolm.nn.residual import Residual
from retrolm.nn.reversible import reversible
from retrolm.nn.rotary import RotaryEmbedding
from retrolm.nn.token_shift import TokenShift

log = logging.getLogger(__name__)

__all__ = [
    "RoutingAttention",
    "RoutingCache",
    "RoutingConfig",
    "RoutingLanguageModel",
    "RoutingTransformer",
    "RoutingTransformerLM",
    "pkm_param_groups",
]


# ---------------------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------------------
class _Sublayer(nn.Module):
    """One residual sub-layer (attention, cross-attention or feed-forward slot) that returns
    ``(x, aux)``; ``branch=True`` returns the branch alone (for reversible stacks). Outside
    a reversible stack a sub-layer without an auxiliary loss returns ``aux=None`` (no zero
    tensor to make and add per sub-layer and token)."""

    def __init__(self, cfg: RoutingConfig, fn: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.shift = cfg.shift_tokens
        if cfg.shift_tokens:
            shifts = (0, 1) if cfg.causal else (1, 0, -1)
            fn = TokenShift(fn, shifts, causal=cfg.causal)
        norm = "scale" if cfg.use_scale_norm else "layer"
        # attention and feed-forward read their input through projections first
        to_matmul = isinstance(fn, (RoutingAttention, FeedForward))
        self.residual = Residual(cfg.dim, fn, norm, rezero=cfg.use_rezero, norm_to_matmul=to_matmul)

    def forward(
        self,
        x,
        *,
        mask=None,
        rotary=None,
        cache=None,
        context=None,
        context_mask=None,
        branch=False,
        key="",
    ):
        kw: dict = {}
        if self.kind == "attn":
            kw = dict(input_mask=mask, rotary=rotary, cache=cache)
        elif self.kind == "cross":
            kw = dict(input_mask=mask, context=context, context_mask=context_mask)
        elif self.kind == "moe":
            kw = dict(mask=mask)
        if self.shift:
            kw["shift_mask"] = mask
            if cache is not None:
                kw["shift_state"] = cache.shift.setdefault(key, {})
        out = self.residual.branch(x, **kw) if branch else self.residual(x, **kw)
        if isinstance(out, tuple):
            return out
        return out, (x.new_zeros((), dtype=torch.float32) if branch else None)


def _ff_slot(cfg: RoutingConfig, layer: int) -> tuple[nn.Module, str]:
    if layer in cfg.moe_layers:
        return MixtureOfExperts(
            cfg.dim,
            cfg.moe_num_experts,
            loss_coef=cfg.moe_loss_coef,
            mult=cfg.ff_mult,
            glu=cfg.ff_glu,
            dropout=cfg.ff_dropout,
        ), "moe"
    if layer in cfg.pkm_layers:
        return ProductKeyMemory(cfg.dim, cfg.pkm_num_keys), "ff"
    return FeedForward(
        cfg.dim,
        cfg.ff_mult,
        glu=cfg.ff_glu,
        activation=cfg.ff_activation,
        dropout=cfg.ff_dropout,
        chunks=cfg.ff_chunks,
    ), "ff"


class RoutingTransformer(nn.Module):
    """The layer stack over embeddings: ``(x (b, n, dim), input_mask) -> (x, aux_loss)``.

    Seed keywords (``RoutingTransformer(dim, depth, max_seq_len, heads, window_size, ...)``)
    or ``RoutingTransformer(config=RoutingConfig(...))``.
    """

    def __init__(
        self,
        dim: int | None = None,
        depth: int | None = None,
        max_seq_len: int | None = None,
        *,
        config: RoutingConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if config is None:
            defaults = {"num_tokens": None, "register_kmeans_update": False}
            config = _config_from_kwargs(
                kwargs, defaults, dim=dim, depth=depth, max_seq_len=max_seq_len
            )
        self.config = cfg = config
        self.max_seq_len = cfg.max_seq_len
        self.rotary = RotaryEmbedding(cfg.head_dim, base=cfg.rotary_base)
        locs = cfg.local_heads_per_layer()
        layers = []
        for i in range(cfg.depth):
            if cfg.weight_tie and i > 0:
                layers.append(layers[0])
                continue
            ff, kind = _ff_slot(cfg, i + 1)
            subs = [
                _Sublayer(cfg, RoutingAttention(cfg, locs[i]), "attn"),
                _Sublayer(cfg, ff, kind),
            ]
            if cfg.receives_context:
                ff2, kind2 = _ff_slot(cfg, i + 1)
                subs += [
                    _Sublayer(cfg, RoutingAttention(cfg, 0, cross=True), "cross"),
                    _Sublayer(cfg, ff2, kind2),
                ]
            layers.append(nn.ModuleList(subs))
        self.layers = nn.ModuleList(layers)
        self._kmeans_hook = cfg.register_kmeans_update
        self._kmeans_scope: weakref.ref | None = None
        self._recompute = True  # False: plain autograd through the reversible equations (tests)

    # k-means bookkeeping -------------------------------------------------------------------
    def update_kmeans(self) -> None:
        """Apply the pending centroid updates (call after backward when the automatic update
        is off, ``register_kmeans_update=False``)."""
        update_kmeans(self)

    def register_kmeans_update(self) -> None:
        self._kmeans_hook = True

    def cancel_kmeans_update(self) -> None:
        self._kmeans_hook = False

    def _hook_scope(self) -> nn.Module:
        return (self._kmeans_scope() if self._kmeans_scope is not None else None) or self

    def forward(
        self,
        x: Tensor,  # (b, n, dim)
        input_mask: Tensor | None = None,  # (b, n) bool
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: RoutingCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        if cfg.receives_context and context is None:
            raise ValueError("this transformer receives_context: pass context=(b, m, dim)")
        n = x.shape[1]
        start = cache.length if cache is not None else 0
        if start + n > cfg.max_seq_len:
            raise ValueError(f"sequence length {start + n} exceeds max_seq_len={cfg.max_seq_len}")
        if self.training and self._kmeans_hook:
            x = update_after_backward(x, self._hook_scope())
        # rows of a cached cos/sin table; one tuple for every layer, so apply_rotary signs
        # its sin once (nn.rotary._signed_sin)
        rotary = self.rotary.span(start, n, x.device)
        kw = dict(mask=input_mask, rotary=rotary, context=context, context_mask=context_mask)
        keep = layer_drop_keep(cfg.depth, cfg.layer_dropout, self.training)
        aux = x.new_zeros((), dtype=torch.float32)
        if cfg.reversible and cache is None:
            pairs = [
                (subs[j], subs[j + 1])
                for i, subs in enumerate(self.layers)
                if keep[i]
                for j in range(0, len(subs), 2)
            ]
            branches = [(partial(f, branch=True), partial(g, branch=True)) for f, g in pairs]
            ctx = kw.pop("context")
            x, aux = reversible(x, branches, ctx, recompute=self._recompute, **kw)
        elif n == 1 and cache is not None and fused.step_ok(self, x, input_mask, cache):
            x, aux = fused.decode_step(self, x, rotary, cache)
        else:
            for i, subs in enumerate(self.layers):
                if not keep[i]:
                    continue
                lc = cache.layers[i] if cache is not None else None
                for j, sub in enumerate(subs):
                    x, a = sub(x, cache=lc, key=str(j), **kw)
                    if a is not None:
                        aux = aux + a
        if cache is not None:
            cache.length += n
        return x, aux


def _config_from_kwargs(kwargs: dict, defaults: dict | None = None, **given) -> RoutingConfig:
    """Seed keyword names -> RoutingConfig (``_register_kmeans_update`` is the seed's name):
    ``defaults``, then the positional arguments ``given`` that are not None, then ``kwargs``."""
    kw = {**(defaults or {}), **{k: v for k, v in given.items() if v is not None}, **kwargs}
    if "_register_kmeans_update" in kw:
        kw["register_kmeans_update"] = kw.pop("_register_kmeans_update")
    for dead in ("rel_pos_emb", "use_absolute_pos_emb"):
        if kw.pop(dead, None):
            log.warning(
                "%s is not an option of retrolm's routing transformer (rotary is always on)", dead
            )
    return RoutingConfig.from_dict(kw)


# RoutingTransformerLM's constructor is a signature twin of RoutingTransformer's (deliberate):
# both are seed APIs, taking seed keywords or a config
class RoutingTransformerLM(nn.Module):
    """Token embedding -> ``RoutingTransformer`` -> logits. ``model(x, input_mask=mask)``
    returns ``(logits (b, n, num_tokens), aux_loss scalar)``; ``aux_loss`` (commitment + MoE)
    must be added to the LM loss (``AutoregressiveWrapper`` does)."""

    # signature twin of RoutingTransformer.__init__ (deliberate): the seed's keyword
    # constructors, num_tokens first here; both go through _config_from_kwargs
    def __init__(
        self,
        num_tokens: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        max_seq_len: int | None = None,
        *,
        config: RoutingConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if config is None:
            config = _config_from_kwargs(
                kwargs, num_tokens=num_tokens, dim=dim, depth=depth, max_seq_len=max_seq_len
            )
        if config.num_tokens is None:
            raise ValueError("RoutingTransformerLM needs num_tokens")
        self.config = cfg = config
        self.max_seq_len = cfg.max_seq_len
        emb_dim = cfg.emb_dim or cfg.dim
        self.token_emb = nn.Embedding(cfg.num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        # ALBERT-style factorised embedding when emb_dim != dim
        self.proj_in = nn.Linear(emb_dim, cfg.dim) if emb_dim != cfg.dim else nn.Identity()
        self.proj_out = nn.Linear(cfg.dim, emb_dim) if emb_dim != cfg.dim else nn.Identity()
        self.transformer = RoutingTransformer(config=cfg)
        self.norm = LayerNorm(emb_dim)
        self.to_logits = None
        if not cfg.tie_embedding and not cfg.return_embeddings:
            self.to_logits = nn.Linear(emb_dim, cfg.num_tokens)

    def update_kmeans(self) -> None:
        update_kmeans(self)

    def register_kmeans_update(self) -> None:
        self.transformer.register_kmeans_update()

    def cancel_kmeans_update(self) -> None:
        self.transformer.cancel_kmeans_update()

    @torch.no_grad()
    def init_kmeans(self, x: Tensor, input_mask: Tensor | None = None) -> None:
        """Explicit centroid initialisation from a batch of tokens (b, n)."""
        was = self.training
        self.train()
        self(x, input_mask=input_mask)
        self.train(was)

    def init_cache(self, batch_size: int) -> RoutingCache | None:
        """KV cache for incremental decoding (sorted causal routing only; otherwise None,
        and generation recomputes the prefix)."""
        cfg = self.config
        if not cfg.causal or cfg.routing_mode != "sorted":
            return None
        return RoutingCache(cfg.depth)

    def forward(
        self,
        x: Tensor,  # (b, n) int
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: RoutingCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        h = self.proj_in(self.token_emb(x))
        h, aux = self.transformer(h, input_mask, context, context_mask, cache)
        h = self.norm(self.proj_out(h))
        if self.config.return_embeddings:
            return h, aux
        logits = self.to_logits(h) if self.to_logits is not None else h @ self.token_emb.weight.t()
        return logits, aux


class RoutingLanguageModel(PreTrainedMixin, AutoregressiveWrapper):
    """What ``retrolm train --model routing`` builds: the LM inside the shared wrapper, from a
    config (the model registry's contract: ``cls(config=cfg)``, ``model(seq,
    return_loss=True)``, ``model.config``)."""

    def __init__(self, config: RoutingConfig) -> None:
        if not config.causal:
            # trained on next-token loss, a non-causal model learns to read its targets
            raise ValueError(
                "the routing language model needs causal=True (got causal=False: every "
                'position would see the token it predicts); set "causal": true in model_config'
            )
        super().__init__(RoutingTransformerLM(config=config))
        self.config = config

    def init_cache(self, batch_size: int) -> RoutingCache | None:
        """The LM's decoding cache (None where its routing has none)."""
        return self.net.init_cache(batch_size)
