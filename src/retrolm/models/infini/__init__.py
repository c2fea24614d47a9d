"""Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143): ``memory.py`` the
compressive memory (the paper's idea), ``attention.py`` the layer, ``model.py`` the decoder
and its segment runner, ``lm.py`` the registry's model, ``wrapper.py`` the reference's
training and sampling wrapper, ``cache.py`` the stream's state, ``config.py`` config and
presets, ``family.py`` the registry hooks."""

from retrolm.models.infini.cache import InfiniCache, SegmentKV
from retrolm.models.infini.config import PRESETS, InfiniConfig
from retrolm.models.infini.lm import InfiniLanguageModel
from retrolm.models.infini.memory import FastweightMemory, Memories
from retrolm.models.infini.model import InfiniTransformer, TransformerReturn
from retrolm.models.infini.wrapper import InfiniTransformerWrapper

__all__ = [
    "PRESETS",
    "FastweightMemory",
    "InfiniCache",
    "InfiniConfig",
    "InfiniLanguageModel",
    "InfiniTransformer",
    "InfiniTransformerWrapper",
    "Memories",
    "SegmentKV",
    "TransformerReturn",
]
