"""Shared building blocks, written once and reused by every model family."""

from retrolm.nn.attention import attend, attention_backend, reference_attend
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.local_attention import local_attend
from retrolm.nn.masks import causal_mask, combine, key_padding_mask, sliding_window_mask
from retrolm.nn.multihead import MultiHeadAttention
from retrolm.nn.norms import LayerNorm, RMSNorm, ScaleNorm, make_norm
from retrolm.nn.resample import CausalDownsample, repeat_upsample
from retrolm.nn.residual import Residual, deepnet_constants, deepnet_init_
from retrolm.nn.rotary import RotaryEmbedding, apply_rotary
from retrolm.nn.token_shift import token_shift, token_shift_cached

__all__ = [
    "CausalDownsample",
    "FeedForward",
    "KVCache",
    "LayerNorm",
    "MultiHeadAttention",
    "RMSNorm",
    "Residual",
    "RotaryEmbedding",
    "ScaleNorm",
    "apply_rotary",
    "attend",
    "attention_backend",
    "causal_mask",
    "combine",
    "deepnet_constants",
    "deepnet_init_",
    "key_padding_mask",
    "local_attend",
    "make_norm",
    "reference_attend",
    "repeat_upsample",
    "sliding_window_mask",
    "token_shift",
    "token_shift_cached",
]
