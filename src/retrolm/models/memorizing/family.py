"""Registry hooks of the Memorizing Transformer: its evaluation modes. Evaluation streams
each held-out document whole through one cache (the family is ``streaming``) and scores it
with the kNN memory read (``memory``) and ignored (``no_memory``: the XL memory stays)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


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
