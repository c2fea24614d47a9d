"""Registry hooks of the Memorizing Transformer: its evaluation modes. Evaluation streams
each held-out document whole through one cache (the family is ``streaming``) and scores it
with the kNN memory read (``memory``) and ignored (``no_memory``: the XL memory stays)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from retrolm.utils import unwrap


@contextlib.contextmanager
def memory_off(model: nn.Module) -> Iterator[None]:
    """kNN layers read nothing inside the block (``MemorizingLanguageModel.use_memory``)."""
    was = model.use_memory
    model.use_memory = False
    try:
        yield
    finally:
        model.use_memory = was


def eval_modes(model: nn.Module) -> dict[str, Callable[[nn.Module], Any]]:
    return {"memory": lambda m: contextlib.nullcontext(), "no_memory": memory_off}


def segment_losses(model: nn.Module, batch: Any) -> list[Callable[[], Tensor]]:
    """Training segment by segment (``ModelFamily.segment_losses``), as the paper trains:
    one piece per ``segment_len`` tokens of ``batch.seq``, all through one fresh cache.

    Memories crossing segments (kNN pairs, XL windows) are written detached, so backing up
    each segment on its own gives the gradients of one backward over the whole window, with
    one segment's activations alive instead of all. Each piece's loss is its mean over its
    counted labels times its share of the window's counted labels: the pieces sum to
    ``model(seq, return_loss=True)``."""
    net = unwrap(model)
    cfg, seq = net.config, batch.seq  # seq (b, n + 1)
    n, seg = seq.shape[1] - 1, cfg.segment_len
    starts = list(range(0, n, seg))
    counts = [(seq[:, s + 1 : s + seg + 1] != cfg.ignore_index).sum() for s in starts]
    counts = torch.stack(counts).tolist() if counts else []
    total = sum(counts)
    if len(starts) < 2 or total == 0:  # one piece (no labels at all: NaN, as the full loss)
        return [lambda: model(seq, return_loss=True)]
    cache = net.init_cache(seq.shape[0])

    def piece(s: int, count: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            part = seq[:, s : s + seg + 1]  # the segment's inputs and its labels
            if count == 0:  # nothing to score: still fed, for the memories
                return model(part[:, :-1], cache=cache).sum().float() * 0.0
            return model(part, cache=cache, return_loss=True) * (count / total)

        return run

    return [piece(s, c) for s, c in zip(starts, counts)]
