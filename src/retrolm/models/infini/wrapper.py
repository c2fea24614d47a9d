"""``InfiniTransformerWrapper``: the segment-recurrent training and sampling loop of
``infini-transformer-pytorch`` 0.2.1, over the one segment runner (``InfiniTransformer.stream``)
and the one decoding loop (``retrolm.sampling.decode_loop``).

Differences from the reference, on purpose: padding is ``ignore_index`` in ``seq`` (fed to the
model as ``pad_id``, never predicted) instead of a crash; the prompt runs through the segment
loop first, so every prompt segment reaches the memory (the reference kept only the last);
each new token costs one token's forward (the reference re-embeds the whole segment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from retrolm.models.infini.model import InfiniTransformer, recurrent_loss
from retrolm.sampling import decode_loop


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class InfiniTransformerWrapper(nn.Module):
    def __init__(
        self,
        model: InfiniTransformer,
        segment_length: int | None = None,
        detach_mems_every_num_segments: int = 2,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not isinstance(model, InfiniTransformer):
            raise ValueError(f"model must be an InfiniTransformer, got {type(model).__name__}")
        self.model = model
        seg = model.config.segment_len if segment_length is None else segment_length
        self.segment_length = _positive_int("segment_length", seg)
        self.detach_mems_every_num_segments = _positive_int(
            "detach_mems_every_num_segments", detach_mems_every_num_segments
        )
        if 0 <= ignore_index < model.config.num_tokens:
            raise ValueError(
                f"ignore_index must not be a token id (0 .. {model.config.num_tokens - 1}), got "
                f"{ignore_index}; the default is -100"
            )
        self.ignore_index = ignore_index

    def forward(
        self,
        seq: Tensor,  # (b, n + 1) token ids; ignore_index = padding
        segment_length: int | None = None,
        backward: bool = False,
        grad_accum_scale: float = 1.0,
    ) -> Tensor:
        """Mean next-token loss of ``seq``, segment by segment with truncated BPTT (the
        memories detached every ``detach_mems_every_num_segments`` segments); ``backward``
        runs ``.backward()`` per window, scaled by ``grad_accum_scale``."""
        seg = _positive_int("segment_length", segment_length or self.segment_length)
        if seq.dim() != 2 or seq.shape[1] < 2:
            raise ValueError(f"seq must be (batch, n + 1) with n >= 1, got {tuple(seq.shape)}")
        pad = seq == self.ignore_index
        inputs = seq[:, :-1].masked_fill(pad[:, :-1], self.model.config.pad_id)
        return recurrent_loss(
            self.model,
            inputs,
            seq[:, 1:],
            segment_len=seg,
            detach_every=self.detach_mems_every_num_segments,
            ignore_index=self.ignore_index,
            backward=backward,
            grad_accum_scale=grad_accum_scale,
        )

    @torch.no_grad()
    def generate(
        self,
        *,
        seq_len: int,
        prompt: Tensor | None = None,  # (b, t) or (t,)
        batch_size: int = 1,
        temperature: float = 1.0,
        filter_fn: Callable[..., Tensor] | None = None,
        filter_kwargs: dict[str, Any] | None = None,
        exclude_prompt: bool = True,
        segment_length: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # (b, seq_len) new tokens, or (b, t + seq_len) with the prompt
        """Sample ``seq_len`` tokens (temperature 0: greedy). The prompt (default: one
        random token per row) streams through the segment loop first, building the memory
        of all its segments; then one token per step. ``filter_fn(logits, **filter_kwargs)``
        filters the (b, V) logits before sampling (e.g. a top-p)."""
        seq_len = _positive_int("seq_len", seq_len)
        seg = _positive_int("segment_length", segment_length or self.segment_length)
        net = self.model
        if prompt is None:
            prompt = torch.randint(0, net.config.num_tokens, (batch_size, 1), generator=generator)
        prompt = prompt[None] if prompt.dim() == 1 else prompt
        b, t = prompt.shape
        if t < 1:
            raise ValueError("prompt must hold at least one token")
        was_training = net.training
        net.eval()
        cache = net.init_cache(b, seg)
        ids = prompt.new_zeros(b, t + seq_len, dtype=torch.long)
        ids[:, :t] = prompt
        kwargs = filter_kwargs or {}

        def pick(logits: Tensor) -> Tensor:  # (b, V)
            return filter_fn(logits, **kwargs) if filter_fn is not None else logits

        try:
            decode_loop(
                lambda: pick(net.stream(ids[:, :t], cache)[:, -1]),
                lambda n: pick(net.stream(ids[:, n - 1 : n], cache)[:, -1]),
                ids,
                t,
                seq_len,
                temperature=temperature,
                generator=generator,
            )
        finally:
            net.train(was_training)
        return ids[:, t:] if exclude_prompt else ids
