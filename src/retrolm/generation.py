"""Sampling from any model family; RETRO retrieves at every chunk boundary (paper §2.4,
research A.12).

Notation: b batch, L prompt length, m chunk size, k neighbours, u chunk index.

Families: the model's family (``ModelFamily``, found from its class) says how ids become
logits and gives the decoding cache (``init_cache``); with a cache, the prompt is one
forward and every new token one more, otherwise every step reruns the whole sequence.

Timing: once the sequence, including the token about to be fed, has length (u+1)*m,
chunk u is complete; its neighbours are retrieved (with the database's own search,
i.e. the same embedding recipe as the keys) *before* that token is fed, because the
token at position u*m + m-1 is the first to read them. A prompt first retrieves for
all of its complete chunks. The model's KV cache encodes each chunk's neighbours once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from retrolm.models.registry import ModelFamily, check_no_retrieval, family_of
from retrolm.nn.kv_cache import as_float_dtype, prefill
from retrolm.sampling import decode_loop

log = logging.getLogger(__name__)


class Retriever(Protocol):
    """What generation needs from a retrieval database (``RetrievalDatabase`` has it)."""

    def search_tokens(self, chunk_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def retrieved_tokens(self, ids: np.ndarray) -> tuple[Tensor, Tensor]: ...


@dataclass
class Retrieval:
    """The neighbours fetched for chunk ``chunk`` of every batch row."""

    chunk: int
    """u: index of the completed chunk (tokens u*m ... u*m+m-1)."""
    ids: np.ndarray
    """(b, k) database chunk ids, -1 = none."""


@dataclass
class GenerationResult:
    ids: Tensor
    """(b, L + generated) the prompt followed by the new tokens (pad after an EOS)."""
    prompt_len: int
    """L: tokens of the prompt."""
    retrievals: list[Retrieval] = field(default_factory=list)
    """One entry per completed chunk, in order."""

    @property
    def new_ids(self) -> Tensor:
        return self.ids[:, self.prompt_len :]


def _as_batch(prompt_ids: Any) -> Tensor:
    t = torch.as_tensor(prompt_ids, dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty (length,) or (batch, length), got "
            f"shape {tuple(t.shape)}; start from at least one token (e.g. <eos>)"
        )
    return t


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Any,
    max_new_tokens: int,
    retriever: Retriever | None = None,
    *,
    num_neighbours: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    family: str | ModelFamily | None = None,
    prefill_dtype: torch.dtype | str | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> GenerationResult:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens.

    ``retriever``: a database (``search_tokens`` + ``retrieved_tokens``); None samples
    without retrieval (RETRO[OFF]). Stops when every row has produced ``eos_id`` or the
    sequence reaches the model's ``max_seq_len`` (a ``streaming`` family, whose cache is a
    memory of the whole past, has no such cap). ``seed`` makes sampling reproducible;
    ``temperature`` 0 is greedy. ``use_cache=False`` reruns the whole prefix at each step
    (the reference the cached path is tested against). ``family``: the model family's name
    (default: looked up from the model's class); only retrieval families take a retriever.
    ``prefill_dtype`` (e.g. ``torch.bfloat16`` or ``"bf16"``): run the prompt's forward under
    autocast to it, then cast the cache to the steps' dtype (the weights', or autocast's if
    the caller enabled it): on CPU the long prompt forward gains from half precision while
    single-token steps are often fastest in fp32. With ``use_cache=False`` it is ignored.
    ``on_token(tokens)``: called with each step's new tokens (b,) as they are sampled
    (``retrolm serve`` streams the continuation from it).
    """
    fam = family_of(model, family)
    if retriever is not None:
        check_no_retrieval(fam, model, "retriever")
    cfg = model.config
    max_len = int(cfg.max_seq_len)
    m = fam.chunk_size(cfg) if retriever is not None else 1
    pad_id = int(getattr(cfg, "pad_id", 0) if pad_id is None else pad_id)
    device = next(model.parameters()).device
    seq = _as_batch(prompt_ids).to(device)
    b, prompt_len = seq.shape
    # a streaming family's cache is a memory of the whole past: no length cap
    max_new_tokens = _new_tokens(prompt_len, max_new_tokens, None if fam.streaming else max_len)
    if prefill_dtype is not None:
        prefill_dtype = as_float_dtype(prefill_dtype)
    k = num_neighbours or getattr(retriever, "num_neighbours", None) or 2
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()

    # the whole output, allocated once: a step writes one column instead of concatenating
    ids = torch.full((b, prompt_len + max_new_tokens), pad_id, dtype=torch.long, device=device)
    ids[:, :prompt_len] = seq
    n = prompt_len  # tokens in ids so far

    found = _Neighbours(retriever, k, m, b, device) if retriever is not None else None

    def forward(tokens: Tensor, cache: Any) -> Tensor:  # (b, 1, V): the last position only
        if found is None:
            return fam.logits(model, tokens, cache, logits_to_keep=1)
        kw = dict(retrieved=found.tokens, neighbour_mask=found.mask)
        return fam.logits(model, tokens, cache, **kw, logits_to_keep=1)

    def first_logits() -> Tensor:  # (b, V)
        dtype = prefill_dtype if cache is not None else None
        return prefill(lambda: forward(seq, cache), model, cache, dtype, device)[:, -1]

    def next_logits(count: int) -> Tensor:  # (b, V) after ids[:, :count]
        nonlocal n
        n = count
        # the new token may complete a chunk: its neighbours come before feeding it
        if found is not None and n % m == 0:
            found.complete_chunks(ids, n)
        return forward(ids[:, n - 1 : n] if cache is not None else ids[:, :n], cache)[:, -1]

    cache = fam.init_cache(model, b) if use_cache else None
    try:
        if found is not None:
            found.complete_chunks(ids, n)
        n = decode_loop(
            first_logits,
            next_logits,
            ids,
            n,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=gen,
            eos_id=eos_id,
            fill_id=pad_id,
            on_token=on_token,
        )
        if found is not None:
            found.complete_chunks(ids, n)  # report the chunk the last token completed too
    finally:
        model.train(was_training)
    seq = ids if n == ids.shape[1] else ids[:, :n].clone()  # (b, L + generated)
    return GenerationResult(seq, prompt_len, found.retrievals if found is not None else [])


def _new_tokens(prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
    """How many tokens to generate: ``max_new_tokens``, cut at the model's ``max_len``
    (None: no cap)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_len is None:
        return max_new_tokens
    if prompt_len > max_len:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's max_seq_len is {max_len}; "
            f"shorten the prompt (e.g. keep its last {max_len - 1} tokens)"
        )
    if prompt_len + max_new_tokens > max_len:
        log.warning(
            "stopping at max_seq_len %d (%d new tokens instead of %d)",
            max_len,
            max_len - prompt_len,
            max_new_tokens,
        )
        max_new_tokens = max_len - prompt_len
    return max_new_tokens


class _Neighbours:
    """The neighbours retrieved so far: (b, u, k, 2m) tokens and (b, u, k) mask for chunks
    0 ... u-1, and one ``Retrieval`` per chunk."""

    def __init__(self, retriever: Retriever, k: int, m: int, b: int, device: torch.device):
        self.retriever, self.k, self.m, self.device = retriever, k, m, device
        self.tokens = torch.zeros(b, 0, k, 2 * m, dtype=torch.long, device=device)
        self.mask = torch.zeros(b, 0, k, dtype=torch.bool, device=device)
        self.retrievals: list[Retrieval] = []

    def complete_chunks(self, ids: Tensor, n: int) -> None:
        """Retrieve for every chunk of ``ids[:, :n]`` completed since the last call."""
        m = self.m
        for u in range(self.tokens.shape[1], n // m):
            chunk = ids[:, u * m : (u + 1) * m].cpu().numpy()
            found, _ = self.retriever.search_tokens(chunk, self.k)
            toks, mask = self.retriever.retrieved_tokens(found)
            self.tokens = torch.cat([self.tokens, toks.to(self.device)[:, None]], 1)
            self.mask = torch.cat([self.mask, mask.to(self.device)[:, None]], 1)
            self.retrievals.append(Retrieval(u, np.asarray(found)))


def describe_sources(
    db: Any, result: GenerationResult, row: int = 0, snippet_chars: int = 120
) -> list[dict[str, Any]]:
    """For printing: per retrieval of batch row ``row``, the source file and a text snippet."""
    m = int(db.chunk_size)
    out = []
    for r in result.retrievals:
        for rank, cid in enumerate(r.ids[row].tolist()):
            if cid < 0:
                continue
            text = db.tokenizer.decode(np.asarray(db.chunks[cid, :m]).tolist())
            text = " ".join(text.split())
            if len(text) > snippet_chars:
                text = text[: snippet_chars - 1] + "…"
            out.append(
                {
                    "chunk": r.chunk,
                    "rank": rank,
                    "chunk_id": int(cid),
                    "file": str(db.doc_path(int(db.doc_ids[cid]))),
                    "snippet": text,
                }
            )
    return out
