"""Shared building blocks, written once and reused by every model family."""

from retrolm.nn.attention import attend, attention_backend, reference_attend
from retrolm.nn.decode_linear import DecodeLinear
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.group_linear import GroupLinear
from retrolm.nn.kmeans import SphericalKMeans, update_kmeans
from retrolm.nn.knn_memory import KNNMemory, KNNMemoryList
from retrolm.nn.kv_cache import KVCache, cast_cache, prefill
from retrolm.nn.layer_drop import layer_drop_keep
from retrolm.nn.local_attention import local_attend
from retrolm.nn.losses import cross_entropy
from retrolm.nn.masks import causal_mask, combine, key_padding_mask, sliding_window_mask
from retrolm.nn.moe import MixtureOfExperts
from retrolm.nn.multihead import MultiHeadAttention
from retrolm.nn.norms import LayerNorm, RMSNorm, ScaleNorm, make_norm, norm_shift
from retrolm.nn.pkm import ProductKeyMemory, pkm_param_groups
from retrolm.nn.positions import AbsolutePositions, sinusoids
from retrolm.nn.relative_bias import RelativePositionBias, relative_position_bucket
from retrolm.nn.resample import CausalDownsample, repeat_upsample
from retrolm.nn.residual import Residual, deepnet_constants, deepnet_init_
from retrolm.nn.reversible import ReversibleSequence, is_recomputing, reversible
from retrolm.nn.rotary import RotaryEmbedding, apply_rotary
from retrolm.nn.scaling import BlockScale, LayerScale, depth_width_schedule, make_divisible
from retrolm.nn.sorted_window import dense_window_mask, sorted_window_attend
from retrolm.nn.token_shift import TokenShift, token_shift, token_shift_cached

__all__ = [
    "AbsolutePositions",
    "BlockScale",
    "CausalDownsample",
    "DecodeLinear",
    "FeedForward",
    "GroupLinear",
    "KNNMemory",
    "KNNMemoryList",
    "KVCache",
    "RelativePositionBias",
    "relative_position_bucket",
    "LayerScale",
    "cast_cache",
    "prefill",
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
    "cross_entropy",
    "deepnet_constants",
    "deepnet_init_",
    "depth_width_schedule",
    "key_padding_mask",
    "local_attend",
    "make_divisible",
    "make_norm",
    "norm_shift",
    "reference_attend",
    "repeat_upsample",
    "sliding_window_mask",
    "token_shift",
    "token_shift_cached",
    "MixtureOfExperts",
    "ProductKeyMemory",
    "ReversibleSequence",
    "SphericalKMeans",
    "TokenShift",
    "dense_window_mask",
    "is_recomputing",
    "layer_drop_keep",
    "pkm_param_groups",
    "reversible",
    "sinusoids",
    "sorted_window_attend",
    "update_kmeans",
]
