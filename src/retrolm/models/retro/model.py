"""RETRO: a decoder that reads retrieved neighbours through chunked cross-attention.

Borgeaud et al. 2022, "Improving language models by retrieving from trillions of tokens".

Notation: b batch, n sequence length, m chunk size, l = n // m complete chunks,
k neighbours per chunk, r = 2m retrieved tokens per neighbour (chunk + continuation),
d decoder width, e encoder width.

Decoder layer p (Algorithm 1 of the paper):
    H <- ATTN(H)
    if p == min(P): E <- ENCODER(RET, H)       # neighbours conditioned on their chunk's states
    if p in P:      H <- CCA(H, E)             # chunked cross-attention
    H <- FFW(H)

Chunked cross-attention (paper §2.4): position ``u*m + m-1 … u*m + 2m-2`` attends E_u, the
encoded neighbours of chunk u; positions ``0 … m-2`` attend nothing (zero update); the last
chunk's neighbours serve the tail of a sequence that is not a multiple of m. This is causal:
E_u depends on chunk u's tokens only, and its first reader, position u*m + m-1, has seen them.
Relative positions (paper App. B.1.2): queries sit at ``m-1+j``, neighbour tokens at ``t``; the
query table is offset exactly once (RETRO-pytorch offsets it twice, its bug B1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from retrolm.models.pretrained import PreTrainedMixin
from retrolm.models.retro import fused
from retrolm.models.retro.cache import RetroCache
from retrolm.models.retro.config import RetroConfig
from retrolm.models.retro.copy_head import NeighbourCopyHead
from retrolm.nn.attention import attend
from retrolm.nn.decode_linear import DecodeLinear
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.losses import linear_cross_entropy
from retrolm.nn.multihead import MultiHeadAttention
from retrolm.nn.norms import make_norm
from retrolm.nn.residual import Residual, deepnet_constants, deepnet_init_
from retrolm.nn.rotary import RotaryEmbedding, apply_rotary


class ChunkedCrossAttention(nn.Module):
    """CCA: queries of chunk u's attending window read the k·r encoded neighbour tokens E_u."""

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        c = config
        self.m = c.chunk_size
        self.attn = MultiHeadAttention(
            c.dec_dim, c.heads, c.dim_head, context_dim=c.enc_dim, dropout=c.dec_attn_dropout
        )

    def project(self, enc: Tensor, k_rotary) -> tuple[Tensor, Tensor]:
        """Encoded neighbours (b, L, k, r, e) -> keys/values (b, L, h, k*r, dh), rotated."""
        b, L, k, r, _ = enc.shape
        kk, vv = self.attn.project_kv(rearrange(enc, "b L k r e -> (b L k) r e"), k_rotary)
        kk = rearrange(kk, "(b L k) h r d -> b L h (k r) d", b=b, L=L)
        vv = rearrange(vv, "(b L k) h r d -> b L h (k r) d", b=b, L=L)
        return kk, vv

    def forward(
        self,
        h: Tensor,  # (b, t, d) normalised hidden states of positions start … start+t-1
        start: int,
        kv: tuple[Tensor, Tensor] | None,  # each (b, L, h, k*r, dh) for chunks 0 … L-1
        kv_mask: Tensor | None,  # (b, L, k*r) True = real neighbour token
        q_rotary,  # (cos, sin) for query positions m-1 … 2m-2, shape (m, rot)
        full_chunks: list[bool] | None = None,  # chunk u has every neighbour token: no mask
    ) -> Tensor:  # (b, t, d); zero where a position attends no chunk
        m, (b, t, _) = self.m, h.shape
        # position p attends chunk u(p) = (p+1)//m - 1; u < 0 (p < m-1) attends nothing, and
        # those positions come first (u is monotonic). Plain integers: no tensor work here.
        first = min(max(m - 1 - start, 0), t)
        if first == t:
            return h.new_zeros(b, t, self.attn.out_proj.out_features)
        u0, u1 = (start + first + 1) // m - 1, (start + t) // m - 1
        if kv is None or u1 >= kv[0].shape[1]:
            raise ValueError(
                f"position {start + t - 1} needs the neighbours of chunk {u1}, but only "
                f"{0 if kv is None else kv[0].shape[1]} chunks were encoded"
            )
        lead = (start + first - (m - 1)) % m  # slot of the first query inside its window
        n_q = t - first
        if u0 == u1:  # all queries read one chunk (every decoding step): no padding
            cos, sin = q_rotary[0][lead : lead + n_q], q_rotary[1][lead : lead + n_q]
            full = full_chunks is not None and full_chunks[u0]  # then SDPA needs no mask
            mask = None if full else kv_mask[:, u0]
            q_in = h if first == 0 else h[:, first:]
            o = self._attend(q_in, (cos, sin), kv[0].select(1, u0), kv[1].select(1, u0), mask)
        else:  # pad to whole attending windows, one row of the batch per (sequence, chunk)
            nc = u1 - u0 + 1
            q_in = F.pad(h[:, first:], (0, 0, lead, nc * m - lead - n_q))  # (b, nc*m, d)
            q_in = rearrange(q_in, "b (c j) d -> (b c) j d", j=m)
            kk, vv = (rearrange(x[:, u0 : u1 + 1], "b c h s d -> (b c) h s d") for x in kv)
            mask = rearrange(kv_mask[:, u0 : u1 + 1], "b c s -> (b c) s")
            o = self._attend(q_in, q_rotary, kk, vv, mask)
            o = rearrange(o, "(b c) j d -> b (c j) d", b=b)[:, lead : lead + n_q]
        if first == 0:
            return o
        return torch.cat((o.new_zeros(b, first, o.shape[-1]), o), 1)

    def _attend(self, q_in, q_rotary, kk, vv, mask) -> Tensor:
        """q_in (B, j, d) against one chunk's kk/vv (B, h, s, dh), mask (B, s) or None (all
        present) -> (B, j, d)."""
        attn, (B, j, _) = self.attn, q_in.shape
        q = attn.q_proj(q_in)
        # (B, j, h dh) -> (B, h, j, dh); for one query (a decoding step) a view either way
        q = q.view(B, attn.heads, 1, -1) if j == 1 else q.unflatten(-1, (attn.heads, -1))
        q = apply_rotary(q if j == 1 else q.transpose(1, 2), *q_rotary)
        p = attn.dropout if self.training else 0.0
        # rows of a chunk without neighbours -> 0
        mask = None if mask is None else mask[:, None, None, :]
        o = attend(q, kk, vv, mask, dropout_p=p)  # (B, h, j, dh)
        return attn.out_proj(o.view(B, 1, -1) if j == 1 else o.transpose(1, 2).flatten(2))


def _feed_forward(c: RetroConfig, dim: int, dropout: float, alpha: float) -> Residual:
    """The feed-forward sub-layer of an encoder or decoder layer (pre-norm, or post-norm
    with DeepNet's residual scale ``alpha``)."""
    ff = FeedForward(dim, c.ff_mult, glu=c.ff_glu, dropout=dropout)
    return Residual(dim, ff, c.norm, post_norm=c.use_deepnet, alpha=alpha)


class EncoderLayer(nn.Module):
    def __init__(self, config: RetroConfig, cross: bool, alpha: float) -> None:
        super().__init__()
        c, post = config, config.use_deepnet
        self.self_attn = Residual(
            c.enc_dim,
            MultiHeadAttention(c.enc_dim, c.heads, c.dim_head, dropout=c.enc_attn_dropout),
            c.norm,
            post_norm=post,
            alpha=alpha,
        )
        self.cross_attn = (
            Residual(
                c.enc_dim,
                MultiHeadAttention(
                    c.enc_dim,
                    c.heads,
                    c.dim_head,
                    context_dim=c.dec_dim,
                    dropout=c.enc_attn_dropout,
                ),
                c.norm,
                post_norm=post,
                alpha=alpha,
            )
            if cross
            else None
        )
        self.ff = _feed_forward(c, c.enc_dim, c.enc_ff_dropout, alpha)


class RetroEncoder(nn.Module):
    """Bidirectional encoder over each retrieved neighbour, conditioned on its chunk.

    Cross-attention positions (paper App. B.1.2): neighbour token i' against data token i
    at relative distance i' - i, i.e. neighbour tokens at 0 … r-1, chunk tokens at 0 … m-1.
    """

    def __init__(
        self, config: RetroConfig, alpha: float, token_emb: nn.Module | None = None
    ) -> None:
        """``token_emb``: ids (..., r) -> (..., r, enc_dim) to read neighbours through (a
        RETRO-fitted decoder's frozen embedding); None = an embedding of the encoder's own."""
        super().__init__()
        c = config
        self.config = c
        self.token_emb = token_emb or nn.Embedding(c.num_tokens, c.enc_dim)
        self.context_norm = make_norm(c.norm, c.dec_dim)
        self.layers = nn.ModuleList(
            EncoderLayer(c, cross=(i + 1) in c.enc_cross_attn_layers, alpha=alpha)
            for i in range(c.enc_depth)
        )
        self.final_norm = nn.Identity() if c.use_deepnet else make_norm(c.norm, c.enc_dim)

    def forward(
        self,
        retrieved: Tensor,  # (b, L, k, r) token ids
        token_mask: Tensor,  # (b, L, k, r) True = real token of a present neighbour
        chunk_states: Tensor,  # (b, L, m, d) decoder states of each chunk (layer min(P))
        rotary: RotaryEmbedding,
    ) -> Tensor:  # (b, L, k, r, e)
        b, L, k, r = retrieved.shape
        m = chunk_states.shape[2]
        x = self.token_emb(rearrange(retrieved, "b L k r -> (b L k) r"))
        keep = rearrange(token_mask, "b L k r -> (b L k) r")
        ctx = repeat(self.context_norm(chunk_states), "b L m d -> (b L k) m d", k=k)
        pos_r = rotary.span(0, r, x.device)
        pos_m = rotary.span(0, m, x.device)
        for layer in self.layers:
            x = layer.self_attn(x, mask=keep, q_rotary=pos_r, k_rotary=pos_r)
            if layer.cross_attn is not None:
                x = layer.cross_attn(x, ctx, q_rotary=pos_r, k_rotary=pos_m)
            x = layer.ff(x)
        return rearrange(self.final_norm(x), "(b L k) r e -> b L k r e", b=b, L=L)


class DecoderLayer(nn.Module):
    def __init__(self, config: RetroConfig, cca: bool, alpha: float) -> None:
        super().__init__()
        c, post = config, config.use_deepnet
        self.self_attn = Residual(
            c.dec_dim,
            MultiHeadAttention(
                c.dec_dim, c.heads, c.dim_head, dropout=c.dec_attn_dropout, causal=True
            ),
            c.norm,
            post_norm=post,
            alpha=alpha,
        )
        self.cca = (
            Residual(c.dec_dim, ChunkedCrossAttention(c), c.norm, post_norm=post, alpha=alpha)
            if cca
            else None
        )
        self.ff = _feed_forward(c, c.dec_dim, c.dec_ff_dropout, alpha)


class RETRO(PreTrainedMixin, nn.Module):
    """The RETRO language model. Accepts the seed API's keyword arguments, a ``config``, or
    both (the keywords override the config's fields)."""

    def __init__(self, config: RetroConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = c = RetroConfig.resolve(config, kwargs)
        self.max_seq_len = c.max_seq_len
        self.cca_layers = c.dec_cross_attn_layers
        enc_dn, dec_dn = deepnet_constants(c.enc_depth, c.dec_depth)
        dec_alpha = dec_dn.alpha if c.use_deepnet else 1.0
        enc_alpha = enc_dn.alpha if c.use_deepnet else 1.0
        self.token_emb = nn.Embedding(c.num_tokens, c.dec_dim)
        self.rotary = RotaryEmbedding(c.head_rotary_dim)
        self.encoder = RetroEncoder(c, enc_alpha)
        self.layers = nn.ModuleList(
            DecoderLayer(c, cca=(i + 1) in c.dec_cross_attn_layers, alpha=dec_alpha)
            for i in range(c.dec_depth)
        )
        self.final_norm = nn.Identity() if c.use_deepnet else make_norm(c.norm, c.dec_dim)
        self.to_logits = DecodeLinear(c.dec_dim, c.num_tokens, bias=False)
        self._init_weights()
        self.copy_head = (
            NeighbourCopyHead(c.dec_dim, c.chunk_size, c.copy_max_match) if c.copy_head else None
        )
        if c.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight
        if c.share_embeddings:
            self.encoder.token_emb.weight = self.token_emb.weight
        if c.use_deepnet:
            deepnet_init_(self.layers, dec_dn.beta)
            deepnet_init_(self.encoder.layers, enc_dn.beta)

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        seq: Tensor,  # (b, n+1) with return_loss, else (b, n)
        retrieved: Tensor | None = None,  # (b, l, k, 2m) or None = no retrieval
        *,
        neighbour_mask: Tensor | None = None,  # (b, l, k) bool, True = present
        return_loss: bool = False,
        cache: RetroCache | None = None,
        logits_to_keep: int | None = None,  # logits of the last n positions only
    ) -> Tensor:
        if retrieved is not None and retrieved.dim() == 3:  # (b, l, 2m): one neighbour per chunk
            retrieved = retrieved[:, :, None]
            if neighbour_mask is not None and neighbour_mask.dim() == 2:
                neighbour_mask = neighbour_mask[:, :, None]
        if return_loss:
            if cache is not None:
                raise ValueError("return_loss cannot be combined with a generation cache")
            seq, labels = seq[:, :-1], seq[:, 1:]
        self._check_inputs(seq, retrieved, neighbour_mask, cache)
        start = cache.length if cache is not None else 0
        copying = self.copy_head is not None and self.copy_head.enabled and retrieved is not None
        if copying:  # the latest tokens at each position, before the cache moves on
            tail = cache.copy_tail if cache is not None else None
            windows, tail = self.copy_head.context(seq, tail)
            if cache is not None:
                cache.copy_tail = tail
        hidden = self._decode(seq, retrieved, neighbour_mask, cache)  # (b, n, d)
        if not return_loss:
            keep = hidden.shape[1] if logits_to_keep is None else logits_to_keep
            if keep != hidden.shape[1]:  # decoding needs one row, not (n, vocab)
                hidden = hidden[:, hidden.shape[1] - keep :]
            logits = self.to_logits(hidden)
            if not copying:
                return logits
            t = seq.shape[1]
            return self._copy(
                hidden, logits, windows[:, t - keep :], start + t - keep, retrieved, neighbour_mask
            )
        if copying:  # the fused loss per token, then the mixture at the targets only
            pad = self.config.pad_id
            nll = linear_cross_entropy(
                hidden, self.to_logits.weight, labels, ignore_index=pad, reduction="none"
            )
            positions, token_mask = self._copy_inputs(start, hidden, retrieved, neighbour_mask)
            logp = self.copy_head.target_log_prob(
                hidden, -nll, labels, windows, positions, retrieved, token_mask
            )
            valid = labels != pad
            return -(logp * valid).sum() / valid.sum().clamp(min=1)
        # fused projection + cross-entropy: the (b, n, vocab) logits are never all stored
        return linear_cross_entropy(
            hidden, self.to_logits.weight, labels, ignore_index=self.config.pad_id
        )

    def _copy(self, hidden, logits, windows, first, retrieved, neighbour_mask) -> Tensor:
        """The copy head's log-probabilities for positions first, first+1, ... (b, t, V)."""
        positions, token_mask = self._copy_inputs(first, hidden, retrieved, neighbour_mask)
        return self.copy_head(hidden, logits, windows, positions, retrieved, token_mask)

    def _copy_inputs(
        self, first: int, hidden: Tensor, retrieved: Tensor, neighbour_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """What the copy head reads besides the states: the absolute positions of hidden's t
        rows (t,) and the real neighbour tokens (``_neighbour_tokens``)."""
        positions = torch.arange(first, first + hidden.shape[1], device=hidden.device)
        return positions, self._neighbour_tokens(retrieved, neighbour_mask)

    def _neighbour_tokens(self, retrieved: Tensor, neighbour_mask: Tensor | None) -> Tensor:
        """(b, l, k, r) True where a neighbour token is real (not padding, not missing)."""
        token_mask = retrieved != self.config.pad_id
        if neighbour_mask is not None:
            token_mask = token_mask & neighbour_mask[..., None]
        return token_mask

    def init_cache(self, batch_size: int) -> RetroCache:
        """A fresh cache for incremental decoding (``forward(..., cache=cache)``)."""
        del batch_size  # buffers are allocated on first use, with the input's shape
        return RetroCache(self_attn=[KVCache() for _ in self.layers])

    # ------------------------------------------------------------------ internals
    def _check_inputs(self, seq, retrieved, neighbour_mask, cache) -> None:
        c = self.config
        if seq.dim() != 2:
            raise ValueError(f"seq must be (batch, length) token ids, got shape {tuple(seq.shape)}")
        start = cache.length if cache is not None else 0
        end = start + seq.shape[1]
        if end > c.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len ({c.max_seq_len})")
        if retrieved is None:
            if neighbour_mask is not None:
                raise ValueError("neighbour_mask given without retrieved neighbours")
            return
        need = end // c.chunk_size
        b = seq.shape[0]
        if (
            retrieved.dim() != 4
            or retrieved.shape[0] != b
            or retrieved.shape[1] < need
            or retrieved.shape[3] != c.retrieved_len
        ):
            expected = f"(batch={b}, chunks>={need}, neighbours, {c.retrieved_len})"
            raise ValueError(f"retrieved must have shape {expected}, got {tuple(retrieved.shape)}")
        if neighbour_mask is not None and neighbour_mask.shape != retrieved.shape[:3]:
            raise ValueError(
                f"neighbour_mask must have shape {tuple(retrieved.shape[:3])} "
                f"(batch, chunks, neighbours), got {tuple(neighbour_mask.shape)}"
            )

    def _decode(self, seq, retrieved, neighbour_mask, cache: RetroCache | None) -> Tensor:
        c = self.config
        start = cache.length if cache is not None else 0
        t = seq.shape[1]
        if t == 1 and cache is not None and fused.step_ok(self, start, retrieved, cache):
            return fused.decode_step(self, seq, retrieved is not None, cache)
        pos = self.rotary.span(start, t, seq.device)
        q_cca = self.rotary.span(c.chunk_size - 1, c.chunk_size, seq.device)
        x = self.token_emb(seq)
        enc_kv: tuple[Tensor, Tensor] | None = None  # encoded neighbours + mask for this call
        for i, layer in enumerate(self.layers):
            layer_no = i + 1
            kv_cache = cache.self_attn[i] if cache is not None else None
            x = layer.self_attn(x, cache=kv_cache, q_rotary=pos, k_rotary=pos)
            if layer_no == self.cca_layers[0] and retrieved is not None:
                enc_kv = self._encode(x, retrieved, neighbour_mask, start, cache)
            if layer.cca is not None:
                if retrieved is None:
                    x = layer.cca.zero_update(x)
                else:
                    kv, mask = self._cca_kv(layer_no, layer, enc_kv, cache)
                    full = cache.cca_full if cache is not None else None
                    x = layer.cca(x, start, kv, mask, q_cca, full)
            x = layer.ff(x)
        if cache is not None:
            cache.length += t
        return self.final_norm(x)

    def _encode(self, h, retrieved, neighbour_mask, start, cache):
        """Encode the neighbours of every chunk completed so far that is not yet encoded.

        h: (b, t, d) states after the first CCA layer's self-attention. Returns
        (encoded (b, L, k, r, e), token mask (b, L, k*r)) for the new chunks.
        """
        m = self.config.chunk_size
        pieces = [h] if cache is None else [*cache.chunk_states, h]
        first = 0 if cache is None else cache.encoded_chunks  # pieces start at chunk `first`
        done = (start + h.shape[1]) // m  # complete chunks so far
        new = done - first
        if new <= 0:  # (a decoding step inside a chunk: keep the piece, no tensor work)
            if cache is not None:
                cache.chunk_states = pieces
            return None
        states = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        if cache is not None:  # keep only the states of the unfinished chunk
            rest = states[:, new * m :]
            cache.chunk_states = [rest] if rest.shape[1] else []
            cache.encoded_chunks = done
        chunk_states = rearrange(states[:, : new * m], "b (L m) d -> b L m d", m=m)
        ret = retrieved[:, first:done]
        sub_mask = None if neighbour_mask is None else neighbour_mask[:, first:done]
        token_mask = self._neighbour_tokens(ret, sub_mask)
        enc = self.encoder(ret, token_mask, chunk_states, self.rotary)
        return enc, rearrange(token_mask, "b L k r -> b L (k r)")

    def _cca_kv(self, layer_no, layer, enc_kv, cache):
        """Keys/values of all encoded chunks for this CCA layer (projected once per chunk)."""
        new_kv = new_mask = None
        if enc_kv is not None:
            enc, new_mask = enc_kv
            k_rotary = self.rotary.span(0, self.config.retrieved_len, enc.device)
            new_kv = layer.cca.fn.project(enc, k_rotary)
        if cache is None:
            return new_kv, new_mask
        if new_kv is not None:
            if layer_no in cache.cca_kv:
                old_k, old_v = cache.cca_kv[layer_no]
                new_kv = (torch.cat((old_k, new_kv[0]), 1), torch.cat((old_v, new_kv[1]), 1))
            cache.cca_kv[layer_no] = new_kv
            if layer_no == self.cca_layers[0]:
                cache.cca_mask = (
                    new_mask if cache.cca_mask is None else torch.cat((cache.cca_mask, new_mask), 1)
                )
                cache.cca_full += new_mask.all(-1).all(0).tolist()  # one sync per chunk
        if layer_no not in cache.cca_kv:  # no chunk complete yet: no position attends
            return None, None
        return cache.cca_kv[layer_no], cache.cca_mask
