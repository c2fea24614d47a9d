"""Multi-head attention module (self or cross), on the shared attention core.

One set of projection names for every family: ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``. Rotary is passed in as precomputed ``(cos, sin)`` for queries and keys
separately, so callers choose the geometry (causal LM positions, RETRO's chunk-relative
positions, a cache offset). Without autograd, self-attention projects q, k and v with one
matmul over the three weights concatenated (``project_qkv``). ``window`` makes it exact
sliding-window attention (each query sees itself and its ``window - 1`` predecessors):
O(n · window) blocks without a cache, a banded mask over the cached keys with one, and the
cache keeps only what later queries need.
Shapes: b batch, i queries, j keys, h heads, g kv heads, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrolm.nn.attention import attend
from retrolm.nn.decode_linear import DecodeLinear, compute_dtype, concat_decode_weight, linear_t
from retrolm.nn.kv_cache import KVCache
from retrolm.nn.local_attention import local_attend
from retrolm.nn.masks import causal_mask, combine, key_padding_mask, sliding_window_mask
from retrolm.nn.rotary import apply_rotary
from retrolm.nn.weight_cache import WeightCache

Rotary = tuple[Tensor, Tensor]


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(b, i, h*d) -> (b, h, i, d), a view (einops' rearrange costs ~3 us more per call,
    and this runs a dozen times per decoded token)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """(b, h, i, d) -> (b, i, h*d)."""
    return t.transpose(1, 2).flatten(2)


def _concat_t(*params: Tensor) -> tuple[Tensor, Tensor | None]:  # a WeightCache build
    """(q, k, v weights[, q, k, v biases], dtype) -> (fused weight as ``linear_t`` takes it,
    see ``decode_weight``; fused bias or None), in dtype."""
    *params, dtype = params
    w = concat_decode_weight(*params[:3], dtype)
    return w, (torch.cat(params[3:]).to(dtype) if len(params) > 3 else None)


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        *,
        context_dim: int | None = None,
        kv_heads: int | None = None,
        dropout: float = 0.0,
        causal: bool = False,
        bias: bool = False,
        num_mem_kv: int = 0,
        interleaved_rotary: bool = False,
        window: int | None = None,
    ) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if window is not None and (window < 1 or num_mem_kv or context_dim is not None):
            raise ValueError(
                f"window must be >= 1 and is for self-attention without memory key/values; "
                f"got window={window}, num_mem_kv={num_mem_kv}, context_dim={context_dim}"
            )
        self.window = window
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.causal = causal
        self.dropout = dropout
        self.interleaved_rotary = interleaved_rotary
        context_dim = context_dim or dim
        # q_proj/out_proj decode through a transposed copy (decode_linear); k/v see many rows
        self.q_proj = DecodeLinear(dim, heads * dim_head, bias=bias)
        self.k_proj = nn.Linear(context_dim, kv_heads * dim_head, bias=bias)
        self.v_proj = nn.Linear(context_dim, kv_heads * dim_head, bias=bias)
        self.out_proj = DecodeLinear(heads * dim_head, dim, bias=bias)
        # q/k/v weights as one (in, out) matrix in the compute dtype, for decoding
        self._fused = WeightCache(_concat_t)
        # learned key/values every query may attend (memory / null key-values)
        self.num_mem_kv = num_mem_kv
        if num_mem_kv:
            self.mem_k = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head) * 0.02)
            self.mem_v = nn.Parameter(torch.randn(kv_heads, num_mem_kv, dim_head) * 0.02)

    def train(self, mode: bool = True):
        if mode:  # the decoding copies are not needed while training
            self._fused.clear()
        return super().train(mode)

    def project_kv(self, context: Tensor, k_rotary: Rotary | None = None) -> tuple[Tensor, Tensor]:
        """(b, j, context_dim) -> k, v each (b, g, j, d); rotary applied to k."""
        k = _split_heads(self.k_proj(context), self.kv_heads)
        v = _split_heads(self.v_proj(context), self.kv_heads)
        if k_rotary is not None:
            k = apply_rotary(k, *k_rotary, interleaved=self.interleaved_rotary)
        return k, v

    def project_qkv(self, x: Tensor, rotary: Rotary | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention: (b, i, dim) -> q (b, h, i, d), k, v (b, g, i, d); ``rotary`` (cos,
        sin) each (i, r), if given, rotates q and k.

        Without autograd (decoding, prefill) one matmul over the three weights concatenated
        (kept by a ``WeightCache``) and one rotary call for q and k together: fewer kernels
        per decoded token. With autograd three matmuls, as the fused layout's strided q/k/v
        made a bf16 training step slower (3.28 vs 2.99 s, RETRO L=512 b=4, one thread)."""
        h, g = self.heads, self.kv_heads
        params = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            q = _split_heads(self.q_proj(x), h)
            k = _split_heads(self.k_proj(x), g)
            v = _split_heads(self.v_proj(x), g)
            if rotary is not None:
                q = apply_rotary(q, *rotary, interleaved=self.interleaved_rotary)
                k = apply_rotary(k, *rotary, interleaved=self.interleaved_rotary)
            return q, k, v
        if self.q_proj.bias is not None:
            params += (self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
        qkv = linear_t(x, *self._fused.get(*params, key=compute_dtype(x, params[0])))
        qkv = qkv.unflatten(-1, (h + 2 * g, -1))  # (b, i, h + 2g, d)
        qk, v = qkv.split((h + g, g), dim=2)  # (narrow/split: cheaper than indexing)
        if rotary is not None:
            cos, sin = rotary[0].unsqueeze(-2), rotary[1].unsqueeze(-2)  # (i, 1, r): all heads
            qk = apply_rotary(qk, cos, sin, interleaved=self.interleaved_rotary)
        q, k = qk.split((h, g), dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # (b, i, dim)
        context: Tensor | None = None,  # (b, j, context_dim); None = self-attention
        *,
        mask: Tensor | None = None,  # (b, j) key padding or bool broadcastable to (b, h, i, j)
        kv: tuple[Tensor, Tensor] | None = None,  # precomputed (k, v), e.g. encoded neighbours
        cache: KVCache | None = None,
        q_rotary: Rotary | None = None,
        k_rotary: Rotary | None = None,
    ) -> Tensor:  # (b, i, dim)
        if (
            cache is not None
            and x.shape[1] == 1
            and mask is None
            and context is None
            and kv is None
            and self.window is None
            and not self.num_mem_kv
            and q_rotary is k_rotary
            and not self.training  # (no dropout on this path)
            and not torch.is_grad_enabled()
        ):
            return self._decode_step(x, cache, q_rotary)
        if kv is None and context is None:
            # one rotary call for q and k when they share positions given as (i, r) tables
            joint = q_rotary is k_rotary and q_rotary is not None and q_rotary[0].dim() == 2
            q, k, v = self.project_qkv(x, q_rotary if joint else None)
            if k_rotary is not None and not joint:
                k = apply_rotary(k, *k_rotary, interleaved=self.interleaved_rotary)
        else:
            joint = False
            q = _split_heads(self.q_proj(x), self.heads)
            k, v = self.project_kv(context, k_rotary) if kv is None else kv
        if q_rotary is not None and not joint:
            q = apply_rotary(q, *q_rotary, interleaved=self.interleaved_rotary)
        if cache is not None:
            k, v = cache.update(k, v)
        p = self.dropout if self.training else 0.0
        if self.window is not None:
            out = self._windowed(q, k, v, mask, p)
            if cache is not None:
                cache.keep_last(self.window - 1)  # all that later queries can still see
            return self.out_proj(_merge_heads(out))
        if mask is not None and mask.dim() == 2:
            mask = key_padding_mask(mask)
        causal = self.causal and q.shape[-2] > 1  # one query sees every cached key
        if causal and (self.num_mem_kv or mask is not None):
            mask = combine(mask, causal_mask(q.shape[-2], k.shape[-2], device=q.device))
            causal = False
        if self.num_mem_kv:
            b = q.shape[0]
            k = torch.cat((self.mem_k.expand(b, -1, -1, -1).to(k.dtype), k), dim=-2)
            v = torch.cat((self.mem_v.expand(b, -1, -1, -1).to(v.dtype), v), dim=-2)
            if mask is not None:
                mem = torch.ones(
                    *mask.shape[:-1], self.num_mem_kv, dtype=torch.bool, device=mask.device
                )
                mask = torch.cat((mem, mask), dim=-1)
        out = attend(q, k, v, mask, causal=causal, dropout_p=p)
        return self.out_proj(_merge_heads(out))

    def _decode_step(self, x: Tensor, cache: KVCache, rotary: Rotary | None) -> Tensor:
        """One query per row against the cache: ``forward``'s result with about half its
        tensor calls (a decoding step is ~200 small kernels, where each call's dispatch and
        Python cost as much as its arithmetic). x (b, 1, dim) -> (b, 1, dim)."""
        h, g = self.heads, self.kv_heads
        params = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        if self.q_proj.bias is not None:
            params += (self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
        qkv = linear_t(x, *self._fused.get(*params, key=compute_dtype(x, params[0])))
        # (b, 1, (h+2g) d) -> (b, h+2g, 1, d): one query, so a view
        qkv = qkv.view(x.shape[0], h + 2 * g, 1, -1)
        qk, v = qkv.split_with_sizes((h + g, g), 1)
        if rotary is not None:
            qk = apply_rotary(qk, *rotary, interleaved=self.interleaved_rotary)
        q, k = qk.split_with_sizes((h, g), 1)
        k, v = cache.update(k, v)
        out = attend(q, k, v)  # (b, h, 1, d); a single query sees every cached key
        return self.out_proj(out.view(x.shape[0], 1, -1))

    def _windowed(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float) -> Tensor:
        """Sliding-window attention; mask may only be a (b, j) key padding mask."""
        if mask is not None and mask.dim() != 2:
            raise ValueError("windowed attention takes only a (b, j) key padding mask")
        i, j = q.shape[-2], k.shape[-2]
        if i == j:  # no cached past: exact O(n · window) blocks
            return local_attend(
                q, k, v, self.window, causal=self.causal, key_mask=mask, dropout_p=p
            )
        km = key_padding_mask(mask) if mask is not None else None
        if i == 1 and j <= self.window and self.causal:  # a decoding step: the band is all
            return attend(q, k, v, km, dropout_p=p)  # of the cache (it keeps window - 1)
        band = sliding_window_mask(i, j, self.window, causal=self.causal, device=q.device)
        return attend(q, k, v, combine(band, km), dropout_p=p)
