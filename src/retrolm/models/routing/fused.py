"""The Routing Transformer's fast path for one decoded token: each layer as one
``nn.fused.decode`` routing-attention block and one feed-forward call, and when a step may
take it. ``model.py`` calls :func:`step_ok` and :func:`decode_step`; the plain layers are
the reference the fused step is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from retrolm.models.routing.cache import RoutingCache
from retrolm.nn.feedforward import ACTIVATIONS, FeedForward
from retrolm.nn.fused import decode as fused_decode

if TYPE_CHECKING:
    from retrolm.models.routing.model import RoutingTransformer


def layers_ok(model: RoutingTransformer) -> bool:
    """Whether every layer is what the fused blocks compute: pre-LayerNorm (with bias)
    model-attention with sorted routing and a plain feed-forward (GELU, no GLU, no PKM or
    MoE), no token shift, ReZero or context. Fixed by the config: computed once."""
    ok = getattr(model, "_fused_layers", None)
    if ok is None:
        cfg = model.config
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
                for subs in model.layers
            )
        )
        model._fused_layers = ok
    return ok


def step_ok(
    model: RoutingTransformer, x: Tensor, input_mask: Tensor | None, cache: RoutingCache
) -> bool:
    """A one-token step of real tokens (no mask) the fused blocks can run: eval, fp32 on
    CPU, every layer's caches filled by a prompt."""
    if model.training or input_mask is not None or not layers_ok(model):
        return False
    if not fused_decode.usable(x):
        return False
    for subs, lc in zip(model.layers, cache.layers):
        attn = subs[0].residual.fn
        if attn.local_heads and lc.local.length == 0:
            return False
        if attn.routed_heads and not lc.has_routed:
            return False
    return True


def decode_step(
    model: RoutingTransformer, x: Tensor, rotary, cache: RoutingCache
) -> tuple[Tensor, Tensor]:
    """The layer stack for one token through ``nn.fused.decode``: one call per
    sub-layer. x (b, 1, dim) -> (x, aux) as the ATen path returns them."""
    ext, w, NONE = fused_decode.extension(), fused_decode.weight, fused_decode.NONE
    cos, sin = rotary
    h = x[:, 0]  # (b, dim)
    aux = x.new_zeros((), dtype=torch.float32)
    for subs, lc in zip(model.layers, cache.layers):
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
        h, _ = fused_decode.feed_forward(h, res.norm, up.weight, up.bias, down.weight, down.bias)
    return h[:, None], aux  # (forward counts the token in cache.length)
