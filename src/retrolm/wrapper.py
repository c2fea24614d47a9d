"""``AutoregressiveWrapper``: one training/sampling wrapper for every autoregressive family.

The wrapped network follows a small protocol:

* ``net(x, **kwargs)`` returns logits ``(b, n, V)`` or a tuple ``(logits, aux_loss)``
  (auxiliary losses such as the Routing Transformer's commitment loss are added to the LM loss);
* optionally ``net.init_cache(batch_size)`` returns a cache object; then
  ``net(x_new, cache=cache, **kwargs)`` returns logits for the new tokens only, and
  generation runs incrementally (each step costs one token, not the whole prefix);
* optionally ``net.max_seq_len``: without a cache, generation feeds at most that many tokens.

The loss ignores ``ignore_index`` (-100), never a real token id such as 0.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from retrolm.nn.fused_train import cross_entropy
from retrolm.nn.kv_cache import as_float_dtype, prefill
from retrolm.sampling import sample_next


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
        was_training = self.net.training
        self.net.eval()
        squeeze = start_tokens.dim() == 1
        out = start_tokens[None] if squeeze else start_tokens
        b, t = out.shape
        cache = self.net.init_cache(b) if hasattr(self.net, "init_cache") else None
        done = torch.zeros(b, dtype=torch.bool, device=out.device)
        step_input = out
        # the prompt's logits are read at its last position only: a model that can skip
        # the others (``logits_to_keep``) is told so
        keep = {"logits_to_keep": 1} if _takes(self.net, "logits_to_keep") else {}
        for i in range(seq_len):
            if cache is not None and i == 0:  # the prompt, in its own precision if asked
                logits, _ = prefill(
                    lambda prompt=out: split_output(
                        self.net(prompt, cache=cache, **keep, **kwargs)
                    ),
                    self.net, cache, prefill_dtype, out.device,
                )  # fmt: skip
            elif cache is not None:
                logits, _ = split_output(self.net(step_input, cache=cache, **kwargs))
            else:
                ctx = out if self.max_seq_len is None else out[:, -self.max_seq_len :]
                logits, _ = split_output(self.net(ctx, **kwargs))
            nxt = sample_next(
                logits[:, -1],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            if eos_token is not None:
                nxt = nxt.masked_fill(done, eos_token)
                done |= nxt == eos_token
            out = torch.cat((out, nxt[:, None]), dim=1)
            step_input = nxt[:, None]
            if eos_token is not None and bool(done.all()):
                break
        self.net.train(was_training)
        new = out[:, t:]
        return new[0] if squeeze else new


def _takes(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward accepts the keyword ``name``."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward: no signature to read
        return False
