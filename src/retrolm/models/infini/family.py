"""How the pipeline drives Infini-attention (the registry's hooks): the evaluation modes of a
streaming family, ``memory`` (as trained) and ``no_memory`` (the memory reads nothing)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

from torch import nn

from retrolm.models.infini.lm import memory_off


def eval_modes(model: nn.Module) -> dict[str, Callable[[nn.Module], AbstractContextManager]]:
    """``memory``: the model as it is; ``no_memory``: every segment read as the first."""
    return {"memory": lambda m: contextlib.nullcontext(), "no_memory": memory_off}
