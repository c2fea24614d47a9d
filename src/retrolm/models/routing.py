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

Beside this file: ``routing_cache`` (incremental decoding: the cache and one cached routed
step), ``routing_balanced`` (the reference's balanced routing), ``routing_config``,
``routing_encdec`` (the encoder-decoder).
"""

from __future__ import annotations

import logging
import weakref
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from retrolm.models.routing_balanced import balanced_attend
from retrolm.models.routing_cache import LayerCache, RoutingCache, routed_decode_step
from retrolm.models.routing_config import RoutingConfig
from retrolm.nn import fused_decode, fused_train
from retrolm.nn.attention import attend
from retrolm.nn.decode_linear import DecodeLinear, compute_dtype, concat_decode_weight, linear_t
from retrolm.nn.feedforward import ACTIVATIONS, FeedForward
from retrolm.nn.kmeans import SphericalKMeans, update_after_backward, update_kmeans
from retrolm.nn.layer_drop import layer_drop_keep
from retrolm.nn.local_attention import local_attend
from retrolm.nn.masks import sliding_window_mask
from retrolm.nn.moe import MixtureOfExperts
from retrolm.nn.norms import LayerNorm
from retrolm.nn.pkm import ProductKeyMemory, pkm_param_groups
from retrolm.nn.residual import Residual
from retrolm.nn.reversible import reversible
from retrolm.nn.rotary import RotaryEmbedding, apply_rotary
from retrolm.nn.sorted_window import sorted_window_attend
from retrolm.nn.token_shift import TokenShift
from retrolm.nn.weight_cache import WeightCache
from retrolm.wrapper import AutoregressiveWrapper

log = logging.getLogger(__name__)
Rotary = tuple[Tensor, Tensor]  # (n, d) cos and sin: RotaryEmbedding.span

__all__ = [
    "RoutingAttention",
    "RoutingCache",
    "RoutingConfig",
    "RoutingLanguageModel",
    "RoutingTransformer",
    "RoutingTransformerLM",
    "pkm_param_groups",
]


class RoutingAttention(nn.Module):
    """Local heads (exact sliding window) + routed heads (k-means clusters) in one layer.

    ``cross=True``: routed cross-attention onto a context (encoder output). Each decoder
    query and each context key is routed on its own; a query attends the context keys of its
    cluster plus the memory key/values (decoder-causal by construction).
    """

    def __init__(self, cfg: RoutingConfig, local_heads: int, cross: bool = False) -> None:
        super().__init__()
        d, h = cfg.head_dim, cfg.heads
        hl = 0 if cross else local_heads
        hr = h - hl
        self.heads, self.local_heads, self.routed_heads, self.dim_head = h, hl, hr, d
        self.cross, self.causal = cross, cfg.causal and not cross
        self.mode = cfg.routing_mode
        self.shared_qk = cfg.is_shared_qk and not cross
        self.window, self.local_window = cfg.window_size, cfg.local_window
        self.commitment = cfg.commitment_factor
        self.dropout = cfg.attn_dropout
        hk = hl + (0 if self.shared_qk else hr)  # heads with their own key projection
        # DecodeLinear: nn.Linear that decodes one row through a transposed copy
        self.q_proj = DecodeLinear(cfg.dim, h * d, bias=False)
        self.k_proj = DecodeLinear(cfg.dim, hk * d, bias=False) if hk else None
        self.v_proj = DecodeLinear(cfg.dim, h * d, bias=False)
        self.out_proj = DecodeLinear(h * d, cfg.dim, bias=False)
        self._qkv_names = ("q_proj", "k_proj", "v_proj") if hk else ("q_proj", "v_proj")
        self.out_dropout = nn.Dropout(cfg.attn_layer_dropout)
        # q|k|v weights as one (in, out) matrix in the compute dtype, for decoding / prefill
        self._fused = WeightCache(concat_decode_weight)
        self.kmeans = None
        self.num_mem_kv = 0
        if hr:
            self.kmeans = SphericalKMeans(hr, cfg.num_clusters, d, decay=cfg.kmeans_ema_decay)
            # a query that may find no key of its cluster needs something to attend
            needs_mem = cross or not self.shared_qk or self.mode == "balanced"
            self.num_mem_kv = max(cfg.num_mem_kv, 1 if needs_mem else 0)
            if self.num_mem_kv:
                self.mem_k = nn.Parameter(torch.randn(hr, self.num_mem_kv, d) * 0.02)
                self.mem_v = nn.Parameter(torch.randn(hr, self.num_mem_kv, d) * 0.02)

    def _mem(self):
        return (self.mem_k, self.mem_v) if self.num_mem_kv else None

    def train(self, mode: bool = True):
        if mode:  # the decoding copy is not needed while training
            self._fused.clear()
        return super().train(mode)

    def _project(self, x: Tensor, src: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """q (b, h, n, d), k (b, hk, m, d) or None, v (b, h, m, d), and q|k (b, h + hk, n, d)
        (a view when fused, else q). Without autograd, self-attention projects with one
        matmul over the weights concatenated (a decoding step runs this per layer: two
        matmuls and their reshapes fewer)."""
        d = self.dim_head
        if self.cross or torch.is_grad_enabled():
            q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", d=d)
            v = rearrange(self.v_proj(src), "b n (h d) -> b h n d", d=d)
            k = None
            if self.k_proj is not None:
                k = rearrange(self.k_proj(src), "b n (h d) -> b h n d", d=d)
            return q, k, v, q
        mods = self._modules  # (no nn.Module.__getattr__: ~0.8 us a lookup, 8 per layer)
        ws = [mods[name]._parameters["weight"] for name in self._qkv_names]
        qkv = linear_t(x, self._fused.get(*ws, key=compute_dtype(x, ws[0])), None)
        qkv = qkv.unflatten(-1, (-1, d)).transpose(1, 2)  # (b, h + hk + h, n, d)
        hk = qkv.shape[1] - 2 * self.heads
        q, k, v = qkv.split((self.heads, hk, self.heads), dim=1)
        return q, (k if hk else None), v, qkv[:, : self.heads + hk]

    def _rotate(self, q: Tensor, k: Tensor | None, qk: Tensor, rotary: Rotary | None):
        """Rotary on every query and key head: one call over the fused q|k view when there
        is one (the same values, elementwise; a decoding step: two calls per layer fewer)."""
        if rotary is None:
            return q, k
        cos, sin = rotary
        if qk is not q:
            r = apply_rotary(qk, cos, sin)
            rq, rk = r.split((self.heads, r.shape[1] - self.heads), 1)
            return rq, (rk if k is not None else None)
        rk = apply_rotary(k, cos, sin) if k is not None else None
        return apply_rotary(q, cos, sin), rk

    def forward(
        self,
        x: Tensor,  # (b, n, dim)
        *,
        input_mask: Tensor | None = None,  # (b, n) True = real token
        rotary: Rotary | None = None,  # (n, d) cos, sin at the positions of x
        context: Tensor | None = None,  # (b, m, dim) for cross-attention
        context_mask: Tensor | None = None,  # (b, m)
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Tensor]:  # (b, n, dim), aux scalar
        hl, hr = self.local_heads, self.routed_heads
        q, k, v, qk = self._project(x, context if self.cross else x)
        qrot, krot = self._rotate(q, k, qk, rotary)  # routing reads q, k; attention these
        outs, aux = [], None
        # per head group with one split each (a decoding step: a slice per view costs a call)
        vl, vr = v.split((hl, hr), 1)
        ql_rot, qr_rot = qrot.split((hl, hr), 1)
        if k is not None and k.shape[1] > hl:  # routed heads with their own keys
            kl_rot, kr_rot = krot.split((hl, hr), 1)
        else:
            kl_rot, kr_rot = krot, None
        if hl:
            outs.append(self._local(ql_rot, kl_rot, vl, input_mask, cache))
        if hr:
            qr = q[:, hl:]
            kr = None if self.shared_qk else k[:, hl:]
            if self.cross:
                out, commit = self._cross(qr, kr, vr, input_mask, context_mask)
            else:
                out, commit = self._routed(qr, kr, vr, (qr_rot, kr_rot), input_mask, cache)
            outs.append(out)
            aux = commit * self.commitment
        if aux is None:
            aux = x.new_zeros((), dtype=torch.float32)
        if len(outs) > 1:  # one copy, straight into (b, n, h, d) (its backward: views)
            out = torch.cat([o.transpose(1, 2) for o in outs], dim=2).flatten(2)
        else:
            out = outs[0].transpose(1, 2).flatten(2)  # (b, h, n, d) -> (b, n, h * d)
        out = self.out_proj(out)
        if self.training:  # nn.Dropout is the identity in eval; skip its call when decoding
            out = self.out_dropout(out)
        return out, aux

    # --- local heads -----------------------------------------------------------------------
    def _local(self, q, k, v, mask, cache):  # q, k rotated
        p = self.dropout if self.training else 0.0
        if cache is None or cache.local.length == 0:
            out = local_attend(
                q, k, v, self.local_window, causal=self.causal, key_mask=mask, dropout_p=p
            )
        else:
            k, v = cache.local.update(k, v)
            i, j = q.shape[-2], k.shape[-2]
            # one query against at most a window of cached keys (the cache keeps window - 1):
            # the band is all of them, no mask to build
            m = (
                None
                if i == 1 and j <= self.local_window
                else sliding_window_mask(i, j, self.local_window, device=q.device)
            )
            out = attend(q, k, v, m)
        if cache is not None:
            if cache.local.length == 0:
                cache.local.update(k, v)
            cache.local.keep_last(self.local_window - 1)
        return out

    # --- routed self-attention -------------------------------------------------------------
    def _route(self, qr, kr, mask):
        """Cluster ids of queries and keys (-1 for padding) and the commitment loss."""
        n = qr.shape[-2]
        if kr is None:
            groups, commit = self.kmeans.route(qr, mask)
            kgroups = None
        else:  # one k-means over queries and keys (as in the paper)
            m2 = torch.cat((mask, mask), dim=-1) if mask is not None else None
            both, commit = self.kmeans.route(torch.cat((qr, kr), dim=-2), m2)
            groups, kgroups = both[..., :n], both[..., n:]
        if mask is not None:
            pad = ~mask[:, None, :]
            groups = groups.masked_fill(pad, -1)
            kgroups = kgroups.masked_fill(pad, -1) if kgroups is not None else None
        return groups, kgroups, commit

    def _routed(self, qr, kr, vr, rotated, mask, cache):
        """qr, kr as projected (routing reads them); ``rotated``: the same after rotary."""
        groups, kgroups, commit = self._route(qr, kr, mask)
        qr, kr = rotated
        # shared q/k: keys are the l2-normalised queries (Reformer's shared-QK attention);
        # without a cache sorted_window_attend normalises them (inside its fused kernel)
        shared = kr is None
        lazy = shared and cache is None and self.mode != "balanced"
        keys = qr if lazy else (fused_train.l2_normalize(qr) if shared else kr)
        p = self.dropout if self.training else 0.0
        if self.mode == "balanced":
            out = balanced_attend(
                qr,
                keys,
                vr,
                self.kmeans.means,
                self.window,
                self._mem(),
                mask=mask,
                causal=self.causal,
                shared_qk=self.shared_qk,
                dropout_p=p,
            )
            return out, commit
        kg = groups if kgroups is None else kgroups
        if cache is not None and cache.has_routed:
            out = routed_decode_step(
                qr,
                keys,
                vr,
                kg,
                groups,
                cache,
                shared_qk=self.shared_qk,
                mem_kv=self._mem(),
                real=mask is None,
            )
            return out, commit
        out = sorted_window_attend(
            qr,
            keys,
            vr,
            groups,
            self.window,
            k_group=kgroups,
            causal=self.causal,
            mem_kv=self._mem(),
            exclude_self=self.shared_qk,
            dropout_p=p,
            unit_keys=lazy,
        )
        if cache is not None:  # prefill: keep every key with its cluster and rank
            cache.fill_routed(keys, vr, kg, self.kmeans.num_clusters, self.window)
        return out, commit

    # --- routed cross-attention ------------------------------------------------------------
    def _cross(self, q, k, v, mask, context_mask):
        """q (b, h, n, d) decoder queries; k, v (b, h, m, d) context keys/values."""
        n = q.shape[-2]
        cm = context_mask
        qm = mask if mask is not None else None
        both_mask = None
        if qm is not None or cm is not None:
            qm = (
                qm
                if qm is not None
                else torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
            )
            cm = (
                cm
                if cm is not None
                else torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=q.device)
            )
            both_mask = torch.cat((qm, cm), dim=-1)
        groups, commit = self.kmeans.route(torch.cat((q, k), dim=-2), both_mask)
        qg, kg = groups[..., :n], groups[..., n:]
        allowed = qg[..., :, None] == kg[..., None, :]  # (b, h, n, m)
        if cm is not None:
            allowed &= cm[:, None, None, :]
        mk, mv = self._mem()
        b = q.shape[0]
        k = torch.cat((mk.to(k.dtype).expand(b, -1, -1, -1), k), dim=-2)
        v = torch.cat((mv.to(v.dtype).expand(b, -1, -1, -1), v), dim=-2)
        allowed = torch.cat(
            (allowed.new_ones(*allowed.shape[:-1], self.num_mem_kv), allowed), dim=-1
        )
        p = self.dropout if self.training else 0.0
        return attend(q, k, v, allowed, dropout_p=p), commit


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
            given = {
                k: v
                for k, v in dict(dim=dim, depth=depth, max_seq_len=max_seq_len).items()
                if v is not None
            }
            config = _config_from_kwargs(
                {"num_tokens": None, "register_kmeans_update": False, **given, **kwargs}
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
        elif n == 1 and cache is not None and self._fused_step_ok(x, input_mask, cache):
            x, aux = self._fused_step(x, rotary, cache)
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

    # fused decoding (nn.fused_decode) -------------------------------------------------------
    def _fused_layers_ok(self) -> bool:
        """Whether every layer is what the fused blocks compute: pre-LayerNorm (with bias)
        self-attention with sorted routing and a plain feed-forward (GELU, no GLU, no PKM or
        MoE), no token shift, ReZero or context. Fixed by the config: computed once."""
        ok = getattr(self, "_fused_layers", None)
        if ok is None:
            cfg = self.config
            ok = (
                cfg.routing_mode == "sorted"
                and cfg.causal
                and not (cfg.shift_tokens or cfg.use_rezero or cfg.use_scale_norm)
                and not cfg.receives_context
                and all(
                    len(subs) == 2
                    and subs[0].residual.norm.bias is not None
                    and subs[1].residual.norm.bias is not None
                    and isinstance(subs[1].residual.fn, FeedForward)
                    and not subs[1].residual.fn.glu
                    and subs[1].residual.fn.act is ACTIVATIONS["gelu"]
                    for subs in self.layers
                )
            )
            self._fused_layers = ok
        return ok

    def _fused_step_ok(self, x: Tensor, input_mask: Tensor | None, cache: RoutingCache) -> bool:
        """A one-token step of real tokens (no mask) the fused blocks can run: eval, fp32 on
        CPU, every layer's caches filled by a prompt."""
        if self.training or input_mask is not None or not self._fused_layers_ok():
            return False
        if not fused_decode.usable(x):
            return False
        for subs, lc in zip(self.layers, cache.layers):
            attn = subs[0].residual.fn
            if attn.local_heads and lc.local.length == 0:
                return False
            if attn.routed_heads and not lc.has_routed:
                return False
        return True

    def _fused_step(self, x: Tensor, rotary, cache: RoutingCache) -> tuple[Tensor, Tensor]:
        """The layer stack for one token through ``nn.fused_decode``: one call per
        sub-layer. x (b, 1, dim) -> (x, aux) as the ATen path returns them."""
        ext, w, NONE = fused_decode.extension(), fused_decode.weight, fused_decode.NONE
        cos, sin = rotary
        h = x[:, 0]  # (b, dim)
        aux = x.new_zeros((), dtype=torch.float32)
        for subs, lc in zip(self.layers, cache.layers):
            res = subs[0].residual
            attn = res.fn
            lk = lv = NONE
            first = end = 0
            if attn.local_heads:
                lk, lv, first, end = lc.local.claim(1)
            kr = vr = cnt = means = NONE
            if attn.routed_heads:
                kr, vr, cnt, means = lc._kring, lc._vring, lc._cnt, attn.kmeans.means
            mem = attn._mem() or (NONE, NONE)
            k_proj = attn.k_proj
            h, commit = ext.routing_attention_block(
                h, res.norm.weight, res.norm.bias, res.norm.eps, w(attn.q_proj.weight),
                NONE if k_proj is None else w(k_proj.weight), w(attn.v_proj.weight),
                w(attn.out_proj.weight), cos, sin, lk, lv, first, end, kr, vr, cnt, means,
                attn.local_heads, attn.shared_qk, mem[0], mem[1],
            )  # fmt: skip
            if attn.local_heads:
                lc.local.keep_last(attn.local_window - 1)
            if attn.routed_heads:
                aux = aux + commit * attn.commitment
            res = subs[1].residual
            up, down = res.fn.up_proj, res.fn.down_proj
            h, _ = fused_decode.feed_forward(
                h, res.norm, up.weight, up.bias, down.weight, down.bias
            )
        return h[:, None], aux  # (forward counts the token in cache.length)


def _config_from_kwargs(kwargs: dict) -> RoutingConfig:
    """Seed keyword names -> RoutingConfig (``_register_kmeans_update`` is the seed's name)."""
    kw = dict(kwargs)
    if "_register_kmeans_update" in kw:
        kw["register_kmeans_update"] = kw.pop("_register_kmeans_update")
    for dead in ("rel_pos_emb", "use_absolute_pos_emb"):
        if kw.pop(dead, None):
            log.warning(
                "%s is not an option of retrolm's routing transformer (rotary is always on)", dead
            )
    return RoutingConfig.from_dict(kw)


class RoutingTransformerLM(nn.Module):
    """Token embedding -> ``RoutingTransformer`` -> logits. ``model(x, input_mask=mask)``
    returns ``(logits (b, n, num_tokens), aux_loss scalar)``; ``aux_loss`` (commitment + MoE)
    must be added to the LM loss (``AutoregressiveWrapper`` does)."""

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
            given = dict(num_tokens=num_tokens, dim=dim, depth=depth, max_seq_len=max_seq_len)
            config = _config_from_kwargs(
                {**{k: v for k, v in given.items() if v is not None}, **kwargs}
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


class RoutingLanguageModel(AutoregressiveWrapper):
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
