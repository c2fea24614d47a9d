"""A retrolm run as a RETRO-fit base: the RETRO decoder of a run trained without retrieval
(``retrolm train --no-retrieval``, e.g. the demo's ``runs/baseline``).

The run is read here from its files (``config.json`` + ``model.safetensors`` of its newest
checkpoint, named by ``checkpoints/latest.json``): models know no pipeline, so this does not
call ``retrolm.checkpoint``; it needs only the layout that module documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from retrolm.errors import IncompatibleError
from retrolm.models.retrofit.base import AfterLayer, DecoderBase, hash_files
from retrolm.nn.kv_cache import KVCache

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def checkpoint_folder(path: Path) -> Path:
    """A run's newest checkpoint folder (``latest.json``'s), or ``path`` if it is one."""
    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        return path
    pointer = path / "checkpoints" / "latest.json"
    try:
        folder = path / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        folder = path / "checkpoint"  # the older single-folder layout
    if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
        return folder
    raise ValueError(
        f"base {path} is neither a retrolm run (no {pointer}) nor a Hugging Face model folder "
        "(no config.json with a model_type): pass a decoder to RETRO-fit"
    )


class RetrolmBase(DecoderBase):
    """The decoder of a retrolm RETRO run trained without retrieval (its CCA layers, never
    trained, are skipped exactly as RETRO skips them without neighbours)."""

    kind = "retrolm"

    def __init__(self, model: nn.Module, path: Path, ckpt: Path, meta: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.path, self.ckpt, self.meta = path, ckpt, meta
        c = model.config
        self.width, self.depth, self.vocab_size = c.dec_dim, c.dec_depth, c.num_tokens
        self.max_positions = c.max_seq_len
        data = meta.get("database") or meta.get("text") or {}
        self.tokenizer_hash = data.get("tokenizer_hash")
        if meta.get("database"):
            db = meta["database"].get("path")
            self.tokenizer_file = Path(db) / "tokenizer.json" if db else None
        else:
            self.tokenizer_file = ckpt.parent.parent / "tokenizer.json"

    @classmethod
    def load(cls, path: Path) -> RetrolmBase:
        from safetensors.torch import load_model

        from retrolm.models.registry import get_family

        ckpt = checkpoint_folder(path)
        try:
            meta = json.loads((ckpt / CONFIG).read_text())
            family, model_config = meta["family"], meta["model_config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IncompatibleError(f"{ckpt / CONFIG} is not a retrolm checkpoint ({e})") from None
        if family != "retro":
            raise ValueError(
                f"base {path} is a {family!r} run: RETRO-fit reads retrolm RETRO runs trained "
                "without retrieval (--no-retrieval) or Hugging Face causal-LM folders"
            )
        if (meta.get("train_config") or {}).get("retrieval", True):
            raise ValueError(
                f"base {path} was trained with retrieval (it reads neighbours already): "
                "RETRO-fit a decoder trained without it (retrolm train --no-retrieval)"
            )
        fam = get_family(family)
        model = fam.build(fam.make_config(model_config))
        load_model(model, str(ckpt / WEIGHTS), strict=True)
        return cls(model.eval(), path, ckpt, meta)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_emb

    @property
    def lm_head(self) -> nn.Module:
        return self.model.to_logits

    def content_hash(self) -> str:
        return hash_files([self.ckpt / WEIGHTS], self.meta["model_config"])

    def init_state(self, batch_size: int) -> list[KVCache]:
        return [KVCache() for _ in self.model.layers]

    def hidden(self, ids: Tensor, state: list[KVCache] | None, after_layer: AfterLayer) -> Tensor:
        """RETRO's decoder without neighbours (``RETRO._decode`` with ``retrieved=None``),
        calling ``after_layer`` after each layer."""
        m = self.model
        start = state[0].length if state is not None else 0
        pos = m.rotary.span(start, ids.shape[1], ids.device)
        x = m.token_emb(ids)
        for i, layer in enumerate(m.layers):
            kv = state[i] if state is not None else None
            x = layer.self_attn(x, cache=kv, q_rotary=pos, k_rotary=pos)
            if layer.cca is not None:
                x = layer.cca.zero_update(x)
            x = layer.ff(x)
            x = after_layer(i + 1, x)
        return m.final_norm(x)
