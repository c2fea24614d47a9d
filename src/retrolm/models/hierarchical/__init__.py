"""Simple Hierarchical Transformer: ``model.py`` the streams at several token strides and
their merges (the idea), ``config.py`` the config and presets, ``cache.py`` the decoding
state, ``fused.py`` the one-token fast path."""

from retrolm.models.hierarchical.cache import BlockState, HierarchicalCache
from retrolm.models.hierarchical.config import PRESETS, HierarchicalConfig
from retrolm.models.hierarchical.model import HierarchicalTransformer, hierarchical_loss

__all__ = [
    "PRESETS",
    "BlockState",
    "HierarchicalCache",
    "HierarchicalConfig",
    "HierarchicalTransformer",
    "hierarchical_loss",
]
