"""Infini-attention (arXiv 2404.07143, Fig. 1): causal softmax attention inside the segment
plus a read of the compressive memory of the segments before, mixed by a learned gate per
head.

The local path rotates queries and keys (positions restart each segment) and attends the
segment's keys through ``nn.attend``; the memory path reads and writes with the *unrotated*
queries and keys (``memory.py``). This layer computes the segment's output; the caller
writes the segment into memory once it is complete (``model.py``).

Notation: b batch, n new tokens, h heads, j keys of the segment so far, d head width.
"""

from __future__ import annotations

from typing import NamedTuple

from einops import rearrange
from torch import Tensor, nn

from retrolm.models.infini.cache import SegmentKV
from retrolm.models.infini.config import InfiniConfig
from retrolm.models.infini.memory import FastweightMemory, Memories
from retrolm.nn.attention import attend
from retrolm.nn.masks import causal_mask, combine
from retrolm.nn.norms import RMSNorm
from retrolm.nn.rotary import apply_rotary


class SegmentWrite(NamedTuple):
    """What one call adds to its segment's memory write (unrotated keys)."""

    keys: Tensor  # (b, h, n, d)
    values: Tensor  # (b, h, n, d)
    beta: Tensor | None  # (b, h, n, 1) write strength, None without learned_delta_update


class InfiniAttention(nn.Module):
    def __init__(self, cfg: InfiniConfig) -> None:
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        inner = cfg.heads * cfg.dim_head
        self.norm = RMSNorm(cfg.dim)
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim, bias=False)
        self.dropout = cfg.attn_dropout
        # learned_delta_update: a write strength beta = sigmoid(W x) per token and head
        self.to_beta = nn.Linear(cfg.dim, cfg.heads) if cfg.learned_delta_update else None
        self.memory = FastweightMemory(
            cfg.heads, cfg.head_gate_init_value, cfg.use_mem_delta_rule, cfg.gate_lr_scale
        )

    def forward(
        self,
        x: Tensor,  # (b, n, dim) the new tokens of the segment
        rotary: tuple[Tensor, Tensor],  # (n, d) cos, sin of their positions in the segment
        past: Memories | None,  # the memory of earlier segments; None reads nothing
        segment: SegmentKV | None = None,  # earlier tokens of this segment (decoding)
        key_mask: Tensor | None = None,  # (b, 1, 1, j) bool, True = key of the row's document
    ) -> tuple[Tensor, SegmentWrite]:  # (b, n, dim)
        h = self.norm(x)
        q, k, v = rearrange(self.to_qkv(h), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        beta = None
        if self.to_beta is not None:
            beta = self.to_beta(h).sigmoid().transpose(1, 2)[..., None]  # (b, h, n, 1)
        cos, sin = rotary
        q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if segment is None:
            keys, values = k_rot, v
        else:
            strength = beta if beta is not None else k.new_ones(*k.shape[:-1], 1)
            keys, values = segment.append(k_rot, k, v, strength)  # (b, h, j, d)
        mask = None
        if key_mask is not None:  # a row whose document began inside this segment
            i, j = q.shape[-2], keys.shape[-2]
            mask = combine(key_mask, causal_mask(i, j, device=x.device))
        local = attend(
            q_rot,
            keys,
            values,
            mask,
            causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (b, h, n, d)
        out = self.memory.retrieve_and_add_to_output(local, q, past)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), SegmentWrite(k, v, beta)

    def write(
        self, segment: SegmentWrite, past: Memories | None, key_mask: Tensor | None = None
    ) -> Memories:
        """The memory after the whole segment (eq. 4 or 5)."""
        weights = segment.beta
        mask = None if key_mask is None else key_mask.transpose(-1, -2)  # (b, 1, j, 1)
        return self.memory.create_new_memories(
            segment.keys, segment.values, past, weights=weights, key_mask=mask
        )


def segment_write(segment: SegmentKV, learned: bool) -> SegmentWrite:
    """The write of a segment fed in pieces, read back from its cache."""
    k, v, beta = segment.contents()
    return SegmentWrite(k, v, beta if learned else None)


__all__ = ["InfiniAttention", "SegmentWrite", "segment_write"]
