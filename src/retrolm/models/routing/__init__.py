"""Routing Transformer (Roy et al. 2021): ``attention.py`` routing attention (the paper's
idea), ``model.py`` the layer stack and language model, ``config.py`` the config and
presets, ``cache.py`` incremental decoding, ``balanced.py`` the reference's balanced
routing, ``encdec.py`` the encoder-decoder, ``fused.py`` the one-token fast path."""

from retrolm.models.routing.attention import RoutingAttention
from retrolm.models.routing.cache import RoutingCache
from retrolm.models.routing.config import PRESETS, RoutingConfig
from retrolm.models.routing.encdec import RoutingTransformerEncDec
from retrolm.models.routing.model import (
    RoutingLanguageModel,
    RoutingTransformer,
    RoutingTransformerLM,
    pkm_param_groups,
)

__all__ = [
    "PRESETS",
    "RoutingAttention",
    "RoutingCache",
    "RoutingConfig",
    "RoutingLanguageModel",
    "RoutingTransformer",
    "RoutingTransformerEncDec",
    "RoutingTransformerLM",
    "pkm_param_groups",
]
