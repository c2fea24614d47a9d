"""RETRO's fast path for one decoded token: the decoder layers as ``nn.fused.decode`` blocks
(three C++ calls per layer instead of ~30 kernels), and when a step may take it.

The model (``model.py``) calls :func:`step_ok` and :func:`decode_step`; every other call
runs the plain layers, which are the reference the fused step is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from retrolm.models.retro.cache import RetroCache
from retrolm.nn.feedforward import ACTIVATIONS
from retrolm.nn.fused import decode as fused_decode

if TYPE_CHECKING:
    from retrolm.models.retro.model import RETRO


def layers_ok(model: RETRO) -> bool:
    """Whether every decoder layer is what ``nn.fused.decode``'s blocks compute: pre-norm
    RMSNorm, multi-head attention without biases, memory, windows or grouped heads, half
    rotary, a plain GELU feed-forward. Fixed by the config: computed once."""
    ok = getattr(model, "_fused_layers", None)
    if ok is None:
        c = model.config
        attns = [layer.self_attn.fn for layer in model.layers]
        attns += [layer.cca.fn.attn for layer in model.layers if layer.cca is not None]
        ffs = [layer.ff.fn for layer in model.layers]
        ok = (
            c.norm == "rms"
            and not c.use_deepnet
            and all(
                a.q_proj.bias is None
                and not a.num_mem_kv
                and a.window is None
                and a.kv_heads == a.heads
                and not a.interleaved_rotary
                for a in attns
            )
            and all(not f.glu and f.act is ACTIVATIONS["gelu"] for f in ffs)
        )
        model._fused_layers = ok
    return ok


def step_ok(model: RETRO, start: int, retrieved: Tensor | None, cache: RetroCache) -> bool:
    """A one-token step that the fused blocks can run: eval, fp32 on CPU, no chunk
    completes (the encoder runs then), and the chunk this position reads is encoded."""
    if model.training or not layers_ok(model):
        return False
    if not fused_decode.usable(model.token_emb.weight):
        return False
    if any(kv.length == 0 for kv in cache.self_attn):
        return False
    m = model.config.chunk_size
    if retrieved is None or start < m - 1:
        return True
    if (start + 1) // m > cache.encoded_chunks:  # this token completes a chunk
        return False
    u = (start + 1) // m - 1
    return all(
        cache.cca_kv.get(no) is not None and u < cache.cca_kv[no][0].shape[1]
        for no in model.cca_layers
    )


def decode_step(model: RETRO, seq: Tensor, retrieving: bool, cache: RetroCache) -> Tensor:
    """``_decode`` for one new token through ``nn.fused.decode``: three calls per layer
    instead of ~30 kernels. seq (b, 1) -> final normed states (b, 1, d)."""
    start, m = cache.length, model.config.chunk_size
    rotary = tuple(t[0] for t in model.rotary.span(start, 1, seq.device))  # (r,) each
    attends = retrieving and start >= m - 1
    if attends:
        u, lead = (start + 1) // m - 1, (start - (m - 1)) % m
        q_rotary = tuple(t[lead] for t in model.rotary.span(m - 1, m, seq.device))
        allow = None if cache.cca_full[u] else cache.cca_mask[:, u].contiguous()
    x = model.token_emb(seq)[:, 0]  # (b, d)
    for i, layer in enumerate(model.layers):
        res = layer.self_attn
        x, _ = fused_decode.self_attention(x, res.norm, res.fn, rotary, cache.self_attn[i])
        if retrieving and i + 1 == model.cca_layers[0]:  # the chunk's states, as _encode
            cache.chunk_states.append(x[:, None])
        if layer.cca is not None and attends:  # (else the zero update: x unchanged)
            k, v = cache.cca_kv[i + 1]
            x = fused_decode.cross_attention(
                x, layer.cca.norm, layer.cca.fn.attn, q_rotary, k.select(1, u),
                v.select(1, u), allow,
            )  # fmt: skip
        res, ff = layer.ff, layer.ff.fn
        up, down = ff.up_proj, ff.down_proj
        x, _ = fused_decode.feed_forward(x, res.norm, up.weight, up.bias, down.weight, down.bias)
    cache.length += 1
    return model.final_norm(x[:, None])
