"""Routing attention (Roy et al. 2021, §3-4): local heads over a sliding window, routed
heads over the latest keys of their query's k-means cluster, optional cross-attention.

Notation: b batch, n positions, h heads (hl local + hr routed), d head dim, k clusters,
w window, m memory key/values.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from retrolm.models.routing.balanced import balanced_attend
from retrolm.models.routing.cache import LayerCache, routed_decode_step
from retrolm.models.routing.config import RoutingConfig
from retrolm.nn.attention import attend
from retrolm.nn.decode_linear import DecodeLinear, compute_dtype, concat_decode_weight, linear_t
from retrolm.nn.kmeans import SphericalKMeans
from retrolm.nn.local_attention import local_attend
from retrolm.nn.masks import sliding_window_mask
from retrolm.nn.norms import l2_normalize
from retrolm.nn.rotary import apply_rotary
from retrolm.nn.sorted_window import sorted_window_attend
from retrolm.nn.weight_cache import WeightCache

Rotary = tuple[Tensor, Tensor]  # (n, d) cos and sin: RotaryEmbedding.span


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
        keys = qr if lazy else (l2_normalize(qr, fused=True) if shared else kr)
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
