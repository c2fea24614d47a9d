"""Memorizing Transformer (Wu et al., ICLR 2022): ``knn_attention.py`` the kNN-augmented
attention (the paper's idea) and the XL attention of the other layers, ``model.py`` the
segment-recurrent stack and language model, ``cache.py`` the memories carried between
segments, ``config.py`` the config and presets, ``family.py`` the registry hooks. The kNN
memory itself is the shared block ``retrolm.nn.knn_memory``."""

from retrolm.models.memorizing.cache import MemorizingCache, XLMemories
from retrolm.models.memorizing.config import PRESETS, MemorizingConfig
from retrolm.models.memorizing.knn_attention import KNNAttention, XLAttention
from retrolm.models.memorizing.model import MemorizingLanguageModel, MemorizingTransformer

__all__ = [
    "PRESETS",
    "KNNAttention",
    "MemorizingCache",
    "MemorizingConfig",
    "MemorizingLanguageModel",
    "MemorizingTransformer",
    "XLAttention",
    "XLMemories",
]
