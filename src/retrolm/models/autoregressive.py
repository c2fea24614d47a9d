"""``AutoregressiveWrapper``: one training/sampling wrapper for every autoregressive family.

The wrapped network follows a small protocol:

* ``net(x, **kwargs)`` returns logits ``(b, n, V)`` or a tuple ``(logits, aux_loss)``
  (auxiliary losses such as the Routing Transformer's commitment loss are added to the LM loss);
* optionally ``net.init_cache(batch_size)`` returns a cache object; then
  ``net(x_new, cache=cache, **kwargs)`` returns logits for the new tokens only, and
  generation runs incrementally (each step costs one token, not the whole prefix);
* optionally ``net.max_seq_len``: without a cache, generation feeds at most that many tokens.

Sampling runs the one decoding loop, ``retrolm.sampling.decode_loop`` (as ``retrolm.generate``
does). This module sits with the models (the Routing language model is one of these
wrappers), so it imports nothing of the pipeline.

The loss ignores ``ignore_index`` (-100), never a real token id such as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrolm.nn.kv_cache import as_float_dtype, prefill
from retrolm.nn.losses import cross_entropy
from retrolm.sampling import decode_loop
from retrolm.utils import accepts_keyword


def split_output(out) -> tuple[Tensor, Tensor | None]:
    """Normalise a network's output to (logits, aux_loss or None)."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


class AutoregressiveWrapper(nn.Module):
    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0) -> None:
        super().__init__()
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.max_seq_len = getattr(net, "max_seq_len", None)

    def forward(
        self,
        x: Tensor,  # (b, n + 1) when return_loss, else (b, n)
        return_loss: bool = False,
        randomly_truncate_sequence: bool = False,
        **kwargs,
    ):
        if not return_loss:
            return self.net(x, **kwargs)
        inp, labels = x[:, :-1], x[:, 1:]
        mask = kwargs.pop("input_mask", None)
        if randomly_truncate_sequence:
            # train on a random prefix length so the model also sees short sequences
            n = int(torch.randint(1, inp.shape[1] + 1, (1,)))
            inp, labels = inp[:, :n], labels[:, :n]
        if mask is not None:  # mask covers x: (b, n + 1)
            kwargs["input_mask"] = mask[:, : inp.shape[1]]
            labels = labels.masked_fill(~mask[:, 1 : inp.shape[1] + 1], self.ignore_index)
        logits, aux = split_output(self.net(inp, **kwargs))
        v = logits.shape[-1]
        loss = cross_entropy(logits.reshape(-1, v), labels.reshape(-1), self.ignore_index)
        return loss + aux.sum() if aux is not None else loss

    def update_kmeans(self) -> None:
        """Apply pending k-means centroid updates of the wrapped network (families with
        online clustering, e.g. the Routing Transformer with its automatic update off)."""
        fn = getattr(self.net, "update_kmeans", None)
        if fn is not None:
            fn()

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,  # (b, t) or (t,)
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        prefill_dtype: torch.dtype | str | None = None,
        **kwargs,
    ) -> Tensor:  # (b, <= seq_len) new tokens only
        """Sample ``seq_len`` new tokens (temperature 0 = greedy).

        ``prefill_dtype`` (e.g. ``torch.bfloat16``): run the prompt's forward under autocast
        to it and cast the cache to the steps' dtype (``nn.kv_cache.prefill``); with a cache
        only."""
        if prefill_dtype is not None:
            prefill_dtype = as_float_dtype(prefill_dtype)
        net = self.net
        was_training = net.training
        net.eval()
        squeeze = start_tokens.dim() == 1
        prompt = start_tokens[None] if squeeze else start_tokens
        b, t = prompt.shape
        cache = net.init_cache(b) if hasattr(net, "init_cache") else None
        dtype = torch.promote_types(prompt.dtype, torch.long) if seq_len > 0 else prompt.dtype
        ids = prompt.new_zeros(b, t + seq_len, dtype=dtype)
        ids[:, :t] = prompt
        # the prompt's logits are read at its last position only: a model that can skip
        # the others (``logits_to_keep``) is told so
        keep = {"logits_to_keep": 1} if accepts_keyword(net.forward, "logits_to_keep") else {}

        def first_logits() -> Tensor:  # the prompt, in its own precision if asked (cached)
            if cache is None:
                return next_logits(t)
            run = lambda: split_output(net(prompt, cache=cache, **keep, **kwargs))  # noqa: E731
            return prefill(run, net, cache, prefill_dtype, prompt.device)[0][:, -1]

        def next_logits(n: int) -> Tensor:
            if cache is not None:
                return split_output(net(ids[:, n - 1 : n], cache=cache, **kwargs))[0][:, -1]
            ctx = (
                ids[:, :n] if self.max_seq_len is None else ids[:, max(n - self.max_seq_len, 0) : n]
            )
            return split_output(net(ctx, **kwargs))[0][:, -1]

        n = decode_loop(
            first_logits,
            next_logits,
            ids,
            t,
            seq_len,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos_id=eos_token,
            fill_id=0 if eos_token is None else eos_token,
        )
        net.train(was_training)
        new = ids[:, t:n]
        return new[0] if squeeze else new
