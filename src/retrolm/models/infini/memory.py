"""The compressive memory of Infini-attention (arXiv 2404.07143, section 2.1.2).

Per layer and head a matrix ``M`` (d_k x d_v) and a normaliser ``z`` (d_k), read and written
through the feature map sigma = ELU + 1 of the *unrotated* queries and keys:

- retrieve (eq. 3): ``A_mem = sigma(Q) M / (sigma(Q) z)``, the denominator clamped at 1e-10,
  so an all-zero memory (no past: the first segment) returns 0;
- linear update (eq. 4): ``M += sigma(K)^T V``, ``z += sum_t sigma(K_t)``;
- delta rule (eq. 5): ``M += sigma(K)^T (V - sigma(K) M / (sigma(K) z))``: only what the memory
  does not already return is written (the first write, into a zero memory, is linear);
- an optional write strength beta (b, h, n) scales what is written: ``beta V`` or
  ``beta (V - retrieved)`` (``learned_delta_update``); z is always updated as in eq. 4;
- combine (eq. 6), the gate of ``infini-transformer-pytorch``: ``out = sigmoid(g) A_local +
  (1 - sigmoid(g)) A_mem`` with one learned g per head (the paper's beta is -g).

``M`` and ``z`` are float32 whatever the activations (float64 inputs keep float64): a sum
over thousands of segments in bf16 would lose the small terms.

Notation: b batch, h heads, n tokens, k = d_k, v = d_v.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DENOMINATOR_MIN = 1e-10


class Memories(NamedTuple):
    """One layer's compressive memory (the reference's name and field order)."""

    kv_mem: Tensor  # (b, h, k, v) M, float32 (float64 for float64 inputs)
    k_norm: Tensor  # (b, h, k)    z

    def detach(self) -> Memories:
        return Memories(self.kv_mem.detach(), self.k_norm.detach())


def state_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 activations, else float32 (never a half type)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def feature_map(x: Tensor) -> Tensor:
    """sigma(x) = ELU(x) + 1 > 0, in the memory's dtype."""
    return F.elu(x.to(state_dtype(x))) + 1.0


def _no_autocast(x: Tensor):
    """The memory's arithmetic in its own dtype, also under autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _read(features: Tensor, mem: Memories) -> Tensor:  # (b, h, n, k) -> (b, h, n, v)
    num = features @ mem.kv_mem.to(features.dtype)  # (b, h, n, v)
    den = (features @ mem.k_norm.to(features.dtype)[..., None]).clamp(min=DENOMINATOR_MIN)
    return num / den


def retrieve(queries: Tensor, mem: Memories) -> Tensor:  # (b, h, n, k) -> (b, h, n, v)
    """Eq. 3 in the memory's dtype."""
    with _no_autocast(queries):
        return _read(feature_map(queries), mem)


def empty_memories(keys: Tensor, values: Tensor) -> Memories:
    """The all-zero memory (no past) for keys (b, h, n, k) and values (b, h, n, v)."""
    b, h, _, dk = keys.shape
    dtype = state_dtype(keys)
    return Memories(
        keys.new_zeros(b, h, dk, values.shape[-1], dtype=dtype),
        keys.new_zeros(b, h, dk, dtype=dtype),
    )


def write(
    keys: Tensor,  # (b, h, n, k) unrotated
    values: Tensor,  # (b, h, n, v)
    past: Memories | None,
    *,
    delta: bool = False,
    weights: Tensor | None = None,  # (b, h, n) or (b, h, n, 1): beta, the write strength
    key_mask: Tensor | None = None,  # (b, 1|h, n, 1) bool: False = not written at all
) -> Memories:
    """Eqs. 4-5: the memory after writing one segment's keys and values."""
    with _no_autocast(keys):
        features = feature_map(keys)  # (b, h, n, k)
        if key_mask is not None:  # a masked token adds nothing to M or z
            features = features * key_mask.to(features.dtype)
        v = values.to(features.dtype)
        if delta and past is not None:  # a zero memory returns 0: the first write is linear
            v = v - _read(features, past)
        if weights is not None:
            w = weights if weights.dim() == 4 else weights[..., None]
            v = v * w.to(features.dtype)
        dm = features.transpose(-1, -2) @ v  # (b, h, k, v)
        dz = features.sum(dim=-2)  # (b, h, k)
        if past is None:
            return Memories(dm, dz)
        return Memories(past.kv_mem.to(dm.dtype) + dm, past.k_norm.to(dz.dtype) + dz)


class FastweightMemory(nn.Module):
    """The compressive memory's read, gate and write for one attention layer; exported, as
    in the reference, so it can be fitted into another model's attention.

    ``head_gates`` (h,) start at ``head_gate_init_value`` (default 0: half local, half
    memory; the reference's 10 gives the memory path 4.5e-5 of the gradient) and carry
    ``_retrolm_lr_scale = gate_lr_scale``: the trainer gives them their own optimizer group
    (that many times the learning rate, no weight decay)."""

    def __init__(
        self,
        heads: int,
        head_gate_init_value: float = 0.0,
        use_mem_delta_rule: bool = False,
        gate_lr_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        self.heads = heads
        self.use_mem_delta_rule = use_mem_delta_rule
        self.head_gates = nn.Parameter(torch.full((heads,), float(head_gate_init_value)))
        self.head_gates._retrolm_lr_scale = float(gate_lr_scale)  # read by train.param_groups

    def create_new_memories(
        self,
        keys: Tensor,  # (b, h, n, k) unrotated
        values: Tensor,  # (b, h, n, v)
        past_memories: Memories | None = None,
        weights: Tensor | None = None,  # (b, h, n) write strength beta
        key_mask: Tensor | None = None,  # (b, 1|h, n, 1) bool, False = skip this token
    ) -> Memories:
        """The memory after this segment: ``past_memories`` (None: all zero) plus its
        keys and values, by eq. 4 or (``use_mem_delta_rule``) eq. 5."""
        return write(
            keys,
            values,
            past_memories,
            delta=self.use_mem_delta_rule,
            weights=weights,
            key_mask=key_mask,
        )

    def retrieve_and_add_to_output(
        self,
        out: Tensor,  # (b, h, n, v) the local attention output
        queries: Tensor,  # (b, h, n, k) unrotated
        past_memories: Memories | None = None,
    ) -> Tensor:  # (b, h, n, v)
        """Eq. 6: ``sigmoid(g) out + (1 - sigmoid(g)) A_mem``, with ``A_mem = 0`` when there
        is no past memory (the first segment is gated like every other)."""
        gate = self.head_gates.sigmoid().view(1, -1, 1, 1).to(out.dtype)  # (1, h, 1, 1)
        if past_memories is None:
            return out * gate
        mem_out = retrieve(queries, past_memories).to(out.dtype)
        return out * gate + mem_out * (1 - gate)
