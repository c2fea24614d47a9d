"""Neighbour copy head: copy the next token from a retrieved neighbour where the text matches.

An optional output head for RETRO (``RetroConfig(copy_head=True)``); it is **not** part of the
RETRO paper. Paper RETRO reads its neighbours only through chunked cross-attention (CCA), and a
small model has to learn content-based copying through CCA's query/key projections, which at
the demo's scale (a few hundred optimizer steps) it does not: the parallels a held-out book
shares with the database are misaligned by insertions and omissions, so the position-to-
position copy CCA learns first does not apply (``benchmarks/history/demo.md``, issue 4). The copy
head gives the model that content matching directly, in the spirit of pointer-generator
networks (See et al. 2017) and kNN-LM (Khandelwal et al. 2020):

    position i (predicting token i+1) reads the neighbours of chunk c = (i+1) // m - 1,
    exactly the neighbours CCA lets it read; for every neighbour token nb[p] it counts

        match(i, p) = the largest L <= max_match with x[i-s] == nb[p-1-s] for s < L

    i.e. how many of the latest tokens precede nb[p] in the neighbour too.

    copy(v | i)  = sum over p with nb[p] = v of softmax_p(score[match(i, p)]), matches >= 1
    g(i)         = sigmoid(gate_bias[max_p match(i, p)] + w . h_i)
    p(v | i)     = (1 - g) * softmax(logits_i)(v) + g * copy(v | i)

``score`` and ``gate_bias`` are learned tables indexed by match length, ``w`` reads the
decoder's final state ``h_i`` (so the model can trust its own prediction over a short match).
Positions with no match, with no neighbours yet (the first chunk) or with retrieval off keep
the decoder's distribution unchanged. The match only looks at tokens at or before ``i`` and at
neighbours CCA may read, so the head is causal exactly as CCA is.

With the head active, the model returns **log-probabilities** where it would return logits:
``log_softmax`` of them is themselves, so cross-entropy, sampling, top-k/top-p and evaluation
work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NO_TOKEN = -1  # context before the sequence start
_NO_NEIGHBOUR = -2  # padding or a missing neighbour: never equals a context token


class NeighbourCopyHead(nn.Module):
    """Match-length-gated copying from retrieved neighbours (see the module docstring)."""

    lr_scale = 10.0
    """Its tables are a few dozen scalars that must move by several units within a short run:
    ``retrolm.train.param_groups`` gives them ``lr_scale`` times the base learning rate."""

    def __init__(self, dim: int, chunk_size: int, max_match: int = 12) -> None:
        super().__init__()
        if max_match < 1:
            raise ValueError(f"copy_max_match must be >= 1, got {max_match}")
        self.chunk_size = chunk_size
        self.max_match = max_match
        lengths = torch.arange(max_match + 1, dtype=torch.float32)
        # prior: longer matches are likelier continuations (learned from there)
        self.score = nn.Parameter(0.5 * lengths)
        self.gate_bias = nn.Parameter((-4.0 + 0.75 * lengths).clamp(max=2.0))
        self.gate = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        for p in (self.score, self.gate_bias, self.gate.weight):
            p._retrolm_lr_scale = self.lr_scale  # read by retrolm.train.param_groups
        self.enabled = True
        """Switch the head off (e.g. to evaluate CCA alone) without touching the weights."""

    def context(self, seq: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        """The latest ``max_match`` tokens at each position of ``seq``, newest last.

        seq: (b, t) this call's tokens; tail: (b, <= max_match-1) the tokens before them (a
        decoding cache's), None at the start. Returns (windows (b, t, max_match), new tail).
        """
        b, t = seq.shape
        w = self.max_match
        before = seq.new_full((b, w - 1), _NO_TOKEN)
        if tail is not None and tail.shape[1]:
            before = torch.cat((before, tail), 1)[:, -(w - 1) :] if w > 1 else before
        ctx = torch.cat((before, seq), 1)  # (b, w-1+t)
        new_tail = ctx[:, -(w - 1) :] if w > 1 else ctx[:, :0]
        return ctx.unfold(1, w, 1), new_tail  # window j ends at seq[:, j]

    def match_lengths(
        self,
        windows: Tensor,  # (b, t, w) the latest tokens per position, newest last
        positions: Tensor,  # (t,) absolute positions
        retrieved: Tensor,  # (b, l, k, r) neighbour tokens
        token_mask: Tensor,  # (b, l, k, r) True = a real neighbour token
    ) -> tuple[Tensor, Tensor]:
        """(candidate tokens (b, t, k*r) with _NO_NEIGHBOUR where unusable, match (b, t, k*r))."""
        m, w = self.chunk_size, self.max_match
        chunk = (positions + 1) // m - 1  # (t,) the chunk whose neighbours each position reads
        usable = (chunk >= 0) & (chunk < retrieved.shape[1])
        idx = chunk.clamp(0, retrieved.shape[1] - 1)
        cand = retrieved[:, idx]  # (b, t, k, r)
        ok = token_mask[:, idx] & usable[None, :, None, None]
        cand = torch.where(ok, cand, torch.full_like(cand, _NO_NEIGHBOUR))
        # prev[..., s, p] = cand[..., p-1-s]: the neighbour token s+1 places before p
        padded = F.pad(cand, (w, 0), value=_NO_NEIGHBOUR)  # (b, t, k, w+r)
        r = cand.shape[-1]
        run = torch.ones_like(cand, dtype=torch.bool)
        length = torch.zeros_like(cand)
        for s in range(w):
            prev = padded[..., w - 1 - s : w - 1 - s + r]
            run = run & (prev == windows[:, :, w - 1 - s, None, None])
            length = length + run
        length = torch.where(ok, length, torch.zeros_like(length))
        return cand.flatten(2), length.flatten(2)

    def _mixture(self, hidden, windows, positions, retrieved, token_mask, work):
        """(candidates (b, t, k*r), their copy weights, gate logit (b, t), any match (b, t))."""
        cand, length = self.match_lengths(windows, positions, retrieved, token_mask)
        best = length.amax(-1)  # (b, t)
        score = self.score[length].to(work)
        score = torch.where(length > 0, score, torch.full_like(score, -1e4))
        weight = torch.softmax(score, dim=-1)  # ~0 on non-matching tokens
        gate = self.gate_bias[best].to(work) + self.gate(hidden).to(work).squeeze(-1)
        return cand, weight, gate, best > 0

    @staticmethod
    def _mix(model_logp: Tensor, copy_p: Tensor, gate: Tensor, has: Tensor) -> Tensor:
        """log((1 - g) p_model + g p_copy) where a match exists, else log p_model."""
        mixed = torch.logaddexp(
            model_logp + F.logsigmoid(-gate), torch.log(copy_p + 1e-30) + F.logsigmoid(gate)
        )
        return torch.where(has, mixed, model_logp)

    def forward(
        self,
        hidden: Tensor,  # (b, t, d) final decoder states
        logits: Tensor,  # (b, t, V)
        windows: Tensor,  # (b, t, w)
        positions: Tensor,  # (t,)
        retrieved: Tensor,  # (b, l, k, r)
        token_mask: Tensor,  # (b, l, k, r)
    ) -> Tensor:  # (b, t, V) log-probabilities
        work = torch.promote_types(logits.dtype, self.score.dtype)  # fp32 under bf16 autocast
        logp = F.log_softmax(logits.to(work), dim=-1)
        if retrieved.shape[1] == 0 or retrieved.shape[2] == 0:  # no chunk retrieved yet
            return logp
        cand, weight, gate, has = self._mixture(
            hidden, windows, positions, retrieved, token_mask, work
        )
        copy = torch.zeros_like(logp).scatter_add_(-1, cand.clamp(min=0), weight)
        return self._mix(logp, copy, gate[..., None], has[..., None])

    def target_log_prob(
        self,
        hidden: Tensor,  # (b, t, d)
        model_logp: Tensor,  # (b, t) the decoder's log-probability of each target
        targets: Tensor,  # (b, t)
        windows: Tensor,
        positions: Tensor,
        retrieved: Tensor,
        token_mask: Tensor,
    ) -> Tensor:  # (b, t) log p(target) under the mixture
        """The training path: the mixture at the targets only, never over the vocabulary."""
        if retrieved.shape[1] == 0 or retrieved.shape[2] == 0:
            return model_logp
        cand, weight, gate, has = self._mixture(
            hidden, windows, positions, retrieved, token_mask, model_logp.dtype
        )
        copy_t = (weight * (cand == targets[..., None])).sum(-1)
        return self._mix(model_logp, copy_t, gate, has)


@contextmanager
def copy_head_disabled(model: nn.Module, disable: bool = True) -> Iterator[None]:
    """Run ``model`` (a RETRO) with its copy head off, if it has one: CCA alone."""
    head = getattr(model, "copy_head", None)
    if head is None or not disable:
        yield
        return
    was = head.enabled
    head.enabled = False
    try:
        yield
    finally:
        head.enabled = was
