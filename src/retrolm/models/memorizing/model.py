"""Memorizing Transformer (Wu et al., ICLR 2022, arXiv 2203.08913): a decoder that reads a
document in segments and whose kNN layers also attend to the top-k (key, value) pairs of the
document's earlier segments, kept in a non-differentiable memory per batch row.

Order of one segment (this is what keeps it causal and document-aware):

1. a document start clears the row's kNN *and* XL state first (``doc_start``, or
   ``clear_memories_on_sos_token_id`` as the segment's first token);
2. every layer runs; a kNN layer *searches* the memory as it was before the segment;
3. at the segment's end each layer's pairs leaving its XL window (all of them without XL)
   are written, detached, to its kNN memory, and the XL window rolls;
   ``clear_memories_on_eos_token_id`` as the segment's last token then clears the row.

With ``shift_knn_memories_down = s`` kNN layer i reads the memory that the kNN layer s above
it (cyclically) writes, and writes its own (ERNIE-Doc's "same-layer recurrence", arXiv
2012.15688); that is why every write waits for the end of the segment's forward.
``shift_xl_memories_down`` does the same for XL memories.

``MemorizingTransformer`` keeps the reference's call (one call = one segment, memories passed
in); ``MemorizingLanguageModel`` streams ids of any length through segments of
``segment_len`` (training, evaluation, generation: ``init_cache``). Shapes: b batch, n tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from retrolm.models.memorizing.cache import MemorizingCache, XLMemories
from retrolm.models.memorizing.config import MemorizingConfig
from retrolm.models.memorizing.knn_attention import KNNAttention, LocalGeometry, XLAttention
from retrolm.models.pretrained import PreTrainedMixin
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.knn_memory import KNNMemoryList
from retrolm.nn.losses import cross_entropy
from retrolm.nn.norms import LayerNorm
from retrolm.nn.relative_bias import RelativePositionBias

log = logging.getLogger(__name__)


class _Block(nn.Module):
    def __init__(self, cfg: MemorizingConfig, knn: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(cfg.dim), LayerNorm(cfg.dim)
        if knn:
            self.attn = KNNAttention(
                cfg.dim,
                cfg.knn_heads,
                cfg.dim_head,
                cfg.attn_dropout,
                cfg.num_retrieved_memories,
                cfg.gate,
                cfg.gate_init,
                cfg.attn_scale_init,
            )
        else:
            self.attn = XLAttention(cfg.dim, cfg.heads, cfg.dim_head, cfg.attn_dropout)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, dropout=cfg.ff_dropout)


def _config_from_kwargs(kwargs: dict, **given) -> MemorizingConfig:
    """The reference's keywords -> MemorizingConfig (unknown names are refused by name)."""
    if kwargs.pop("knn_memory_multiprocessing", None):
        log.warning("knn_memory_multiprocessing is not used: retrolm searches in-process")
    kw = {**{k: v for k, v in given.items() if v is not None}, **kwargs}
    return MemorizingConfig.from_dict(kw)


class MemorizingTransformer(nn.Module):
    """The reference's model: ``model(x, knn_memories)`` runs one segment; with XL on it
    returns ``(logits, xl_memories)``; ``labels=`` gives the loss instead of logits."""

    def __init__(
        self,
        num_tokens: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        *,
        config: MemorizingConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if config is None:
            config = _config_from_kwargs(kwargs, num_tokens=num_tokens, dim=dim, depth=depth)
        self.config = cfg = config
        self.max_seq_len = cfg.max_seq_len
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        bias = dict(num_buckets=cfg.rel_pos_buckets, max_distance=cfg.rel_pos_max_distance)
        self.rel_pos_bias = RelativePositionBias(cfg.heads, **bias)
        self.knn_rel_pos_bias = RelativePositionBias(cfg.knn_heads, **bias)
        knn, xl = cfg.knn_layers, cfg.xl_layers
        self.layers = nn.ModuleList(_Block(cfg, i in knn) for i in range(cfg.depth))
        self.norm = LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.num_tokens)
        s, sx = cfg.shift_knn_memories_down, cfg.shift_xl_memories_down
        self.knn_write = {layer: a for a, layer in enumerate(knn)}  # layer -> its memory
        self.knn_read = {layer: (a + s) % len(knn) for a, layer in enumerate(knn)}
        self.xl_read = {layer: xl[(a + sx) % len(xl)] for a, layer in enumerate(xl)}

    # --- memories ------------------------------------------------------------------------
    def create_knn_memories(self, batch_size: int) -> KNNMemoryList:
        """One kNN memory per kNN layer, ``batch_size`` rows each, on the model's device
        (in memmap files under ``knn_memories_directory`` when it is set)."""
        cfg = self.config
        return KNNMemoryList.create(
            len(cfg.knn_layers),
            cfg.dim_head,
            cfg.max_knn_memories,
            batch_size,
            cfg.knn_backend,
            cfg.knn_memories_directory,
            self.token_emb.weight.device,
        )

    @contextlib.contextmanager
    def knn_memories_context(self, batch_size: int) -> Iterator[KNNMemoryList]:
        """``with model.knn_memories_context(batch_size=b) as mems:``; cleared on exit."""
        mems = self.create_knn_memories(batch_size)
        try:
            yield mems
        finally:
            mems.clear_memory()

    def init_state(
        self, batch_size: int, knn: KNNMemoryList | None = None, xl: XLMemories | None = None
    ) -> MemorizingCache:
        st = MemorizingCache(knn=knn, depth=self.config.depth, batch_size=batch_size)
        if xl is not None:
            kv = list(xl.kv if isinstance(xl, XLMemories) else xl)
            if len(kv) != len(self.config.xl_layers):
                raise ValueError(
                    f"xl_memories has {len(kv)} entries for {len(self.config.xl_layers)} XL "
                    "layers; pass back what the previous call returned"
                )
            st.xl = {layer: t.detach() for layer, t in zip(self.config.xl_layers, kv)}
            valid = getattr(xl, "valid", None)
            shape = kv[0].shape[:2] if kv else (batch_size, 0)
            ones = torch.ones(shape, dtype=torch.bool, device=self.token_emb.weight.device)
            st.xl_valid = valid.clone() if valid is not None else ones
        return st

    # --- the reference's call: one call = one segment ------------------------------------
    def forward(
        self,
        x: Tensor,  # (b, n) token ids: one segment
        knn_memories: KNNMemoryList | None = None,
        xl_memories: XLMemories | Sequence[Tensor] | None = None,
        labels: Tensor | None = None,  # (b, n)
        add_knn_memory: bool = True,
        doc_start: Tensor | None = None,  # (b,) bool: the row starts a new document here
    ):
        """Logits (b, n, V), or the loss with ``labels``; plus the new XL memories when XL is on."""
        st = self.init_state(x.shape[0], knn_memories, xl_memories)
        logits = self.stream(
            x,
            st,
            segment_len=max(x.shape[1], 1),
            add_knn_memory=add_knn_memory,
            doc_start=doc_start,
        )
        out = logits
        if labels is not None:
            v = logits.shape[-1]
            out = cross_entropy(logits.reshape(-1, v), labels.reshape(-1), self.config.ignore_index)
        return (out, st.xl_memories) if self.config.xl_layers else out

    # --- streaming ----------------------------------------------------------------------
    def stream(
        self,
        ids: Tensor,  # (b, n)
        st: MemorizingCache,
        *,
        segment_len: int | None = None,
        use_memory: bool = True,
        add_knn_memory: bool = True,
        doc_start: Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> Tensor:  # (b, n, V), or (b, logits_to_keep, V)
        """Feed ``ids`` through ``st``, splitting at segment boundaries (every
        ``segment_len`` tokens since the stream's start); a finished segment is written to
        memory. ``use_memory=False``: kNN layers read nothing (the XL memory stays).
        ``logits_to_keep``: the logits of only the last that many tokens; the last layer
        then runs its attention and feed-forward for those alone (a prompt's forward in
        generation: the cache needs every token's pairs, the logits one position)."""
        seg = segment_len or self.config.segment_len
        self._check_boundary_ids(ids, st.pos, seg)
        if doc_start is not None:
            if st.pos != 0:
                raise ValueError(
                    f"doc_start given {st.pos} tokens into a segment: documents start at "
                    f"segment boundaries (every {seg} tokens)"
                )
            st.clear_rows(doc_start.to(torch.bool))
        sos = self.config.clear_memories_on_sos_token_id
        hidden, s, n = [], 0, ids.shape[1]
        first_kept = 0 if logits_to_keep is None else max(n - logits_to_keep, 0)
        while s < n:
            m = min(n - s, seg - st.pos)
            piece = ids[:, s : s + m]
            if st.pos == 0 and sos is not None:
                st.clear_rows(piece[:, 0] == sos)
            need = None if first_kept <= s else min(max(s + m - first_kept, 0), m)
            hidden.append(self._piece(piece, st, use_memory, need))
            if st.pos == seg:
                self._finish_segment(st, add_knn_memory)
            s += m
        if not hidden:
            return self.to_logits(self.norm(self.token_emb(ids[:, first_kept:])))
        return self.to_logits(self.norm(torch.cat(hidden, dim=1)))

    def _check_boundary_ids(self, ids: Tensor, pos: int, seg: int) -> None:
        """sos only as a segment's first token, eos only as its last."""
        cfg = self.config
        where = (pos + torch.arange(ids.shape[1], device=ids.device)) % seg  # (n,)
        for name, tok, allowed in (
            ("clear_memories_on_sos_token_id", cfg.clear_memories_on_sos_token_id, 0),
            ("clear_memories_on_eos_token_id", cfg.clear_memories_on_eos_token_id, seg - 1),
        ):
            if tok is None:
                continue
            bad = torch.nonzero((ids == tok) & (where != allowed)[None])
            if len(bad):
                r, p = bad[0].tolist()
                raise ValueError(
                    f"{name}={tok} at row {r}, position {(pos + p) % seg} of its segment (token "
                    f"{p} of this call; segments of {seg} tokens): it may only be a segment's "
                    f"{'first' if allowed == 0 else 'last'} token; start each document at a "
                    "segment boundary (or pass doc_start=)"
                )

    def _piece(
        self, ids: Tensor, st: MemorizingCache, use_memory: bool, need: int | None = None
    ) -> Tensor:  # (b, m or need, dim)
        """Tokens ``ids`` (b, m) of the current segment, after its ``st.pos`` earlier ones.
        ``need``: the hidden states of only the last ``need`` tokens (0: none)."""
        pad = self.config.pad_id
        ok = ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)
        st.seg_ok = ok if st.seg_ok is None else torch.cat([st.seg_ok, ok], dim=1)
        x = self.token_emb(ids)
        geos: dict[tuple[bool, bool], LocalGeometry] = {}  # (kNN layer, XL): shared per piece
        for i, blk in enumerate(self.layers):
            xl = st.xl.get(self.xl_read[i]) if i in self.xl_read else None
            past, knn = st.seg.get(i), i in self.knn_read
            tail = need if i == len(self.layers) - 1 and need != ids.shape[1] else None
            if tail == 0:  # the last layer, no output wanted: its pairs alone
                kv, x = blk.attn.pairs(blk.norm1(x)), x[:, :0]
                st.seg[i] = kv if past is None else torch.cat([past, kv], dim=1)
                continue
            geo = geos.get((knn, xl is not None))
            if geo is None:
                key_ok = st.seg_ok if xl is None else torch.cat([st.xl_valid, st.seg_ok], dim=1)
                bias = self.knn_rel_pos_bias if knn else self.rel_pos_bias
                geo = geos[knn, xl is not None] = LocalGeometry(key_ok, ids.shape[1], bias)
            g = geo if tail is None else geo.tail(tail)
            if knn:
                mem = st.knn[self.knn_read[i]] if use_memory and st.knn is not None else None
                out, kv = blk.attn(blk.norm1(x), g, xl, past, mem, tail=tail)
            else:
                out, kv = blk.attn(blk.norm1(x), g, xl, past, tail=tail)
            st.seg[i] = kv if past is None else torch.cat([past, kv], dim=1)
            x = (x if tail is None else x[:, x.shape[1] - tail :]) + out
            x = x + blk.ff(blk.norm2(x))
        st.pos += ids.shape[1]
        st.last_ids = ids[:, -1]
        return x

    @torch.no_grad()
    def _finish_segment(self, st: MemorizingCache, add_knn_memory: bool) -> None:
        """The segment's end: write what leaves each XL window (everything without XL) to
        the kNN memories, roll the XL windows, then the eos rule."""
        m = self.config.xl_max_memories
        ok, new_valid = st.seg_ok, None
        for i in range(self.config.depth):
            kv = st.seg[i].detach()
            if i in self.xl_read:  # an XL layer: its own window of the pairs it produced
                old = st.xl.get(i)
                kv = kv if old is None else torch.cat([old.to(kv.dtype), kv], dim=1)
                both = ok if st.xl_valid is None else torch.cat([st.xl_valid, ok], dim=1)
                leave, leave_ok = (
                    kv[:, : max(kv.shape[1] - m, 0)],
                    both[:, : max(kv.shape[1] - m, 0)],
                )
                st.xl[i], new_valid = kv[:, -m:], both[:, -m:]
            else:
                leave, leave_ok = kv, ok
            if i in self.knn_write and add_knn_memory and st.knn is not None:
                st.knn[self.knn_write[i]].add(leave, leave_ok)
        if new_valid is not None:
            st.xl_valid = new_valid
        st.seg, st.seg_ok, st.pos = {}, None, 0
        eos = self.config.clear_memories_on_eos_token_id
        if eos is not None and st.last_ids is not None:
            st.clear_rows(st.last_ids == eos)


class MemorizingLanguageModel(PreTrainedMixin, nn.Module):
    """What ``retrolm train --model memorizing`` builds (``.net`` is the transformer):
    ``model(ids)`` of any length (fresh memories, segments of ``segment_len``),
    ``model(seq, return_loss=True)``, ``model(ids, use_memory=False)``, and streaming through
    ``cache = model.init_cache(b)``: ``model(ids, cache=cache)`` in pieces of any length equals
    one call over the whole."""

    takes_logits_to_keep = True  # registry.plain_logits hands generation's logits_to_keep

    def __init__(self, config: MemorizingConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.net = MemorizingTransformer(config=config, **kwargs)
        self.config = self.net.config
        self.max_seq_len = self.config.max_seq_len
        self.use_memory = True  # the evaluation mode "no_memory" switches it off

    def init_cache(self, batch_size: int) -> MemorizingCache:
        """Fresh kNN and XL memories for ``batch_size`` document streams."""
        return self.net.init_state(batch_size, knn=self.net.create_knn_memories(batch_size))

    def forward(
        self,
        ids: Tensor,  # (b, n), or (b, n + 1) with return_loss
        cache: MemorizingCache | None = None,
        *,
        return_loss: bool = False,
        use_memory: bool = True,
        doc_start: Tensor | None = None,
        logits_to_keep: int | None = None,  # the last that many positions' logits only
    ) -> Tensor:
        inp = ids[:, :-1] if return_loss else ids
        st = cache if cache is not None else self.init_cache(ids.shape[0])
        keep = None if return_loss else logits_to_keep
        logits = self.net.stream(
            inp,
            st,
            use_memory=use_memory and self.use_memory,
            doc_start=doc_start,
            logits_to_keep=keep,
        )
        if not return_loss:
            return logits
        v = logits.shape[-1]
        return cross_entropy(
            logits.reshape(-1, v), ids[:, 1:].reshape(-1), self.config.ignore_index
        )
