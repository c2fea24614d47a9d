"""Normalisation layers and the one factory that picks them by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("rms", "layer", "scale")


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019); statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


class ScaleNorm(nn.Module):
    """g * x / ||x|| with one learned scalar g initialised to sqrt(dim) (Nguyen & Salazar 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: Tensor) -> Tensor:
        n = x.float().norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return (x.float() / n).to(x.dtype) * self.g.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (safe under bf16 autocast), optional bias."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(dim, eps=eps, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """``rms`` | ``layer`` | ``scale``."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return LayerNorm(dim)
    if kind == "scale":
        return ScaleNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
