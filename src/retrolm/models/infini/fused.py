"""Infini-attention's fast path for one decoded token: each layer as two ``nn.fused.decode``
calls (``infini_attention_block``: the local attention over the segment's cache, the gated
memory read and the cache writes; ``feed_forward_block`` with its GLU) instead of ~60 kernels.

The memory is only read here: a step never completes a segment's write, which runs once per
segment through the plain path (``model.py``). ``model.py`` calls :func:`step_ok` and
:func:`decode_step`; every other call runs the plain layers, the reference the fused step is
tested against. ``RETROLM_FUSED_DECODE=0`` (or ``nn.fused.decode.set_enabled(False)``) turns
it off.

Notation: b batch, d model width, h heads, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from retrolm.models.infini.cache import SegmentKV
from retrolm.models.infini.memory import Memories
from retrolm.nn.feedforward import ACTIVATIONS
from retrolm.nn.fused import decode as fused_decode

if TYPE_CHECKING:
    from retrolm.models.infini.model import InfiniTransformer


def layers_ok(model: InfiniTransformer) -> bool:
    """Whether every feed-forward is the GELU GLU ``feed_forward_block`` computes (fixed by
    the model: computed once)."""
    ok = getattr(model, "_fused_layers", None)
    if ok is None:
        ok = all(f.ff.act is ACTIVATIONS["gelu"] for f in model.ffs)
        model._fused_layers = ok
    return ok


def step_ok(
    model: InfiniTransformer, ids: Tensor, segments: Sequence[SegmentKV] | None, key_mask
) -> bool:
    """A one-token step the fused blocks can run: eval, fp32 on CPU without autograd or
    autocast (``fused_decode.usable``), inside a segment already begun (the cache holds its
    keys, in fp32) and no document start inside it (no key mask)."""
    if segments is None or ids.shape[1] != 1 or key_mask is not None or model.training:
        return False
    if not (layers_ok(model) and fused_decode.usable(model.token_emb.weight)):
        return False
    f32 = torch.float32
    return all(s.local.dtype is f32 and s.raw.dtype is f32 for s in segments)


def _attention(
    attn, x: Tensor, rotary: tuple[Tensor, Tensor], past: Memories | None, seg: SegmentKV
) -> Tensor:  # (b, d) -> (b, d)
    """``x + attn(x)`` for one token, its keys appended to ``seg``."""
    k_buf, v_buf, first, end = seg.local.claim(1)
    raw_k, raw_beta, _, raw_end = seg.raw.claim(1)
    wqkv = fused_decode.weight(attn.to_qkv.weight)  # (3 h dh, d): q, k, v rows
    inner = wqkv.shape[0] // 3
    mem = z = fused_decode.NONE
    if past is not None:
        mem, z = past.kv_mem.contiguous(), past.k_norm.contiguous()
    beta_w = beta_b = fused_decode.NONE
    if attn.to_beta is not None:
        beta_w, beta_b = fused_decode.weight(attn.to_beta.weight), attn.to_beta.bias
    return fused_decode.extension().infini_attention_block(
        x, attn.norm.weight, attn.norm.eps, wqkv[:inner], wqkv[inner : 2 * inner],
        wqkv[2 * inner :], fused_decode.weight(attn.to_out.weight), rotary[0], rotary[1],
        k_buf, v_buf, first, end, mem, z, attn.memory.head_gates, raw_k, raw_beta, raw_end,
        beta_w, beta_b,
    )  # fmt: skip


def decode_step(
    model: InfiniTransformer,
    ids: Tensor,  # (b, 1) the token at position pos of its segment
    pos: int,
    memories: Sequence[Memories | None],
    segments: Sequence[SegmentKV],
    use_memory: bool,
) -> Tensor:  # (b, 1, V) logits
    """``model._run`` for one token through the fused blocks (two calls per layer)."""
    rotary = tuple(t[0] for t in model.rotary.span(pos, 1, ids.device))  # (dh,) each
    x = model.token_emb(ids)[:, 0]  # (b, d)
    for layer, (attn, ff) in enumerate(zip(model.attns, model.ffs, strict=True)):
        past = memories[layer] if use_memory else None
        x = _attention(attn, x, rotary, past, segments[layer])
        up, down = ff.ff.up_proj, ff.ff.down_proj
        x, _ = fused_decode.feed_forward(
            x, ff.norm, up.weight, up.bias, down.weight, down.bias, glu=ff.ff.glu
        )
    return model.to_logits(model.final_norm(x[:, None]))
