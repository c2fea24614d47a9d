"""The frozen decoder a RETRO-fitted model reads through: what every kind of base offers.

A base is a trained decoder-only language model wrapped so that RETRO-fitting needs to know
nothing else about it: its frozen token embedding (the neighbour encoder reads neighbours
through it, as the paper does), its width, depth and vocabulary, its output projection,
and one call that runs it over new tokens with its own KV cache, handing the hidden states
after each decoder layer to a callback that may change them (where chunked
cross-attention goes). Two kinds (``open.py``'s ``open_base`` tells them apart):

* ``RetrolmBase`` (``retrolm_base.py``): a retrolm run of a decoder trained without
  retrieval (``retrolm train --no-retrieval``);
* ``HFBase`` (``hf_base.py``): a local Hugging Face causal-LM folder (GPT-2, Llama, ...).

A base is identified by its path and ``content_hash`` (its weights and config), which a
RETRO-fitted checkpoint records instead of the base's weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

AfterLayer = Callable[[int, Tensor], Tensor]
"""``(layer number, 1-based; hidden states (b, t, d)) -> hidden states (b, t, d)``."""


class DecoderBase(nn.Module):
    """A frozen decoder (module docstring). Subclasses set the attributes and implement
    ``hidden`` and ``init_state``."""

    kind: str = "base"
    width: int
    depth: int
    vocab_size: int
    max_positions: int
    path: Path
    tokenizer_hash: str | None = None
    """sha256 of the base's canonical tokenizer.json (as ``LMTokenizer.hash``), when known."""
    tokenizer_file: Path | None = None
    """Where the base's tokenizer.json is (``retrolm db build --tokenizer BASE`` reads it)."""

    @property
    def token_embedding(self) -> nn.Embedding:
        """The base's input token embedding (vocab, width)."""
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        """The output projection: ``lm_head(h)`` (b, t, d) -> logits (b, t, V); has ``weight``."""
        raise NotImplementedError

    def init_state(self, batch_size: int) -> Any:
        """A fresh decoding state (the base's KV cache)."""
        raise NotImplementedError

    def hidden(self, ids: Tensor, state: Any, after_layer: AfterLayer) -> Tensor:
        """ids (b, t) at positions ``state``'s length on -> final-normed states (b, t, d),
        calling ``after_layer`` after every decoder layer; ``state`` (or None: positions
        0 … t-1) moves on by t."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """sha256 of the files that make the base (weights and config)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> DecoderBase:
        """A frozen base stays in eval mode (no dropout): its outputs are the base's."""
        return super().train(False)

    def freeze(self, unfreeze: Iterable[str] = ()) -> list[str]:
        """``requires_grad_(False)`` on every parameter but those named (or under a name) in
        ``unfreeze``, as the base's own state dict names them (``final_norm``,
        ``transformer.ln_f``); returns the names (here, under ``model.``) left trainable. A
        name that matches nothing is a ValueError naming some that exist."""
        wanted = tuple(unfreeze)

        def hit(name: str, u: str) -> bool:
            own = name.removeprefix("model.")
            return any(n == u or n.startswith(u + ".") for n in (name, own))

        trained = []
        for name, p in self.named_parameters():
            p.requires_grad_(any(hit(name, u) for u in wanted))
            if p.requires_grad:
                trained.append(name)
        names = [n for n, _ in self.named_parameters()]
        for u in wanted:
            if not any(hit(n, u) for n in names):
                tops = sorted({n.removeprefix("model.").rsplit(".", 1)[0] for n in names})
                raise ValueError(
                    f"unfreeze {u!r} names no parameter of the base {self.path}; its modules "
                    f"include {tops[:2]} ... {tops[-2:]}"
                )
        return trained


def hash_files(paths: Iterable[Path], extra: Any = None) -> str:
    """sha256 over the files' names and bytes (sorted by name), then ``extra`` as JSON."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()
