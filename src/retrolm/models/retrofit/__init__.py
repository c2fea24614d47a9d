"""RETRO-fit (RETRO paper §4.4): retrieval added to a trained, frozen decoder.

``base.py`` what a base decoder offers and ``open_base``; ``retrolm_base.py`` a retrolm run
trained without retrieval; ``hf_base.py`` a local Hugging Face causal-LM folder;
``config.py`` the config and presets; ``model.py`` the model (RETRO's encoder and chunked
cross-attention after chosen base layers) and ``retrofit()``.
"""

from retrolm.models.retrofit.base import DecoderBase
from retrolm.models.retrofit.config import RetrofitConfig
from retrolm.models.retrofit.model import RetrofitRETRO, retrofit
from retrolm.models.retrofit.open import open_base

__all__ = ["DecoderBase", "RetrofitConfig", "RetrofitRETRO", "open_base", "retrofit"]
