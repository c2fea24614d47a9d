"""T5 relative position bias (Raffel et al., JMLR 2020, §2.1): a learned scalar per head and
per *bucket* of the query-key distance, added to the attention logits.

Buckets: the first ``num_buckets // 2`` distances have one bucket each; larger distances share
log-spaced buckets up to ``max_distance``, beyond which all fall in the last bucket. Causal
(one-sided) bucketing counts only ``q - k >= 0`` (a key ahead of its query gets bucket 0, and
the causal mask removes it anyway); bidirectional bucketing gives each sign half the buckets.

Positions are passed in, so any geometry works: queries after a Transformer-XL memory
(query ``t`` at position ``M + t``, the memory's keys at ``0 .. M-1``), a KV cache (``i != j``).
Notation: h heads, i queries, j keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_position_bucket(
    rel: Tensor,  # (...) int: query position - key position
    num_buckets: int = 32,
    max_distance: int = 128,
    causal: bool = True,
) -> Tensor:  # (...) int64 in [0, num_buckets)
    """The T5 bucket of each distance ``q - k``."""
    if causal:
        n = rel.clamp(min=0)
        offset = torch.zeros_like(n)
    else:
        num_buckets //= 2
        offset = (rel < 0).long() * num_buckets
        n = rel.abs()
    exact = num_buckets // 2
    # log-spaced above `exact`, reaching the last bucket at max_distance
    far = (
        exact
        + (
            torch.log(n.float().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (num_buckets - exact)
        ).long()
    )
    far = far.clamp(max=num_buckets - 1)
    return offset + torch.where(n < exact, n, far)


class RelativePositionBias(nn.Module):
    """``bias(q_pos, k_pos) -> (h, i, j)``: the learned bucket bias times ``scale``."""

    def __init__(
        self,
        heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        causal: bool = True,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if num_buckets < 2 or max_distance <= num_buckets // 2:
            raise ValueError(
                f"need num_buckets >= 2 and max_distance > num_buckets // 2, got "
                f"num_buckets={num_buckets}, max_distance={max_distance}"
            )
        self.num_buckets, self.max_distance, self.causal = num_buckets, max_distance, causal
        self.scale = scale
        self.table = nn.Embedding(num_buckets, heads)  # (buckets, h)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:  # (i,), (j,) -> (h, i, j)
        rel = q_pos[:, None] - k_pos[None, :]  # (i, j)
        bucket = relative_position_bucket(rel, self.num_buckets, self.max_distance, self.causal)
        return self.table(bucket).permute(2, 0, 1) * self.scale

    def toeplitz(self, q_first: int, n: int, j: int) -> Tensor:  # (h, n, j)
        """``forward(q_first + arange(n), arange(j))``: queries right after each other and
        keys at ``0 .. j-1``. The bias depends only on the distance, so it is gathered once
        per distance (``n + j - 1`` of them) and laid out by a strided view: its backward sums
        along diagonals instead of scattering ``n * j`` rows into the table."""
        dist = torch.arange(q_first + n - 1, q_first - j, -1, device=self.table.weight.device)
        bucket = relative_position_bucket(dist, self.num_buckets, self.max_distance, self.causal)
        per_dist = self.table(bucket).t() * self.scale  # (h, n + j - 1), largest distance first
        return per_dist.unfold(1, j, 1).flip(1)  # row i: distances q_first + i - (0 .. j-1)
