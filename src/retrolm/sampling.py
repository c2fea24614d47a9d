"""Next-token sampling shared by every model family.

One sampler with unambiguous names: ``top_k`` is a number of tokens kept, ``top_p`` is the
probability mass kept (nucleus sampling), ``temperature`` 0 means greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Mask (to -inf) every logit outside the top-k tokens and outside the top-p mass.

    logits: (..., V). The most likely token always survives.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(
                f"top_p is the probability mass kept and must be in (0, 1], got {top_p}"
            )
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        # mass strictly before each token; keep a token while that mass is below top_p
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from logits (b, V) -> (b,) int64. temperature 0 is greedy.

    Draws from softmax(filter_logits(logits / temperature)). With ``top_k`` only the k
    candidates are softmaxed and searched, and the draw is an inverse-CDF lookup of one
    uniform number per row: ``torch.multinomial`` over a 29k vocabulary (29k exponential
    draws) alone cost ~0.6 ms per decoded token.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    candidates = None  # (b, k) vocabulary ids of the columns of `logits`, None = all
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < logits.shape[-1]:  # the top k of logits / temperature (T > 0: same order)
            logits, candidates = logits.topk(int(top_k), dim=-1, sorted=False)
    if temperature != 1.0:  # after top-k: k divisions instead of V (x / 1 is x)
        logits = logits / temperature
    logits = filter_logits(logits, top_p=top_p)
    probs = logits.softmax(dim=-1).double()  # fp64 CDF: u * total stays below total
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    # first column whose CDF exceeds u * total: never a zero-probability column
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    if candidates is not None:
        pick = candidates.gather(-1, pick)
    return pick.squeeze(-1)


def decode_loop(
    first_logits: Callable[[], Tensor],
    next_logits: Callable[[int], Tensor],
    ids: Tensor,
    n: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    fill_id: int = 0,
    on_token: Callable[[Tensor], None] | None = None,
) -> int:
    """The one autoregressive sampling loop: sample, write, feed, until ``max_new_tokens``
    new tokens or every row has produced ``eos_id``. Returns the tokens now in ``ids``.

    ``ids`` (b, n + max_new_tokens): the prompt in ``ids[:, :n]``; new tokens are written in
    place (one column a step, no concatenation). ``first_logits()`` gives the prompt's
    next-token logits (b, V); ``next_logits(n)`` the logits (b, V) after ``ids[:, :n]``
    (a cached model feeds only ``ids[:, n - 1 : n]``); it is never called for a token
    nobody samples from. Rows past their EOS get ``fill_id``. ``on_token(tokens)``, if
    given, sees each step's new tokens (b,) as soon as they are written, before the next
    forward (a server streams them from it). Callers:
    ``retrolm.generate`` (retrieval at chunk boundaries, any registered family) and the
    seed wrappers' ``generate`` (``models.autoregressive``).
    """
    if not max_new_tokens:
        return n
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    logits = first_logits()
    for step in range(max_new_tokens):
        nxt = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if eos_id is not None:  # rows past their EOS get fill_id
            nxt = nxt.masked_fill(finished, fill_id)
            finished |= nxt == eos_id
        ids[:, n] = nxt
        n += 1
        if on_token is not None:
            on_token(nxt)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break  # no forward for logits nobody samples from
        logits = next_logits(n)
    return n
