"""Spherical k-means with an exponential moving average of counts and sums.

Used by the Routing Transformer (Roy et al., TACL 2021, arXiv 2003.05997, §4.1): queries
and keys are routed to their nearest centroid on the unit sphere. Following the paper's
official code (a VQ-VAE style EMA), the statistics kept are per-cluster *counts* and *sums*
of unit vectors, in fp32 whatever the model dtype; the centroid is the re-normalised sum, so
it always lies on the sphere.

Life cycle, one instance per layer, ``h`` independent heads of ``k`` clusters in ``d`` dims:

* ``init_(x)``: explicit initialisation (a few Lloyd iterations from a batch). ``route``
  calls it lazily on the first *training* forward only, never at generation.
* ``route(x)`` assigns every vector to its nearest centroid (a per-token decision, so it
  never looks at other positions) and, in training, accumulates batch statistics, except
  while a reversible stack recomputes its forward (``reversible.is_recomputing()``).
* ``update()`` all-reduces the accumulated statistics across DDP ranks and applies the EMA.
  Models call it after backward (``update_after_backward``) or the user calls it.

Notation: b batch, h heads, n positions, k clusters, d dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from retrolm.nn.distributed import all_reduce_sum_, broadcast_
from retrolm.nn.fused import train as fused_train
from retrolm.nn.norms import l2_normalize
from retrolm.nn.reversible import in_reversible_forward, is_recomputing


class SphericalKMeans(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_clusters: int,
        dim: int,
        *,
        decay: float = 0.999,
        init_iters: int = 10,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"k-means EMA decay must be in [0, 1), got {decay}")
        self.num_heads, self.num_clusters, self.dim = num_heads, num_clusters, dim
        self.decay, self.init_iters, self.eps = decay, init_iters, eps
        means = F.normalize(torch.randn(num_heads, num_clusters, dim), dim=-1)
        self.register_buffer("means", means)  # (h, k, d) fp32, unit norm
        self.register_buffer("ema_sum", means.clone())  # (h, k, d) fp32
        self.register_buffer("ema_count", torch.ones(num_heads, num_clusters))  # (h, k) fp32
        self.register_buffer("initted", torch.tensor(False))
        # statistics of the forwards since the last update; plain attributes, not buffers,
        # so DDP's buffer broadcast never overwrites one rank's statistics with another's
        self._pending: tuple[Tensor, Tensor] | None = None

    # --- assignment -------------------------------------------------------------------
    def assign(self, x: Tensor) -> Tensor:
        """x (b, h, n, d) -> nearest centroid (b, h, n) int64 (cosine similarity)."""
        xn = l2_normalize(x.float())
        return torch.matmul(xn, self.means.float().transpose(-1, -2)).argmax(dim=-1)

    def route(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Assign ``x`` (b, h, n, d); mask (b, n) True = real token.

        Returns (buckets (b, h, n), commitment loss (scalar, unweighted)): the mean squared
        distance between each unit vector and its centroid, whose gradient pulls queries and
        keys towards their centroids (the centroids themselves move only by the EMA).
        """
        if self.training and not bool(self.initted) and not is_recomputing():
            self.init_(x, mask)
        grad_pass = torch.is_grad_enabled() or in_reversible_forward()
        stats = self.training and grad_pass and not is_recomputing()
        if fused_train.kmeans_applies(x, self.means):
            # unit vectors, similarities, argmax and the batch statistics in one C++ pass
            best, buckets, sums, counts = fused_train.kmeans_assign(x, self.means, mask, stats)
            if stats:
                self._add_pending(sums, counts)
            return buckets, self._commitment(best, mask)
        xn = l2_normalize(x if x.dtype is torch.float32 else x.float())
        best, buckets = self._similarities(xn).max(dim=-1)  # (b, h, n)
        if stats:
            self._accumulate(xn.detach(), buckets, mask)
        return buckets, self._commitment(best, mask)

    def _commitment(self, best: Tensor, mask: Tensor | None) -> Tensor:
        """The mean over (real) tokens of ||xn - c||^2 / d, from best = xn . c."""
        # both are unit vectors: ||x - c||^2 = 2 - 2 x.c, so no centroid gather is needed
        # 2 - 2 * best in one kernel (rsub's alpha: the same value, 2 * best is exact)
        err = torch.rsub(best, 2.0, alpha=2.0) / self.dim  # (b, h, n), mean over the d dims
        if mask is not None:
            w = mask[:, None, :].to(err.dtype).expand_as(err)
            return (err * w).sum() / w.sum().clamp(min=1.0)
        return err.mean()

    def _similarities(self, xn: Tensor) -> Tensor:
        """Unit vectors xn (b, h, n, d) fp32 -> cosine similarities (b, h, n, k)."""
        means = self.means
        if means.dtype is not torch.float32:  # fp32 even inside a model cast to another dtype
            means = means.float()
        mt = means.transpose(-1, -2)  # (h, d, k)
        b, h, n, d = xn.shape
        if b == 1 and xn.is_contiguous():
            # the batched product matmul runs here, without its broadcasting reshapes (a
            # decoding step: 4 dispatched calls fewer per layer); einsum costs more per call
            return torch.bmm(xn.view(h, n, d), mt).view(1, h, n, -1)
        return torch.matmul(xn, mt)

    # --- statistics -------------------------------------------------------------------
    def _batch_stats(self, xn: Tensor, buckets: Tensor, mask: Tensor | None):
        """Per-cluster sums (h, k, d) and counts (h, k) of unit vectors, real tokens only."""
        onehot = F.one_hot(buckets, self.num_clusters).to(xn.dtype)  # (b, h, n, k)
        if mask is not None:
            onehot = onehot * mask[:, None, :, None].to(xn.dtype)
        sums = torch.einsum("bhnk,bhnd->hkd", onehot, xn)
        return sums, onehot.sum(dim=(0, 2))

    def _accumulate(self, xn: Tensor, buckets: Tensor, mask: Tensor | None) -> None:
        self._add_pending(*self._batch_stats(xn, buckets, mask))

    def _add_pending(self, sums: Tensor, counts: Tensor) -> None:
        if self._pending is not None:
            sums, counts = sums + self._pending[0], counts + self._pending[1]
        self._pending = (sums, counts)

    @torch.no_grad()
    def update(self) -> None:
        """Apply the EMA to the statistics gathered since the last call (all-reduced
        under DDP, so every rank keeps identical centroids); then re-normalise."""
        if self._pending is None:
            return
        sums, counts = self._pending
        self._pending = None
        sums, counts = sums.to(self.ema_sum.dtype), counts.to(self.ema_count.dtype)
        all_reduce_sum_(sums, counts)
        d = self.decay
        ema_sum = self.ema_sum * d + sums * (1 - d)
        ema_count = self.ema_count * d + counts * (1 - d)
        norm = ema_sum.norm(dim=-1, keepdim=True)
        # rebind (not in-place): the old centroids may still be saved for a later backward
        self.means = torch.where(norm > self.eps, ema_sum / norm.clamp(min=self.eps), self.means)
        self.ema_sum, self.ema_count = ema_sum, ema_count

    def discard_pending(self) -> None:
        self._pending = None

    @torch.no_grad()
    def init_(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Initialise from a batch x (b, h, n, d): ``k`` distinct real vectors per head
        (rank 0's, under DDP), then ``init_iters`` spherical Lloyd steps over all ranks' data."""
        xn = l2_normalize(x.float())
        b, h, n, d = xn.shape
        flat = rearrange(xn, "b h n d -> h (b n) d")
        real = torch.ones(b * n, dtype=torch.bool, device=x.device)
        if mask is not None:
            real = rearrange(mask, "b n -> (b n)").clone()
        cand = real.nonzero().squeeze(-1)
        if cand.numel() == 0:
            return
        if cand.numel() >= self.num_clusters:  # distinct samples per head
            pick = torch.stack(
                [cand[torch.randperm(cand.numel())[: self.num_clusters]] for _ in range(h)]
            )
        else:
            pick = cand[torch.randint(0, cand.numel(), (h, self.num_clusters))]
        means = torch.gather(flat, 1, pick[..., None].expand(-1, -1, d))  # (h, k, d)
        broadcast_(means)
        sums, counts = means.clone(), torch.ones_like(self.ema_count)
        for _ in range(self.init_iters):
            buckets = torch.einsum("bhnd,hkd->bhnk", xn, means).argmax(dim=-1)
            sums, counts = self._batch_stats(xn, buckets, mask)
            all_reduce_sum_(sums, counts)
            norm = sums.norm(dim=-1, keepdim=True)
            means = torch.where(norm > self.eps, sums / norm.clamp(min=self.eps), means)
        # the EMA starts from the initial clusters' statistics (an empty cluster: its centroid)
        empty = counts[..., None] <= 0
        self.means = means.contiguous()
        self.ema_sum = torch.where(empty, means, sums)
        self.ema_count = counts.clamp(min=1.0)
        self.initted.fill_(True)


def kmeans_modules(module: nn.Module) -> list[SphericalKMeans]:
    # a weight-tied stack holds the same instance several times: update it once
    seen: dict[int, SphericalKMeans] = {}
    for m in module.modules():
        if isinstance(m, SphericalKMeans):
            seen.setdefault(id(m), m)
    return list(seen.values())


def update_kmeans(module: nn.Module) -> None:
    """Apply the pending EMA update of every k-means inside ``module``."""
    for km in kmeans_modules(module):
        km.update()


def update_after_backward(x: Tensor, module: nn.Module) -> Tensor:
    """Arrange for ``update_kmeans(module)`` to run once backward has reached ``x``.

    ``x`` is the input of the whole stack, so its gradient is complete only after every
    layer's backward (including a reversible stack's recomputation, which must still see
    the centroids its forward saw). Uses the public ``Tensor.register_hook``; when ``x``
    does not require grad (raw features into a bare model), a leaf copy is hooked instead.
    """
    if not torch.is_grad_enabled():
        return x
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)

    def hook(grad: Tensor) -> None:
        update_kmeans(module)

    x.register_hook(hook)
    return x
