"""The DeLighT block (Mehta et al., ICLR 2021, §3.2 and Fig. 1c), decoder-only, pre-norm.

Shapes: b batch, n positions (queries), j keys (cached + new), d_m = dim,
d_o = d_m / 2 (the attention width), h = d_m / ffn_red.

    x = x + drop(out_proj(attend(qkv(DExTra(norm(x))))))   # single head of width d_o
    x = x + drop(FFN(norm(x)))                              # light FFN d_m -> h -> d_m

DExTra does the heavy lifting, so attention is one head over d_o = d_m/2 features (q, k
and v from one Linear d_o -> 3·d_o, scores scaled by 1/sqrt(d_o)) and the feed-forward
*reduces* (``ffn_red`` = 4: d_m -> d_m/4 -> d_m) where a standard block expands 4×. DExTra
and the FFN mix features, never positions: causality rests on the attention mask alone.
Attention is position-free unless given rotary (cos, sin) (``pos_emb="rotary"``, not in the
paper); the paper's model adds absolute positions to its input. The DeLighT LM
uses pre-norm ("not stable without this", the reference's comment), so only pre-norm is
offered.

Decoding (eval, one new position per row with a filled cache, fp32 CPU, ``nn.fused.decode``
usable) runs a block as four calls: the norm, DExTra's fused step (``dextra_decode``), the
fused ``projected_attention_block`` and the fused ``feed_forward_block`` (LayerNorm/RMSNorm
with GELU/SiLU; other norms and activations keep the ATen FFN); everything else, the ATen path.
"""

from __future__ import annotations

from torch import Tensor, nn

from retrolm.models.delight.dextra import DExTra, activation_name, norm_name
from retrolm.models.delight.dextra_decode import MAX_ROWS
from retrolm.nn.attention import attend
from retrolm.nn.feedforward import FeedForward
from retrolm.nn.fused import decode as fused_decode
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.norms import make_norm
from retrolm.nn.rotary import apply_rotary


class DeLighTBlock(nn.Module):
    """One causal DeLighT block, ``(b, n, dim) -> (b, n, dim)``; with a ``KVCache`` the ``n``
    new positions follow the cached ones (prefill, then one token per call).

    ``depth``, ``width_mult``, ``max_groups``, ``glt_groups``, ``shuffle``, ``norm_type``,
    ``act_type`` configure the ``DExTra`` (``.dextra``: dim -> dim/2); ``norm_type`` and
    ``act_type`` also pick the block's norms and the FFN activation. ``dropout`` is on both
    residual branches, ``attn_dropout`` on the attention probabilities, ``delight_dropout``
    inside DExTra."""

    def __init__(
        self,
        dim: int,
        depth: int,
        width_mult: float,
        max_groups: int | None = None,
        ffn_red: int = 4,
        glt_groups: str = "paper",
        shuffle: bool = True,
        norm_type: str = "ln",
        act_type: str = "swish",
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        delight_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and >= 2 (attention is dim/2 wide), got {dim}")
        if ffn_red < 1 or dim % ffn_red:
            raise ValueError(f"ffn_red={ffn_red} must be >= 1 and divide dim={dim}")
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        d_o, norm = dim // 2, norm_name(norm_type)
        self.attn_norm = make_norm(norm, dim)
        self.dextra = DExTra(
            dim,
            d_o,
            depth,
            width_mult,
            max_groups=max_groups,
            glt_groups=glt_groups,
            shuffle=shuffle,
            norm_type=norm_type,
            act_type=act_type,
            dropout=delight_dropout,
        )
        self.qkv = nn.Linear(d_o, 3 * d_o)
        self.out_proj = nn.Linear(d_o, dim)
        self.ffn_norm = make_norm(norm, dim)
        self.ffn = FeedForward(dim, hidden_dim=dim // ffn_red, activation=activation_name(act_type))
        # decoding's FFN branch as nn.fused.decode's feed-forward block (norm, both linears
        # with biases, activation, residual in one call) where it computes the same: a
        # LayerNorm or RMSNorm and GELU or SiLU
        fits = norm in ("layer", "rms") and activation_name(act_type) in ("gelu", "silu")
        self._fused_ffn_act = activation_name(act_type) if fits else None
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def attention(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,  # (cos, sin), each (n, d_o)
    ) -> Tensor:
        """The attention branch before its residual dropout: (b, n, dim) -> (b, n, dim).
        ``rotary``: rotate q and k by the n new positions (``pos_emb="rotary"``)."""
        h = self.dextra(self.attn_norm(x))  # (b, n, d_o)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # each (b, 1, n, d_o): one head
        if rotary is not None:  # keys cached rotated, as everywhere
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)  # (b, 1, j, d_o)
        p = self.attn_dropout if self.training else 0.0
        out = attend(q, k, v, causal=True, dropout_p=p)  # (b, 1, n, d_o); queries = last n keys
        return self.out_proj(out.squeeze(1))

    def _fused_attention(
        self, x: Tensor, cache: KVCache, rotary: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """x + attention(x) for one new position per row (eval, fp32 CPU, a filled cache):
        norm (ATen), DExTra (its fused step), then ``projected_attention_block``: q, k, v
        from DExTra's output, this position's key/value written into the cache, attention and
        the output projection with the residual in one call."""
        b, _, d = x.shape
        x2 = x.reshape(b, d)
        h = self.dextra(self.attn_norm(x2)).contiguous()  # (b, d_o)
        w, bias, e = self.qkv.weight, self.qkv.bias, h.shape[-1]  # rows [q; k; v]
        k_buf, v_buf, first, end = cache.claim(1)
        cos, sin = (fused_decode.NONE,) * 2 if rotary is None else (rotary[0][-1], rotary[1][-1])
        out = fused_decode.extension().projected_attention_block(
            x2, h, w[:e], bias[:e], w[e : 2 * e], bias[e : 2 * e], w[2 * e :], bias[2 * e :],
            self.out_proj.weight, self.out_proj.bias, cos.contiguous(), sin.contiguous(), k_buf,
            v_buf, first, end,
        )  # fmt: skip
        return out.view(b, 1, d)

    def forward(
        self,
        x: Tensor,  # (b, n, dim)
        cache: KVCache | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if cache is not None and cache.length and x.shape[1] == 1 and not self.training:
            if fused_decode.usable(x):  # a decoding step: DExTra and attention as fused calls
                x = self._fused_attention(x, cache, rotary)
            else:
                x = x + self.dropout(self.attention(x, cache, rotary))
        else:
            x = x + self.dropout(self.attention(x, cache, rotary))
        if (
            self._fused_ffn_act is not None
            and not self.training
            and x.shape[0] * x.shape[1] <= MAX_ROWS
            and fused_decode.usable(x)
        ):  # decoding (eval: dropout is the identity): one call
            ffn = self.ffn
            out, _ = fused_decode.feed_forward(
                x.reshape(-1, x.shape[-1]), self.ffn_norm, ffn.up_proj.weight, ffn.up_proj.bias,
                ffn.down_proj.weight, ffn.down_proj.bias, act=self._fused_ffn_act,
            )  # fmt: skip
            return out.view_as(x)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
