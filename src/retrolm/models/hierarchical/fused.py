"""The hierarchical transformer's fast path for one decoded token: each block's attention and
feed-forward (token shift included) and each merge MLP as one ``nn.fused.decode`` call, and
when a step may take it. ``model.py`` calls :func:`step_ok`, :func:`block_step` and
:func:`merge_step`; the plain blocks are the reference the fused step is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from retrolm.models.hierarchical.cache import BlockState, HierarchicalCache
from retrolm.nn.fused import decode as fused_decode

if TYPE_CHECKING:
    from retrolm.models.hierarchical.model import HierarchicalBlock, HierarchicalTransformer


def step_ok(
    model: HierarchicalTransformer, due: list[bool], cache: HierarchicalCache, t: int
) -> bool:
    """Whether this step's blocks can run as ``nn.fused.decode`` blocks: eval, fp32 on
    CPU, and every sub-sequence cache the step attends is filled."""
    if model.training or not fused_decode.usable(model.token_emb.weight):
        return False
    for layer_states in cache.blocks:
        for k, (blk, st) in enumerate(zip(model.layers[0], layer_states)):
            if due[k] and blk.attn is not None:
                index = t // model.config.hierarchical_stride[k]
                if st.kv[index % blk.attn.fn.axial].length == 0:
                    return False
    return True


def _shift_state(past: Tensor | None, x: Tensor, a: int) -> Tensor:
    """A block's token-shift state for the fused blocks: the last ``a`` normed inputs
    (b, a, d), zeros before the start (``token_shift_cached``'s ``past``)."""
    return past if past is not None else x.new_zeros(x.shape[0], a, x.shape[-1])


def block_step(blk: HierarchicalBlock, x: Tensor, st: BlockState, index: int) -> Tensor:
    """``blk(x, state=st, index=index)`` for one token through ``nn.fused.decode``: the
    attention (token shift, rotary, its sub-sequence's cache, window) and the feed-forward
    (token shift) as one call each, each handing back the next shift state. x (b, 1, d) ->
    (b, 1, d)."""
    h = x[:, 0]  # (b, d)
    half = h.shape[-1] // 2  # token_shift's groups (0, a): the second half is shifted
    if blk.attn is not None:
        res, sub = blk.attn, blk.attn.fn
        mha, a = sub.attn, sub.axial
        rotary = sub.rotary.span(index // a, 1, h.device)  # (1, r) each
        kv = st.kv[index % a]
        h, st.attn_shift = fused_decode.self_attention(
            h, res.norm, mha, rotary, kv, _shift_state(st.attn_shift, h, a), half
        )
        if mha.window is not None:
            kv.keep_last(mha.window - 1)  # all that later queries can still see
    res, sff = blk.ff, blk.ff.fn
    up, down = sff.ff.up_proj, sff.ff.down_proj
    h, st.ff_shift = fused_decode.feed_forward(
        h, res.norm, up.weight, up.bias, down.weight, down.bias,
        shift=_shift_state(st.ff_shift, h, sff.shifts[1]), shift_from=half,
    )  # fmt: skip
    return h[:, None]


def merge_step(merge: nn.Sequential, cat: Tensor) -> Tensor:
    """The merge MLP (RMSNorm, SiLU feed-forward) of cat (b, 1, sum(d)) as one fused call."""
    norm, ff = merge[0], merge[1]
    up, down = ff.up_proj, ff.down_proj
    out, _ = fused_decode.feed_forward(
        cat[:, 0].contiguous(), norm, up.weight, up.bias, down.weight, down.bias,
        act="silu", residual=False,
    )  # fmt: skip
    return out[:, None]
