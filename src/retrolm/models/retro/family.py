"""How the pipeline drives RETRO (the model registry's hooks): a batch to a loss, ids and
neighbours to logits, and the extra evaluation mode of a model with a copy head. Loaded by
the registry on first use (``models/registry.py`` names these functions by path)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from retrolm.models.registry import Batch
from retrolm.models.retro.copy_head import copy_head_disabled
from retrolm.utils import accepts_keyword

NO_COPY = "retrieval_no_copy"  # RETRO with a copy head, scored with the head off (CCA alone)


def retro_loss(model: nn.Module, batch: Batch) -> Tensor:
    """RETRO: mean next-token cross-entropy; ``retrieved=None`` is the baseline decoder."""
    return model(batch.seq, batch.retrieved, neighbour_mask=batch.neighbour_mask, return_loss=True)


def retro_logits(
    model: nn.Module,
    ids: Tensor,  # (b, n)
    cache: Any = None,
    retrieved: Tensor | None = None,  # (b, l, k, 2m); None = RETRO[OFF]
    neighbour_mask: Tensor | None = None,  # (b, l, k)
    logits_to_keep: int | None = None,
) -> Tensor:  # (b, n, V), or (b, logits_to_keep, V)
    """RETRO: ``retrieved=None`` is the same decoder without neighbours. ``logits_to_keep``:
    project only the last positions to the vocabulary (a prompt's prefill needs one row)."""
    kw: dict[str, Any] = {} if cache is None else {"cache": cache}
    if retrieved is not None:
        kw["neighbour_mask"] = neighbour_mask
    if logits_to_keep is None:
        return model(ids, retrieved, **kw)
    if accepts_keyword(model.forward, "logits_to_keep"):
        return model(ids, retrieved, **kw, logits_to_keep=logits_to_keep)
    return model(ids, retrieved, **kw)[:, -logits_to_keep:]  # a subclass without the option


def retro_eval_variants(
    model: nn.Module,
) -> dict[str, Callable[[nn.Module], AbstractContextManager]]:
    """Retrieval modes evaluation scores beside ``retrieval``: with a copy head, the same
    neighbours with the head off (how much of the gain is the copy head's)."""
    if getattr(model, "copy_head", None) is None:
        return {}
    return {NO_COPY: copy_head_disabled}
