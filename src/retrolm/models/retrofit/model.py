"""RETRO-fitting: retrieval added to a decoder that is already trained (RETRO paper §4.4).

The base decoder (``base.py``: a retrolm run or a Hugging Face causal LM) is frozen; new are
the neighbour encoder (RETRO's ``RetroEncoder``, reading neighbours through the base's own
frozen token embedding, projected when the widths differ) and one chunked
cross-attention block (RETRO's ``ChunkedCrossAttention`` in a pre-norm residual) after each
chosen base layer P:

    H <- LAYER_p(H)                    # the base's, frozen
    if p == min(P): E <- ENCODER(RET, H)
    if p in P:      H <- H + CCA(norm(H), E)

with RETRO's exact CCA semantics, masks and causality (positions of chunk u read the
neighbours of chunk u-1 from position u*m + m-1 on). CCA's output projection starts at
zero, so before training the model computes exactly the base's logits.

The model is a ``RETRO`` whose decoder is the base: RETRO's forward (loss, logits,
``logits_to_keep``), input checks, neighbour encoding and per-chunk CCA keys/values with
their cache are reused as they are; only the decoder loop (``_decode``) is the base's.
Its state dict holds the new weights (and any ``unfreeze``-d base parameters) only: a
checkpoint records the base by path and content hash, and loading rebuilds the base
from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from retrolm.errors import IncompatibleError
from retrolm.models.retro.cache import RetroCache
from retrolm.models.retro.model import RETRO, ChunkedCrossAttention, RetroEncoder
from retrolm.models.retrofit.base import DecoderBase
from retrolm.models.retrofit.config import RetrofitConfig
from retrolm.models.retrofit.open import open_base
from retrolm.nn.residual import Residual
from retrolm.nn.rotary import RotaryEmbedding


@dataclass
class RetrofitCache(RetroCache):
    """RETRO's decoding state, with the base's own KV cache in place of RETRO's layers'."""

    base_state: Any = None


class NeighbourEmbedding(nn.Module):
    """Neighbour ids through the base's frozen token embedding (held, not owned: it stays
    the base's parameter), then a new projection to the encoder's width if it differs."""

    def __init__(self, embedding: nn.Embedding, enc_dim: int) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered twice in the module tree
        width = embedding.weight.shape[1]
        self.proj = nn.Linear(width, enc_dim, bias=False) if width != enc_dim else None

    def forward(self, ids: Tensor) -> Tensor:  # (..., r) -> (..., r, enc_dim)
        x = self._embedding[0](ids)
        return x if self.proj is None else self.proj(x)


class CCABlock(nn.Module):
    """One new chunked cross-attention block: ``H + CCA(norm(H), E)`` (``.cca`` as in a
    RETRO decoder layer, so RETRO's per-layer key/value code reads it)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.cca = Residual(config.dec_dim, ChunkedCrossAttention(config), config.norm)


class RetrofitRETRO(RETRO):
    """A frozen base decoder with RETRO's neighbour encoder and chunked cross-attention.

    ``RetrofitRETRO(config)`` opens ``config.base`` (checked against ``config.base_hash``);
    ``RetrofitRETRO(config, base=b)`` uses an opened base. See ``retrofit`` for the usual
    way in.
    """

    def __init__(
        self, config: RetrofitConfig | None = None, *, base: DecoderBase | None = None, **kwargs
    ) -> None:
        nn.Module.__init__(self)  # RETRO's own decoder is not built: the base is the decoder
        c = RetrofitConfig.resolve(config, kwargs)
        base = base if base is not None else open_base(c.base)
        _check_base(c, base)
        m = c.chunk_size
        c = dataclasses.replace(c, max_seq_len=min(c.max_seq_len, base.max_positions // m * m))
        self.config = c
        self.max_seq_len = c.max_seq_len
        self.trained_base = base.freeze(c.unfreeze)
        self.base = base
        rc = c.retro_config(base.width, base.depth, base.vocab_size)
        self.retro_config = rc
        self.cca_layers = rc.dec_cross_attn_layers
        self.rotary = RotaryEmbedding(rc.head_rotary_dim)
        emb = NeighbourEmbedding(base.token_embedding, rc.enc_dim)
        self.encoder = RetroEncoder(rc, 1.0, token_emb=emb)
        self.cca = nn.ModuleDict({str(p): CCABlock(rc) for p in self.cca_layers})
        self.copy_head = None
        self._init_new_weights()
        self.register_state_dict_post_hook(_drop_frozen_base)
        self.register_load_state_dict_post_hook(_allow_missing_base)

    def _init_new_weights(self) -> None:
        """RETRO's init for the new layers; CCA's output projections at zero (step 0 = base)."""
        for mod in (self.encoder, self.cca):
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
        for block in self.cca.values():
            out = block.cca.fn.attn.out_proj
            nn.init.zeros_(out.weight)
            if out.bias is not None:
                nn.init.zeros_(out.bias)

    # RETRO's forward reads these two: the base's, frozen
    @property
    def token_emb(self) -> nn.Embedding:
        return self.base.token_embedding

    @property
    def to_logits(self) -> nn.Module:
        return self.base.lm_head

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters RETRO-fitting adds (the encoder's and CCA's; not the base's)."""
        base = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base]

    def init_cache(self, batch_size: int) -> RetrofitCache:
        """A fresh cache for incremental decoding (``forward(..., cache=cache)``)."""
        return RetrofitCache(self_attn=[], base_state=self.base.init_state(batch_size))

    def _decode(self, seq, retrieved, neighbour_mask, cache: RetrofitCache | None) -> Tensor:
        """The base over ``seq`` (b, t), CCA after the chosen layers -> final states (b, t, d)."""
        m = self.config.chunk_size
        start = cache.length if cache is not None else 0
        q_cca = self.rotary.span(m - 1, m, seq.device)
        encoded: list[Any] = [None]  # the neighbours encoded in this call (first CCA layer)

        def after_layer(layer_no: int, x: Tensor) -> Tensor:
            block = self.cca[str(layer_no)] if str(layer_no) in self.cca else None
            if block is None or retrieved is None:  # pre-norm CCA without neighbours: x
                return x
            if layer_no == self.cca_layers[0]:
                encoded[0] = self._encode(x, retrieved, neighbour_mask, start, cache)
            kv, mask = self._cca_kv(layer_no, block, encoded[0], cache)
            full = cache.cca_full if cache is not None else None
            return block.cca(x, start, kv, mask, q_cca, full)

        state = cache.base_state if cache is not None else None
        h = self.base.hidden(seq, state, after_layer)
        if cache is not None:
            cache.length += seq.shape[1]
        return h


def _check_base(c: RetrofitConfig, base: DecoderBase) -> None:
    """The base is the one the config names (content hash) and can read its tokens."""
    if c.base_hash is not None:
        now = base.content_hash()
        if now != c.base_hash:
            raise IncompatibleError(
                f"base {base.path} changed since this model was RETRO-fitted (content hash "
                f"{now[:12]}, recorded {c.base_hash[:12]}): restore that base or retrain"
            )
    if c.num_tokens is not None and c.num_tokens > base.vocab_size:
        raise ValueError(
            f"the tokenizer has {c.num_tokens} tokens but base {base.path} embeds only "
            f"{base.vocab_size}: build the database with the base's tokenizer "
            "(retrolm db build --tokenizer BASE)"
        )


def _drop_frozen_base(module: RetrofitRETRO, state_dict, prefix: str, local_metadata) -> None:
    """State dict post-hook: leave out the frozen base (its path and hash stand for it)."""
    base = module.base
    for name, p in base.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            state_dict.pop(f"{prefix}base.{name}", None)
    for name, _ in base.named_buffers(remove_duplicate=False):
        state_dict.pop(f"{prefix}base.{name}", None)


def _allow_missing_base(module: RetrofitRETRO, incompatible) -> None:
    """Load post-hook: the frozen base is not in a checkpoint, so it is not missing."""
    frozen = {f"base.{n}" for n, p in module.base.named_parameters(remove_duplicate=False)}
    frozen -= {f"base.{n}" for n in module.trained_base}
    frozen |= {f"base.{n}" for n, _ in module.base.named_buffers(remove_duplicate=False)}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


def retrofit(
    base: str | DecoderBase, config: RetrofitConfig | None = None, **overrides: Any
) -> RetrofitRETRO:
    """RETRO-fit ``base`` (a path, or an opened ``DecoderBase``): its weights frozen, a new
    neighbour encoder and CCA layers after ``config.cca_layers``, at step 0 the base's logits.

    ``config``: a ``RetrofitConfig`` (default: the defaults), ``overrides`` its fields
    (``cca_layers=(3, 6)``, ``chunk_size=64``, ``unfreeze=("final_norm",)``, ...). The base's
    path and content hash are recorded in ``model.config``.
    """
    opened = base if isinstance(base, DecoderBase) else open_base(base)
    c = RetrofitConfig.resolve(config, overrides)
    c = dataclasses.replace(
        c, base=str(opened.path.resolve()), base_hash=c.base_hash or opened.content_hash()
    )
    return RetrofitRETRO(c, base=opened)
