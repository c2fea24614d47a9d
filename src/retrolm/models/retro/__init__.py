"""RETRO (Borgeaud et al. 2022): ``model.py`` the paper's decoder, encoder and chunked
cross-attention; ``config.py`` the config and presets; ``cache.py`` the decoding state;
``copy_head.py`` the neighbour copy head (not in the paper); ``fused.py`` the one-token
fast path."""

from retrolm.models.retro.cache import RetroCache
from retrolm.models.retro.config import PRESETS, RetroConfig
from retrolm.models.retro.copy_head import NeighbourCopyHead, copy_head_disabled
from retrolm.models.retro.model import RETRO, ChunkedCrossAttention

__all__ = [
    "PRESETS",
    "RETRO",
    "ChunkedCrossAttention",
    "NeighbourCopyHead",
    "RetroCache",
    "RetroConfig",
    "copy_head_disabled",
]
