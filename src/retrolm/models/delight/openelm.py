"""OpenELM's transformer block (Mehta et al., "OpenELM", 2024, §2), the block that
layer-wise scaling sizes: each layer its own query heads, key/value heads and FFN width.

Shapes: b batch, n new positions, j keys (cached + new), d = dim, h query heads,
g key/value heads (h = g · num_gqa_groups), e = head_dim, f = ffn_dim.

    x = x + drop(W_o · attend(rope(qknorm(q)), rope(qknorm(k)), v))   # GQA, causal
    x = x + drop(SwiGLU_f(rmsnorm(x)))

Pre-RMSNorm before both branches, no biases anywhere, q/k/v from one projection, an RMSNorm
over each query and key head (``normalize_qk``, OpenELM's ``normalize_qk_projections``)
before the rotary (base 10000), keys/values shared by ``h / g`` query heads.
"""

from __future__ import annotations

from torch import Tensor, nn

from retrolm.models.delight.dextra import activation_name
from retrolm.nn.attention import attend
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.norms import RMSNorm
from retrolm.nn.rotary import apply_rotary


class OpenELMBlock(nn.Module):
    """One causal OpenELM layer, ``(b, n, dim) -> (b, n, dim)``; ``rotary`` is the
    ``(cos, sin)`` of the n positions, each ``(n, head_dim)``; with a ``KVCache`` the new
    positions follow the cached ones."""

    def __init__(
        self,
        dim: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        ffn_dim: int,
        normalize_qk: bool = True,
        act_type: str = "swish",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
            raise ValueError(
                f"q_heads={q_heads} must be a positive multiple of kv_heads={kv_heads}"
            )
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.attn_norm = RMSNorm(dim)
        self.qkv = nn.Linear(dim, (q_heads + 2 * kv_heads) * head_dim, bias=False)
        self.q_norm = RMSNorm(head_dim) if normalize_qk else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if normalize_qk else nn.Identity()
        self.out_proj = nn.Linear(q_heads * head_dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim)
        act = activation_name(act_type)
        self.ffn = FeedForward(dim, hidden_dim=ffn_dim, glu=True, activation=act, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def attention(
        self, x: Tensor, rotary: tuple[Tensor, Tensor], cache: KVCache | None = None
    ) -> Tensor:
        """The attention branch before its residual dropout: (b, n, d) -> (b, n, d)."""
        h, g, e = self.q_heads, self.kv_heads, self.head_dim
        qkv = self.qkv(self.attn_norm(x)).unflatten(-1, (h + 2 * g, e)).transpose(1, 2)
        q, k, v = qkv.split((h, g, g), dim=1)  # (b, h, n, e), (b, g, n, e), (b, g, n, e)
        cos, sin = rotary
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (b, g, j, e)
        p = self.attn_dropout if self.training else 0.0
        out = attend(q, k, v, causal=True, dropout_p=p)  # (b, h, n, e); queries = last n keys
        return self.out_proj(out.transpose(1, 2).flatten(-2))

    def forward(
        self, x: Tensor, rotary: tuple[Tensor, Tensor], cache: KVCache | None = None
    ) -> Tensor:  # (b, n, d)
        x = x + self.dropout(self.attention(x, rotary, cache))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
