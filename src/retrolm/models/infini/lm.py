"""What ``retrolm train --model infini`` builds: an ``InfiniTransformer`` (``.net``) behind the
registry's contract -- ``model(ids)`` of any length, ``model(seq, return_loss=True)``,
``init_cache(b)`` and ``model(new_ids, cache=cache)`` -- all through the one segment runner
(``InfiniTransformer.stream``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from retrolm.models.infini.cache import InfiniCache
from retrolm.models.infini.config import InfiniConfig
from retrolm.models.infini.model import InfiniTransformer, recurrent_loss
from retrolm.models.pretrained import PreTrainedMixin

IGNORE_INDEX = -100


class InfiniLanguageModel(PreTrainedMixin, nn.Module):
    """``use_memory`` (attribute, or per call): False makes the memory read nothing, every
    segment as if it were the first (the ``no_memory`` evaluation mode)."""

    def __init__(self, config: InfiniConfig) -> None:
        super().__init__()
        self.config = config
        self.net = InfiniTransformer(config=config)
        self.use_memory = True

    def init_cache(self, batch_size: int) -> InfiniCache:
        """An empty stream; ``cache.reset(rows)`` marks document starts."""
        return self.net.init_cache(batch_size)

    def forward(
        self,
        ids: Tensor,  # (b, n); (b, n + 1) with return_loss
        return_loss: bool = False,
        use_memory: bool | None = None,
        cache: InfiniCache | None = None,
    ) -> Tensor:  # (b, n, V) logits, or the scalar loss
        """Logits of ``ids`` from position 0 of a fresh stream, or continuing ``cache``.

        ``return_loss``: ``ids`` is a training sequence: the mean cross-entropy of
        ``ids[:, 1:]`` given ``ids[:, :-1]`` (positions equal to -100 are padding: fed as
        ``pad_id``, never predicted), with truncated BPTT every
        ``config.detach_mems_every_num_segments`` segments."""
        use = self.use_memory if use_memory is None else use_memory
        if return_loss:
            if cache is not None:
                raise ValueError("return_loss runs a fresh stream; pass cache=None")
            pad = ids == IGNORE_INDEX
            inputs = ids[:, :-1].masked_fill(pad[:, :-1], self.config.pad_id)
            return recurrent_loss(
                self.net,
                inputs,
                ids[:, 1:],
                segment_len=self.config.segment_len,
                detach_every=self.config.detach_mems_every_num_segments,
                ignore_index=IGNORE_INDEX,
                use_memory=use,
            )
        if cache is None:
            cache = self.init_cache(ids.shape[0])
        return self.net.stream(ids, cache, use)


@contextlib.contextmanager
def memory_off(model: InfiniLanguageModel) -> Iterator[None]:
    """Inside the block the memory reads nothing (``use_memory = False``)."""
    before = model.use_memory
    model.use_memory = False
    try:
        yield
    finally:
        model.use_memory = before
