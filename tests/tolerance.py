"""Tolerances for comparing results of different kernels, derived from the dtype and the
reduction length, so the suite passes on every CPU (AVX2-only and AVX-512 alike).

Exact equality (``torch.equal``) is for two paths that run the same kernels on the same
inputs. Two kernels that sum the same ``n`` terms in another order (a blocked matmul, an
AVX-512 reduction against an AVX2 one, a fused C++ loop against ATen) differ by rounding:
each partial sum rounds with relative error ``eps``, and the errors grow like ``sqrt(n)``
for random data (``n`` in the worst case). ``fp_tol`` allows ``factor * eps * sqrt(n)``,
with ``eps`` of the coarser dtype the kernels compute in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fp_tol(dtype: torch.dtype, reduction: int = 1, factor: float = 8.0) -> dict[str, float]:
    """``rtol``/``atol`` for results in ``dtype`` from reductions of ``reduction`` terms."""
    if not dtype.is_floating_point:
        raise ValueError(f"fp_tol needs a floating dtype, got {dtype}")
    t = factor * torch.finfo(dtype).eps * math.sqrt(max(reduction, 1))
    return {"rtol": t, "atol": t}


def assert_close_fp(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype | None = None,
    reduction: int = 1,
    factor: float = 8.0,
) -> None:
    """``assert_close`` at ``fp_tol`` of ``dtype`` (default: ``actual``'s), comparing in
    float64 so that a float64 reference may stand against a float32 result."""
    tol = fp_tol(dtype or actual.dtype, reduction, factor)
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def assert_argmax_within(
    index: Tensor, scores: Tensor, dtype: torch.dtype, reduction: int = 1, factor: float = 8.0
) -> None:
    """``index`` (…) picks, along ``scores``' last dim (…, k), an entry within rounding
    (``fp_tol``) of the largest: the argmax of another kernel's scores, which may pick the
    other of two entries that tie to rounding. Also checks that most picks are the argmax,
    so a wrong index cannot pass by hiding in the tolerance."""
    tol = fp_tol(dtype, reduction, factor)
    best = scores.max(dim=-1).values
    picked = scores.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    slack = tol["atol"] + tol["rtol"] * best.abs()
    assert bool((picked >= best - slack).all()), (picked - best).min().item()
    assert (index == scores.argmax(-1)).float().mean().item() > 0.9
