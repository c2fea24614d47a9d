"""Residual wiring: pre-norm, or DeepNet post-norm (Wang et al. 2022, arXiv 2203.00555).

Pre-norm:        x + f(norm(x))
DeepNet (post):  norm(alpha * x + f(x)), with the sub-layers' value/output/FFN weights
                 initialised Xavier-normal with gain beta (``deepnet_init_``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from retrolm.nn.feedforward import FeedForward
from retrolm.nn.multihead import MultiHeadAttention
from retrolm.nn.norms import make_norm


class Residual(nn.Module):
    def __init__(
        self,
        dim: int,
        fn: nn.Module,
        norm: str = "rms",
        *,
        post_norm: bool = False,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.norm = make_norm(norm, dim)
        self.post_norm = post_norm
        self.alpha = alpha

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.post_norm:
            return self.norm(x * self.alpha + self.fn(x, *args, **kwargs))
        return x + self.fn(self.norm(x), *args, **kwargs)

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
