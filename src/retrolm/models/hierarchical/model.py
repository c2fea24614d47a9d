"""Simple Hierarchical Transformer: several compressed token streams, merged at every layer.

The idea (closest published work: the Hourglass transformer, Nawrot et al., arXiv 2110.13711):
next to the full-resolution token stream, run transformer blocks on *compressed* streams in
which one token summarises the last ``c`` positions, and at every layer pool all streams back
into the stream that predicts the next token. Coarse streams see far with few tokens; the
fine stream keeps every detail.

Notation: b batch, n positions, hierarchy k with factor c, stride s, a = c / s interleaved
sub-sequences, m = ceil(n / s) compressed tokens, d its width, D = max(d) embedding width.

::

    ids ─ emb (b,n,D) ─┬─ downsample c=1 ─► stream 1 (b,n,d1) ─ block ─┬─ +pool ─► … ─► logits
                       ├─ downsample c=2 ─► stream 2 (b,n,d2) ─ block ─┤      ▲
                       └─ downsample c=8 ─► stream 8 (b,n,d8) ─ block ─┴─ merge: MLP(cat(
                                                                   repeat each stream s times))

* **Compression** (``nn.CausalDownsample``): token j of a stream covers positions
  ``[j*s - c + 1, j*s]``, so it is aligned with the last position it covers and never sees
  the future.
* **Blocks**: with stride s < c neighbouring compressed tokens overlap, so each stream is
  split into ``a = c / s`` interleaved sub-sequences (token j goes to sub-sequence j mod a);
  inside one sub-sequence consecutive tokens cover adjacent, non-overlapping windows.
  Attention (full, an exact sliding window of w sub-sequence tokens, or none when w = 0) and
  the feed-forward run inside each sub-sequence, both on token-shifted inputs (half the
  channels come from the previous token of the same sub-sequence, i.e. a stream tokens back).
* **Merge**: every stream is repeated s times along the sequence (``nn.repeat_upsample``:
  token j serves positions ``j*s … j*s+s-1``, all after the last position it covers, so the
  merge stays causal), concatenated, and an MLP adds the result to the predicting stream (or,
  with ``hierarchy_merge_all``, to every stream at its own positions).
* **Losses**: next-token CE from the predicting stream, plus ``recon`` (each compressed token
  reconstructs the c tokens it covers) and ``ar`` (each compressed token predicts the next
  one, 1 - cosine, target detached by default).
* **Generation** (``init_cache`` / ``forward(x, cache=...)``): each stream caches its own
  keys/values per sub-sequence, the token-shift inputs and its latest token; a stream with
  stride s gets a new compressed token every s steps, and between them the merge reuses the
  latest one, exactly as the repeat in the full forward does.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrolm.models.autoregressive import AutoregressiveWrapper
from retrolm.models.hierarchical import fused
from retrolm.models.hierarchical.cache import BlockState, HierarchicalCache
from retrolm.models.hierarchical.config import PRESETS, HierarchicalConfig
from retrolm.models.pretrained import PreTrainedMixin
from retrolm.nn import (
    CausalDownsample,
    DecodeLinear,
    FeedForward,
    KVCache,
    MultiHeadAttention,
    Residual,
    RotaryEmbedding,
    attention_backend,
    cross_entropy,
    make_norm,
    norm_shift,
    repeat_upsample,
    token_shift,
    token_shift_cached,
)

log = logging.getLogger(__name__)

__all__ = ["HierarchicalConfig", "HierarchicalTransformer", "PRESETS", "hierarchical_loss"]

COMPRESS_EXPANSION = 4  # hidden width of the compression conv, as a multiple of D


def _shift(h: Tensor, shifts: tuple[int, int], state: BlockState | None, slot: str) -> Tensor:
    """Token shift; with a state, continue from (and update) the inputs it holds."""
    if state is None:
        return token_shift(h, shifts)
    out, past = token_shift_cached(h, shifts, getattr(state, slot))
    setattr(state, slot, past)
    return out


class SubsequenceAttention(nn.Module):
    """Causal attention inside each of the ``a`` interleaved sub-sequences of a stream."""

    def __init__(self, dim: int, heads: int, dim_head: int, window: int | None, axial: int):
        super().__init__()
        self.axial = axial
        self.shifts = (0, axial)
        self.attn = MultiHeadAttention(dim, heads, dim_head, causal=True, window=window)
        self.rotary = RotaryEmbedding(dim_head)

    slot = "attn_shift"  # where a BlockState keeps this sub-layer's token-shift inputs

    def forward(
        self,
        h: Tensor,
        state: BlockState | None = None,
        index: int | None = None,
        shifted: bool = False,
    ) -> Tensor:  # (b, m, d) normed stream -> (b, m, d)
        """``shifted``: h is already token-shifted (``HierarchicalBlock`` did it with the
        norm, ``nn.norms.norm_shift``), and, when a > 1, already split into its
        sub-sequences, ((b a), m / a, d)."""
        if not shifted:
            h = _shift(h, self.shifts, state, self.slot)
        a = self.axial
        if index is not None:  # one new token: stream index ``index``
            rot = self.rotary.span(index // a, 1, h.device)  # cached table rows
            return self.attn(h, cache=state.kv[index % a], q_rotary=rot, k_rotary=rot)
        if shifted:
            m = h.shape[1] * a
        else:
            m = h.shape[1]
            if m % a:
                h = F.pad(h, (0, 0, 0, (-m) % a))  # right padding: future positions only
            h = rearrange(h, "b (q a) d -> (b a) q d", a=a)
        rot = self.rotary(torch.arange(h.shape[1], device=h.device))
        k, v = self.attn.project_kv(h, rot)  # ((b a), g, q, dh)
        out = self.attn(h, kv=(k, v), q_rotary=rot)
        if state is not None:
            state.kv = self._fill_caches(k, v, m)
        return rearrange(out, "(b a) q d -> b (q a) d", a=a)[:, :m]

    def _fill_caches(self, k: Tensor, v: Tensor, m: int) -> list[KVCache]:
        """Per-sub-sequence caches from a prefill, without the right padding."""
        a, window = self.axial, self.attn.window
        k = rearrange(k, "(b a) g q d -> a b g q d", a=a)
        v = rearrange(v, "(b a) g q d -> a b g q d", a=a)
        caches = []
        for r in range(a):
            cache, real = KVCache(), -(-(m - r) // a)  # tokens r, r + a, … below m
            if real > 0:
                cache.update(k[r, ..., :real, :], v[r, ..., :real, :])
                if window is not None:
                    cache.keep_last(window - 1)
            caches.append(cache)
        return caches


class ShiftedFeedForward(nn.Module):
    def __init__(self, dim: int, mult: float, axial: int):
        super().__init__()
        self.shifts = (0, axial)
        self.ff = FeedForward(dim, mult, activation="gelu", bias=False)

    slot = "ff_shift"

    # signature twin of SubsequenceAttention.forward (deliberate): HierarchicalBlock calls
    # both sub-layers alike
    def forward(
        self,
        h: Tensor,
        state: BlockState | None = None,
        index: int | None = None,
        shifted: bool = False,
    ):
        return self.ff(h if shifted else _shift(h, self.shifts, state, self.slot))


class HierarchicalBlock(nn.Module):
    """One layer of one hierarchy: pre-norm attention (unless window 0), then feed-forward."""

    def __init__(self, cfg: HierarchicalConfig, k: int):
        super().__init__()
        dim, window = cfg.dim[k], cfg.window_sizes[k]
        axial = cfg.hierarchies[k] // cfg.hierarchical_stride[k]
        self.attn = None
        if window != 0:
            sub = SubsequenceAttention(dim, cfg.heads[k], cfg.dim_head[k], window, axial)
            self.attn = Residual(dim, sub, "rms")
        self.ff = Residual(dim, ShiftedFeedForward(dim, cfg.ff_mult[k], axial), "rms")

    def forward(
        self,
        x: Tensor,
        state: BlockState | None = None,
        index: int | None = None,
        tail: int | None = None,
    ):
        """``tail``: the feed-forward runs on the last ``tail`` positions only (a prefill's
        last layer, where only the last position's output is read: with ``tail`` = the
        token-shift distance + 1 that output and the shift state are exact; the other rows
        returned are not)."""
        if self.attn is not None:
            x = self._sublayer(self.attn, x, state, index)
        if tail is not None:
            x = x[:, -tail:]
        return self._sublayer(self.ff, x, state, index)

    @staticmethod
    def _sublayer(res: Residual, x: Tensor, state: BlockState | None, index: int | None):
        """x + fn(token_shift(norm(x))); over whole sequences (training, a prompt) the norm
        and the shift are one ``norm_shift`` call, which under autocast also hands the
        matmuls their bf16 input and, for attention, writes each sub-sequence into its own
        rows. A prompt's state keeps the last normed rows, as ``token_shift_cached`` would.
        Steps, and attention over a length its sub-sequences do not divide, take the
        modules' own path."""
        fn, a = res.fn, res.fn.shifts[1]  # (the shift distance is the sub-sequence count)
        attention = isinstance(fn, SubsequenceAttention)
        if (
            index is not None
            or (state is not None and getattr(state, fn.slot) is not None)
            or (attention and x.shape[1] % a)
        ):
            return res(x, state=state, index=index)
        if state is not None:  # only the state: the last a normed rows (zeros before them)
            _shift(res.norm(x[:, -a:]), fn.shifts, state, fn.slot)
        h = norm_shift(x, res.norm, a, axial=a if attention else 1)
        return x + fn(h, state=state, shifted=True)


class Merge(nn.Sequential):
    """(norm, feed-forward) pooling the streams into one: ``ff(norm(x))``, the norm through
    ``norm_shift`` (see ``HierarchicalBlock._sublayer``; no shift here: the norm alone, one
    kernel each way). A Sequential, so its weights keep their names; called through its own
    forward, so a sharded (FSDP) unit gathers them first."""

    def forward(self, x: Tensor) -> Tensor:  # (b, n, sum(d)) -> (b, n, d_out)
        norm, ff = self
        return ff(norm_shift(x, norm, 0))


class HierarchicalTransformer(PreTrainedMixin, nn.Module):
    """The seed's keyword API over :class:`HierarchicalConfig` (or ``config=`` directly)."""

    def __init__(self, config: HierarchicalConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = HierarchicalConfig.resolve(config, kwargs)
        self.max_seq_len = cfg.seq_len
        dims, hs, strides = cfg.dim, cfg.hierarchies, cfg.hierarchical_stride
        emb_dim, pi = max(dims), cfg.predict_index
        self.token_emb = nn.Embedding(cfg.num_tokens, emb_dim)
        self.compress = nn.ModuleList(
            CausalDownsample(emb_dim, d, c, s, COMPRESS_EXPANSION)
            for d, c, s in zip(dims, hs, strides)
        )
        self.compress_norms = nn.ModuleList(make_norm("layer", d) for d in dims)
        self.layers = nn.ModuleList(
            nn.ModuleList(HierarchicalBlock(cfg, k) for k in range(len(hs)))
            for _ in range(cfg.depth)
        )
        merge_out = sum(dims) if cfg.hierarchy_merge_all else dims[pi]
        self.merges = nn.ModuleList()
        if len(hs) > 1:
            for _ in range(cfg.depth):
                ff = FeedForward(
                    sum(dims), hidden_dim=2 * merge_out, dim_out=merge_out, activation="silu"
                )
                self.merges.append(Merge(make_norm("rms", sum(dims)), ff))
        self.final_norms = nn.ModuleList(make_norm("layer", d) for d in dims)
        logit_in = sum(dims) if cfg.predict_use_all_hierarchy else dims[pi]
        self.to_logits = DecodeLinear(logit_in, cfg.num_tokens, bias=False)
        compressed = [k for k, c in enumerate(hs) if c > 1]
        self.recon_heads = nn.ModuleDict()
        if cfg.recon_loss_weight > 0:
            for k in compressed:
                self.recon_heads[str(k)] = nn.Linear(dims[k], hs[k] * cfg.num_tokens, bias=False)
        self.ar_heads = nn.ModuleDict()
        if cfg.hierarchical_ar_loss_weight > 0:
            for k in compressed:
                self.ar_heads[str(k)] = nn.Linear(dims[k], dims[k])

    # ----------------------------------------------------------------- full forward

    def forward(
        self,
        ids: Tensor,
        return_loss: bool = False,
        cache: HierarchicalCache | None = None,
        logits_to_keep: int | None = None,
    ):
        """ids (b, n) -> logits (b, n, V); with ``return_loss`` ids has n + 1 tokens and the
        result is ``loss, (ce, recon, ar)``; with ``cache`` only the new tokens' logits, and
        with ``logits_to_keep`` only those of the last that many (a prompt's forward with
        ``logits_to_keep=1`` skips the last layer's feed-forwards and merge for every
        position but the last: generation reads nothing else)."""
        if cache is not None:
            with self._attention_scope():
                return self._forward_cached(ids, cache, logits_to_keep)
        labels = None
        if return_loss:
            ids, labels = ids[:, :-1], ids[:, 1:]
        self._check_length(ids.shape[1])
        with self._attention_scope():
            embeds = self._encode(ids)
            logits = self._logits(embeds, ids.shape[1])
        if labels is None:
            return logits if logits_to_keep is None else logits[:, -logits_to_keep:]
        return self._losses(logits, labels, embeds, ids)

    def _attention_scope(self):
        if self.config.use_flash_attn:
            return contextlib.nullcontext()  # whatever backend the caller chose (SDPA default)
        return attention_backend("reference")

    def _check_length(self, n: int) -> None:
        if n > self.config.seq_len:
            raise ValueError(
                f"input has {n} tokens but seq_len is {self.config.seq_len}; "
                "shorten the input or build the model with a larger seq_len"
            )

    def _encode(
        self, ids: Tensor, cache: HierarchicalCache | None = None, last_only: bool = False
    ) -> list[Tensor]:
        """ids (b, n) -> final normed stream of every hierarchy, each (b, m_k, d_k); with
        ``last_only`` (a prefill, not ``hierarchy_merge_all``) each stream's last token only,
        (b, 1, d_k): the last layer's feed-forwards and merge skip the other positions."""
        n = ids.shape[1]
        x = self.token_emb(ids)  # (b, n, D)
        if cache is not None:
            c = cache.window.shape[1]
            cache.window = torch.cat((cache.window, x), dim=1)[:, -c:]
        # a compression conv over embeddings costs n*c*D*hidden; with fewer vocabulary entries
        # than positions it is cheaper per entry (CausalDownsample.forward_embedded)
        table = self.token_emb.weight if self.token_emb.num_embeddings < n else None
        tokens = []
        for comp, norm in zip(self.compress, self.compress_norms):
            per_entry = table is not None and comp.conv is not None
            tokens.append(norm(comp.forward_embedded(ids, table) if per_entry else comp(x)))
        depth = len(self.layers)
        for layer_idx, layer in enumerate(self.layers):
            states = cache.blocks[layer_idx] if cache is not None else [None] * len(tokens)
            if last_only and layer_idx == depth - 1:
                # the feed-forward's token shift reads `axial` rows back: one more row
                tokens = [
                    blk(t, state=st, tail=blk.ff.fn.shifts[1] + 1)[:, -1:]
                    for blk, t, st in zip(layer, tokens, states)
                ]
                if cache is not None:
                    cache.latest[layer_idx] = tokens
                if self.merges:  # the last position reads each stream's last token
                    pooled = self.merges[layer_idx](torch.cat(tokens, dim=-1))
                    pi = self.config.predict_index
                    tokens[pi] = tokens[pi] + pooled
                break
            tokens = [blk(t, state=st) for blk, t, st in zip(layer, tokens, states)]
            if cache is not None:
                cache.latest[layer_idx] = [t[:, -1:] for t in tokens]
            if self.merges:
                tokens = self._merge(layer_idx, tokens, n)
        return [norm(t) for norm, t in zip(self.final_norms, tokens)]

    def _merge(self, layer_idx: int, tokens: list[Tensor], n: int) -> list[Tensor]:
        """Pool every stream (repeated to length n) into the predicting stream, or into all."""
        strides = self.config.hierarchical_stride
        cat = torch.cat([repeat_upsample(t, s, n) for t, s in zip(tokens, strides)], dim=-1)
        pooled = self.merges[layer_idx](cat)  # (b, n, d_pred or sum(d))
        if self.config.hierarchy_merge_all:
            parts = pooled.split(list(self.config.dim), dim=-1)
            return [t + p[:, ::s] for t, p, s in zip(tokens, parts, strides)]
        pi = self.config.predict_index
        tokens = list(tokens)
        tokens[pi] = tokens[pi] + pooled  # the predicting stream has stride 1
        return tokens

    def _logits(self, embeds: list[Tensor], n: int) -> Tensor:  # -> (b, n, V)
        cfg = self.config
        if cfg.predict_use_all_hierarchy:
            h = torch.cat(
                [repeat_upsample(e, s, n) for e, s in zip(embeds, cfg.hierarchical_stride)], -1
            )
        else:
            pi = cfg.predict_index
            h = repeat_upsample(embeds[pi], cfg.hierarchical_stride[pi], n)
        return self.to_logits(h)

    # ----------------------------------------------------------------- losses

    def _losses(self, logits: Tensor, labels: Tensor, embeds: list[Tensor], ids: Tensor):
        cfg = self.config
        # class dim last and contiguous: log-softmax along rows, no strided (b, V, n) view
        v = logits.shape[-1]
        ce = cross_entropy(logits.reshape(-1, v), labels.reshape(-1), cfg.ignore_index)
        zero = ce.new_zeros(())
        recon = sum((self._recon_loss(int(k), embeds[int(k)], ids) for k in self.recon_heads), zero)
        ar = sum((self._ar_loss(int(k), embeds[int(k)]) for k in self.ar_heads), zero)
        total = ce
        if self.recon_heads:
            total = total + cfg.recon_loss_weight * recon
        if self.ar_heads:
            total = total + cfg.hierarchical_ar_loss_weight * ar
        return total, (ce, recon, ar)

    def _recon_loss(self, k: int, h: Tensor, ids: Tensor) -> Tensor:
        """Compressed token j predicts the c input tokens it covers, [j*s - c + 1, j*s]."""
        c, s = self.config.hierarchies[k], self.config.hierarchical_stride[k]
        padded = F.pad(ids, (c - 1, 0), value=self.config.ignore_index)  # (b, n + c - 1)
        targets = padded.unfold(1, c, s)  # (b, m, c)
        logits = self.recon_heads[str(k)](h)  # (b, m, c * V): V innermost, as targets (c)
        logits = logits.reshape(-1, logits.shape[-1] // c)  # (b m c, V): a view
        return cross_entropy(logits, targets.reshape(-1), self.config.ignore_index)

    def _ar_loss(self, k: int, h: Tensor) -> Tensor:
        """Compressed token j predicts token j + 1 of its stream: 1 - cosine similarity."""
        if h.shape[1] < 2:
            return h.new_zeros(())
        target = h[:, 1:].detach() if self.config.detach_ar_target else h[:, 1:]
        pred = self.ar_heads[str(k)](h[:, :-1])
        return (1 - _cosine_similarity(pred.float(), target.float())).mean()

    # ----------------------------------------------------------------- generation

    def init_cache(self, batch_size: int) -> HierarchicalCache:
        w = self.token_emb.weight
        depth, num_h = self.config.depth, self.config.num_hierarchies
        return HierarchicalCache(
            window=w.new_zeros(batch_size, max(self.config.hierarchies), w.shape[1]),
            blocks=[[BlockState() for _ in range(num_h)] for _ in range(depth)],
            latest=[[None] * num_h for _ in range(depth)],
            final=[None] * num_h,
        )

    def _forward_cached(
        self, ids: Tensor, cache: HierarchicalCache, keep: int | None = None
    ) -> Tensor:
        if cache.pos == 0:  # prefill: one full forward that also fills the cache
            self._check_length(ids.shape[1])
            last_only = keep == 1 and not self.config.hierarchy_merge_all
            embeds = self._encode(ids, cache, last_only)
            cache.final = [e[:, -1:] for e in embeds]
            cache.pos = ids.shape[1]
            logits = self._logits(embeds, 1 if last_only else ids.shape[1])
        else:
            steps = [self._step(ids[:, i : i + 1], cache) for i in range(ids.shape[1])]
            logits = torch.cat(steps, 1)
        return logits if keep is None else logits[:, -keep:]

    def _step(self, ids: Tensor, cache: HierarchicalCache) -> Tensor:
        """One new token (b, 1) at position cache.pos -> its logits (b, 1, V)."""
        cfg, t = self.config, cache.pos
        cache.window = torch.cat((cache.window[:, 1:], self.token_emb(ids)), dim=1)
        due = [t % s == 0 for s in cfg.hierarchical_stride]  # streams with a token now
        fast = fused.step_ok(self, due, cache, t)
        new: list[Tensor | None] = [None] * cfg.num_hierarchies
        for k, c in enumerate(cfg.hierarchies):
            if due[k]:
                window, comp = cache.window[:, -c:], self.compress[k]
                h = comp.step_fused(window) if fast else comp.step(window)
                new[k] = self.compress_norms[k](h)
        for layer_idx, layer in enumerate(self.layers):
            for k, blk in enumerate(layer):
                if new[k] is not None:
                    st = cache.blocks[layer_idx][k]
                    index = t // cfg.hierarchical_stride[k]
                    if fast:
                        new[k] = fused.block_step(blk, new[k], st, index)
                    else:
                        new[k] = blk(new[k], state=st, index=index)
                    cache.latest[layer_idx][k] = new[k]
            if self.merges:
                merge, cat = self.merges[layer_idx], torch.cat(cache.latest[layer_idx], dim=-1)
                pooled = fused.merge_step(merge, cat) if fast else merge(cat)
                parts = pooled.split(list(cfg.dim), -1) if cfg.hierarchy_merge_all else None
                for k in range(cfg.num_hierarchies):
                    if new[k] is None:
                        continue
                    if parts is not None:
                        new[k] = new[k] + parts[k]
                    elif k == cfg.predict_index:
                        new[k] = new[k] + pooled
        for k, h in enumerate(new):
            if h is not None:
                cache.final[k] = self.final_norms[k](h)
        cache.pos += 1
        if cfg.predict_use_all_hierarchy:
            return self.to_logits(torch.cat(cache.final, dim=-1))
        return self.to_logits(cache.final[cfg.predict_index])

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,  # (b, t) or (t,)
        seq_len: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token: int | None = None,
        generator: torch.Generator | None = None,
        prefill_dtype: torch.dtype | str | None = None,
    ) -> Tensor:  # (b, seq_len) new tokens
        """Sample ``seq_len`` new tokens with the KV cache (temperature 0 = greedy);
        ``prefill_dtype``: see ``AutoregressiveWrapper.generate``.

        The prompt may hold at most ``config.seq_len`` tokens; generation may run past it
        (rotary positions keep counting, windows keep sliding), unlike the seed, which
        re-reads only the last ``seq_len`` tokens at every step."""
        return AutoregressiveWrapper(self, ignore_index=self.config.ignore_index).generate(
            prompt,
            seq_len,
            eos_token=eos_token,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            prefill_dtype=prefill_dtype,
        )


def _cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``F.cosine_similarity(a, b, dim=-1)``, a.b / (max(|a|, eps) max(|b|, eps)), from
    three row reductions: F's normalises both inputs first, two more full-size passes each
    way (the AR loss took ~10 ms of a 1,024-token training step that way)."""
    norm_a = torch.linalg.vector_norm(a, dim=-1).clamp_min(eps)
    norm_b = torch.linalg.vector_norm(b, dim=-1).clamp_min(eps)
    return (a * b).sum(-1) / (norm_a * norm_b)


def hierarchical_loss(model: HierarchicalTransformer, batch) -> Tensor:
    """Training loss for the model registry: the total of ``model(seq, return_loss=True)``."""
    loss, _ = model(batch.seq, return_loss=True)
    return loss
