"""Residual wiring: pre-norm, or DeepNet post-norm (Wang et al. 2022, arXiv 2203.00555).

Pre-norm:        x + f(norm(x))
DeepNet (post):  norm(alpha * x + f(x)), with the sub-layers' value/output/FFN weights
                 initialised Xavier-normal with gain beta (``deepnet_init_``).
ReZero:          x + g * f(x), no norm, one learned scalar g initialised to 0
                 (Bachlechner et al. 2020, arXiv 2003.04887): every layer starts as identity.

A sub-layer may return ``(out, aux)`` (an auxiliary loss, e.g. routing's commitment loss);
the residual then returns ``(x + out, aux)``. ``branch`` gives the sub-layer's contribution
alone (what a reversible stack adds to the other stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from retrolm.nn.feedforward import FeedForward
from retrolm.nn.multihead import MultiHeadAttention
from retrolm.nn.norms import make_norm, norm_shift


class Residual(nn.Module):
    def __init__(
        self,
        dim: int,
        fn: nn.Module,
        norm: str = "rms",
        *,
        post_norm: bool = False,
        alpha: float = 1.0,
        rezero: bool = False,
        norm_to_matmul: bool = False,
    ) -> None:
        """``norm_to_matmul``: fn's first use of its input is a matmul (projections), so a
        CPU training step may take the pre-norm as ``norms.norm_shift``: one kernel
        each way, its result in the dtype the matmul reads (bf16 under autocast)."""
        super().__init__()
        if rezero and post_norm:
            raise ValueError("rezero replaces the norm; it cannot be combined with post_norm")
        self.fn = fn
        self.norm = nn.Identity() if rezero else make_norm(norm, dim)
        self.post_norm = post_norm
        self.norm_to_matmul = norm_to_matmul and not rezero and not post_norm
        self.alpha = alpha
        self.rezero = rezero
        if rezero:
            self.rezero_g = nn.Parameter(torch.zeros(1))

    def branch(self, x: Tensor, *args, **kwargs):
        """f(norm(x)) (pre-norm) or g * f(x) (ReZero); a tuple (out, aux) passes through."""
        out = self.fn(self.norm(x), *args, **kwargs)
        if self.rezero:
            if isinstance(out, tuple):
                return (out[0] * self.rezero_g, *out[1:])
            return out * self.rezero_g
        return out

    def forward(self, x: Tensor, *args, **kwargs):
        if self.post_norm:
            out = self.fn(x, *args, **kwargs)
            if isinstance(out, tuple):
                return (self.norm(x * self.alpha + out[0]), *out[1:])
            return self.norm(x * self.alpha + out)
        # (pre-norm inlined: this runs ~14 times per decoded token)
        if self.rezero:
            out = self.branch(x, *args, **kwargs)
        elif self.norm_to_matmul and x.is_cpu and torch.is_grad_enabled():
            out = self.fn(norm_shift(x, self.norm, 0), *args, **kwargs)
        else:
            out = self.fn(self.norm(x), *args, **kwargs)
        if type(out) is tuple:
            return (x + out[0], *out[1:])
        return x + out

    def zero_update(self, x: Tensor) -> Tensor:
        """The block's output when its sub-layer contributes nothing (f(x) = 0)."""
        return self.norm(x * self.alpha) if self.post_norm else x


@dataclass(frozen=True)
class DeepNetConstants:
    alpha: float
    beta: float


def deepnet_constants(
    enc_layers: int, dec_layers: int
) -> tuple[DeepNetConstants, DeepNetConstants]:
    """(encoder, decoder) constants. With no encoder, the decoder-only rule
    alpha = (2M)^(1/4), beta = (8M)^(-1/4); with both, the encoder-decoder rule
    enc alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16); dec alpha = (3M)^(1/4),
    beta = (12M)^(-1/4) (DeepNet paper, Figure 2)."""
    n, m = enc_layers, dec_layers
    if n == 0:
        return DeepNetConstants(1.0, 1.0), DeepNetConstants((2 * m) ** 0.25, (8 * m) ** -0.25)
    enc = DeepNetConstants(0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16))
    dec = DeepNetConstants((3 * m) ** 0.25, (12 * m) ** -0.25)
    return enc, dec


def deepnet_init_(module: nn.Module, beta: float) -> None:
    """Xavier-normal init, gain ``beta`` for value/output projections and FFN, 1 for q/k."""
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            for lin, gain in (
                (m.q_proj, 1.0),
                (m.k_proj, 1.0),
                (m.v_proj, beta),
                (m.out_proj, beta),
            ):
                nn.init.xavier_normal_(lin.weight, gain=gain)
        elif isinstance(m, FeedForward):
            for lin in (m.up_proj, m.down_proj):
                nn.init.xavier_normal_(lin.weight, gain=beta)
