"""Infini-Transformer (Munkhdalai et al. 2024, arXiv 2404.07143): a decoder whose every
attention layer is Infini-attention (``attention.py``), run segment by segment with a
compressive memory per layer and head carried from one segment to the next.

One segment runner serves training, evaluation and generation: ``stream(ids, cache)`` feeds
any number of tokens, splits them at segment boundaries, and writes a segment into memory
once it is complete, the same whether the segment came whole (training, a prompt) or token
by token (decoding, with the segment's keys in the cache). ``recurrent_loss`` is the
truncated-BPTT training loop over it. ``InfiniTransformer.forward`` keeps the keyword API of
``infini-transformer-pytorch`` (one call = one segment).

Notation: b batch, n tokens, V vocabulary, L segment length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from retrolm.models.infini import fused
from retrolm.models.infini.attention import InfiniAttention, SegmentWrite, segment_write
from retrolm.models.infini.cache import InfiniCache, SegmentKV
from retrolm.models.infini.config import InfiniConfig
from retrolm.models.infini.memory import Memories
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.losses import cross_entropy
from retrolm.nn.norms import RMSNorm
from retrolm.nn.rotary import RotaryEmbedding


class TransformerReturn(NamedTuple):
    """What ``InfiniTransformer.forward`` returns (the reference's fields)."""

    logits: Tensor  # (b, n, V); (b, 1, V) with cached_kv
    cached_kvs: list[SegmentKV] | None  # the segment's keys so far, per layer
    past_memories: list[Memories] | None  # the new memories with return_new_memories


class _FeedForwardBlock(nn.Module):
    """Pre-RMSNorm GEGLU feed-forward, hidden width int(ff_mult * dim * 2 / 3)."""

    def __init__(self, cfg: InfiniConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.dim)
        self.ff = FeedForward(
            cfg.dim, glu=True, hidden_dim=cfg.ff_hidden, dropout=cfg.ff_dropout, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(self.norm(x))


class InfiniTransformer(nn.Module):
    """``InfiniTransformer(num_tokens, dim, depth, dim_head=128, heads=8, attn_dropout=0.,
    ff_mult=4, ff_dropout=0., use_mem_delta_rule=False, learned_delta_update=False)`` plus
    any other ``InfiniConfig`` field (``head_gate_init_value``, ``segment_len``,
    ``max_seq_len``, ...) by keyword; or ``config=`` a typed ``InfiniConfig``."""

    def __init__(
        self,
        num_tokens: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        dim_head: int = 128,
        heads: int = 8,
        attn_dropout: float = 0.0,
        ff_mult: float = 4.0,
        ff_dropout: float = 0.0,
        use_mem_delta_rule: bool = False,
        learned_delta_update: bool = False,
        *,
        config: InfiniConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if config is None:
            if None in (num_tokens, dim, depth):
                raise ValueError(
                    "InfiniTransformer needs num_tokens, dim and depth (or config=InfiniConfig"
                    f"(...)); got num_tokens={num_tokens}, dim={dim}, depth={depth}"
                )
            config = InfiniConfig.from_dict(
                dict(
                    num_tokens=num_tokens, dim=dim, depth=depth, dim_head=dim_head, heads=heads,
                    attn_dropout=attn_dropout, ff_mult=ff_mult, ff_dropout=ff_dropout,
                    use_mem_delta_rule=use_mem_delta_rule,
                    learned_delta_update=learned_delta_update, **options,
                )
            )  # fmt: skip
        elif num_tokens is not None or dim is not None or depth is not None or options:
            raise ValueError("pass either config= or the keyword arguments, not both")
        self.config = cfg = config
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        self.rotary = RotaryEmbedding(cfg.dim_head, base=cfg.rotary_base)
        self.attns = nn.ModuleList(InfiniAttention(cfg) for _ in range(cfg.depth))
        self.ffs = nn.ModuleList(_FeedForwardBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = RMSNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.num_tokens, bias=False)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def init_cache(self, batch_size: int, segment_len: int | None = None) -> InfiniCache:
        """An empty stream (no memory, no segment) for ``stream``."""
        seg = self.config.segment_len if segment_len is None else segment_len
        if isinstance(seg, bool) or not isinstance(seg, int) or seg < 1:
            raise ValueError(f"segment_len must be a positive int, got {seg!r}")
        return InfiniCache(batch_size, self.config.depth, seg)

    # ---- one piece of one segment ------------------------------------------------------
    def _run(
        self,
        ids: Tensor,  # (b, n) tokens at positions pos ... pos + n - 1 of their segment
        pos: int,
        memories: Sequence[Memories | None],
        segments: Sequence[SegmentKV] | None,  # None: the piece is the whole segment so far
        use_memory: bool,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[SegmentWrite]]:  # (b, n, V)
        if fused.step_ok(self, ids, segments, key_mask):  # one decoded token: C++ blocks
            return fused.decode_step(self, ids, pos, memories, segments, use_memory), []
        x = self.token_emb(ids)
        rot = self.rotary.span(pos, ids.shape[1], device=ids.device)
        writes = []
        for layer, (attn, ff) in enumerate(zip(self.attns, self.ffs, strict=True)):
            past = memories[layer] if use_memory else None  # off: every segment the first
            seg = None if segments is None else segments[layer]
            out, write = attn(x, rot, past, seg, key_mask)
            x = x + out
            x = x + ff(x)
            writes.append(write)
        return self.to_logits(self.final_norm(x)), writes

    def _write(
        self,
        writes: Sequence[SegmentWrite],
        memories: Sequence[Memories | None],
        key_mask: Tensor | None = None,
    ) -> list[Memories]:
        return [
            a.write(w, m, key_mask) for a, w, m in zip(self.attns, writes, memories, strict=True)
        ]

    # ---- the segment runner ------------------------------------------------------------
    def stream(self, ids: Tensor, cache: InfiniCache, use_memory: bool = True) -> Tensor:
        """Logits (b, n, V) of ``ids`` (b, n), any n, continuing the stream in ``cache``.

        Split at segment boundaries: a whole segment runs at once, a part of one through the
        segment's KV cache; each completed segment is written into memory (eq. 4 or 5)
        after its local pass, so ``stream`` in any pieces equals one call."""
        if ids.dim() != 2 or ids.shape[0] != cache.batch_size:
            raise ValueError(
                f"ids must be (batch={cache.batch_size}, n) token ids, got {tuple(ids.shape)}"
            )
        seg_len, n, out = cache.segment_len, ids.shape[1], []
        learned = self.config.learned_delta_update
        i = 0
        while i < n:
            take = min(n - i, seg_len - cache.pos)
            piece = ids[:, i : i + take]
            whole = cache.pos == 0 and take == seg_len  # no KV cache needed
            if whole:
                logits, writes = self._run(piece, 0, cache.memories, None, use_memory)
            else:
                mask = cache.key_mask(cache.pos + take, ids.device)
                logits, _ = self._run(
                    piece, cache.pos, cache.memories, cache.segment, use_memory, mask
                )
            cache.pos += take
            if cache.pos == seg_len:  # the segment is complete: into memory
                mask = None if whole else cache.key_mask(seg_len, ids.device)
                if not whole:
                    writes = [segment_write(s, learned) for s in cache.segment]
                cache.end_segment(self._write(writes, cache.memories, mask))
            out.append(logits)
            i += take
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    # ---- the reference's API: one call = one segment -------------------------------------
    def forward(
        self,
        x: Tensor,  # (b, n) one segment, or with cached_kv the segment so far
        past_memories: Sequence[Memories] | None = None,
        cached_kv: Sequence[SegmentKV] | None = None,
        return_new_memories: bool = False,
        detach_memories: bool = False,
        use_memory: bool = True,
    ) -> TransformerReturn:
        """One segment. ``past_memories``: the memories after the segments before (None:
        none); with ``cached_kv`` (the ``cached_kvs`` of the previous call) only the last
        token of ``x`` is new. ``return_new_memories``: also write this segment (its cached
        tokens included) into memory and return the result as ``past_memories``; otherwise
        ``cached_kvs`` holds the segment's keys for the next token. ``use_memory=False``
        reads nothing from memory."""
        depth = self.config.depth
        memories = list(past_memories) if past_memories is not None else [None] * depth
        if len(memories) != depth:
            raise ValueError(
                f"past_memories must hold {depth} layers' Memories, got {len(memories)}"
            )
        pos, segments = 0, None
        if cached_kv is not None:
            segments, x = list(cached_kv), x[:, -1:]
            pos = segments[0].length
        elif not return_new_memories:
            segments = [SegmentKV() for _ in range(depth)]
        logits, writes = self._run(x, pos, memories, segments, use_memory)
        if not return_new_memories:
            return TransformerReturn(logits, segments, past_memories)
        if segments is not None:
            learned = self.config.learned_delta_update
            writes = [segment_write(s, learned) for s in segments]
        new = self._write(writes, memories)
        if detach_memories:
            new = [m.detach() for m in new]
        return TransformerReturn(logits, segments, new)


def recurrent_loss(
    net: InfiniTransformer,
    inputs: Tensor,  # (b, n) token ids
    labels: Tensor,  # (b, n) next tokens, ignore_index where nothing is predicted
    *,
    segment_len: int,
    detach_every: int,
    ignore_index: int = -100,
    backward: bool = False,
    grad_accum_scale: float = 1.0,
    use_memory: bool = True,
) -> Tensor:
    """Mean next-token cross-entropy over the labels != ``ignore_index``, segment by segment
    through the memory, with truncated BPTT: the memories are detached after every
    ``detach_every`` segments. ``backward``: call ``.backward()`` (scaled by
    ``grad_accum_scale``) on each such window's share of the loss, so only one window's graph
    is alive at a time; the returned loss is then detached."""
    b, n = inputs.shape
    cache = net.init_cache(b, segment_len)
    counted = int((labels != ignore_index).sum())
    total = inputs.new_zeros((), dtype=torch.float32)
    window: Tensor | None = None
    starts = range(0, n, segment_len)
    for s, start in enumerate(starts):
        logits = net.stream(inputs[:, start : start + segment_len], cache, use_memory)
        lab = labels[:, start : start + segment_len].reshape(-1)
        valid = int((lab != ignore_index).sum())
        if valid:  # the segment's share of the mean
            part = cross_entropy(logits.reshape(-1, logits.shape[-1]), lab, ignore_index)
            part = part * (valid / counted)
            window = part if window is None else window + part
        if (s + 1) % detach_every and s != len(starts) - 1:
            continue
        if window is not None:
            if backward:
                (window * grad_accum_scale).backward()
                window = window.detach()
            total = total + window
        window = None
        cache.detach()
    return total
