"""A local Hugging Face causal-LM folder as a RETRO-fit base (GPT-2, Llama and the other
decoder-only models whose inner model keeps its blocks in ``layers`` or ``h``).

Loaded with ``from_pretrained(path, local_files_only=True)``: never from the network.
Chunked cross-attention goes after chosen blocks through forward hooks on the inner
model's block list, which replace a block's hidden states with what ``after_layer``
returns; the inner model (``base_model``) then applies its final norm, and the output
projection is the model's ``lm_head``, exactly as its own forward computes the logits.
Decoding keeps the model's own ``past_key_values`` (a ``DynamicCache``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from retrolm.models.retrofit.base import AfterLayer, DecoderBase, hash_files

_LAYER_LISTS = ("layers", "h", "blocks")  # Llama/Mistral/Qwen/NeoX, GPT-2/GPT-J, others


def _block_list(inner: nn.Module) -> nn.ModuleList | None:
    for name in _LAYER_LISTS:
        found = getattr(inner, name, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return found
    return None


class HFBase(DecoderBase):
    """A Hugging Face decoder-only causal LM (module docstring)."""

    kind = "hf"

    def __init__(self, model: nn.Module, path: Path) -> None:
        super().__init__()
        self.model = model
        self.path = path
        cfg = model.config
        self.blocks = _block_list(model.base_model)
        head = model.get_output_embeddings()
        if (
            getattr(cfg, "is_encoder_decoder", False)
            or self.blocks is None
            or not isinstance(head, nn.Linear)
        ):
            raise ValueError(
                f"base {path} ({type(model).__name__}) is not a decoder-only causal LM with a "
                f"linear output head and a block list ({'/'.join(_LAYER_LISTS)}); RETRO-fit "
                "needs one (GPT-2, Llama, ...)"
            )
        if head.bias is not None or getattr(cfg, "final_logit_softcapping", None):
            raise ValueError(
                f"base {path}: its logits are not a plain projection (bias or soft-capping); "
                "RETRO-fit supports bases whose lm_head is a bias-free linear layer"
            )
        emb = model.get_input_embeddings()
        self.width, self.depth = int(emb.weight.shape[1]), len(self.blocks)
        self.vocab_size = int(head.weight.shape[0])
        self.max_positions = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        )
        self.tokenizer_file = path / "tokenizer.json"
        self._after: AfterLayer | None = None
        for i, block in enumerate(self.blocks):
            block.register_forward_hook(self._hook(i + 1))

    @classmethod
    def load(cls, path: Path, **kwargs: Any) -> HFBase:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True)
            if getattr(cfg, "is_encoder_decoder", False) or not (
                getattr(cfg, "is_decoder", False)
                or type(cfg) in AutoModelForCausalLM._model_mapping
            ):
                raise ValueError("not a causal LM")
            if cfg.model_type in ("bert", "roberta", "electra", "xlm-roberta", "camembert"):
                raise ValueError("an encoder (bidirectional)")
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=kwargs.pop("dtype", torch.float32), **kwargs
            )
        except (ValueError, OSError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"base {path} is not a decoder-only causal LM that transformers can load "
                f"from disk ({first}); RETRO-fit needs one (GPT-2, Llama, ...)"
            ) from None
        return cls(model.eval(), Path(path))

    def _hook(self, layer_no: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._after is None:
                return None
            if isinstance(output, tuple):
                return (self._after(layer_no, output[0]), *output[1:])
            return self._after(layer_no, output)

        return hook

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def content_hash(self) -> str:
        files = [*self.path.glob("*.safetensors"), *self.path.glob("*.bin")]
        return hash_files([*files, self.path / "config.json"])

    def init_state(self, batch_size: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def hidden(self, ids: Tensor, state: Any, after_layer: AfterLayer) -> Tensor:
        self._after = after_layer
        inner = self.model.base_model
        # transformers >= 5.2x names the cache argument ``cache`` (past_key_values before)
        named = inspect.signature(inner.forward).parameters
        key = "cache" if "cache" in named else "past_key_values"
        try:
            out = inner(input_ids=ids, use_cache=state is not None, **{key: state})
        finally:
            self._after = None
        return out.last_hidden_state
