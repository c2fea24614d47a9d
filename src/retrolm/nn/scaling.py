"""Depth and width schedules across a stack: DeLighT's block-wise scaling (Mehta et al.,
ICLR 2021, §3.3) and OpenELM's layer-wise scaling (Mehta et al., 2024, §2).

``depth_width_schedule(kind, num_layers, **options)`` returns one small frozen record per
layer (block), first layer first:

- ``"block"`` (options ``min_depth``, ``max_depth``, ``width_mult``): DeLighT's block ``b``
  of ``B = num_layers`` gets a DExTra depth and width multiplier growing linearly,
  ``N^b = floor(N_min + (N_max - N_min)·b/(B - 1))`` (the reference's
  ``np.linspace(..., dtype=int)``, which truncates) and
  ``w^b = round(w_m + (N_max - N_min)·b/(N_min·(B - 1)), 3)``. (8 blocks, 4…8, 2) gives
  depths 4 4 5 5 6 6 7 8 and multipliers 2.0, 2.143, …, 3.0.
- ``"uniform"`` (``min_depth``, ``width_mult``; ``max_depth`` may be given and must equal
  ``min_depth``): every block the same.
- ``"openelm"`` (``model_dim``, ``head_dim``, ``qkv_multipliers``, ``ffn_multipliers``,
  optional ``num_gqa_groups=1``, ``ffn_dim_divisor=256``): per layer query heads, key/value
  heads and FFN width. The multipliers α (attention) and β (FFN) run linearly from the
  pair's first to its second value (a number: constant), each rounded to 2 decimals; the
  query width is ``make_divisible(model_dim·α, head_dim·num_gqa_groups)``, the FFN width
  ``make_divisible(model_dim·β, ffn_dim_divisor)``. OpenELM-270M (16 layers, 1280 wide,
  head 64, 4 GQA groups, α 0.5…1.0, β 0.5…4.0) gives 12, 16 and 20 query heads for 5, 7
  and 4 layers and FFN widths 768 … 5120.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("block", "uniform", "openelm")


@dataclass(frozen=True)
class BlockScale:
    """One DeLighT block: its DExTra depth and width multiplier."""

    depth: int
    width_mult: float


@dataclass(frozen=True)
class LayerScale:
    """One OpenELM layer: query heads, key/value heads, feed-forward width."""

    q_heads: int
    kv_heads: int
    ffn_dim: int


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (halves up, at least
    ``divisor``), plus one more ``divisor`` if that fell below 90% of ``value`` (MobileNet's
    rule, which OpenELM uses for its widths)."""
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    out = max(divisor, math.floor(value / divisor + 0.5) * divisor)
    if out < 0.9 * value:
        out += divisor
    return int(out)


def _linear(pair: float | Sequence[float], n: int, name: str) -> list[float]:
    """``n`` values from ``pair[0]`` to ``pair[1]`` (a number: constant), rounded to 2
    decimals."""
    if isinstance(pair, (int, float)):
        lo = hi = float(pair)
    elif len(pair) == 2:
        lo, hi = float(pair[0]), float(pair[1])
    else:
        raise ValueError(f"{name} must be a number or a (first, last) pair, got {pair!r}")
    if lo <= 0 or hi <= 0:
        raise ValueError(f"{name} must be positive, got {pair!r}")
    if n == 1:
        return [round(lo, 2)]
    return [round(lo + (hi - lo) * i / (n - 1), 2) for i in range(n)]


def _block(num_layers: int, min_depth: int, max_depth: int, width_mult: float) -> list[BlockScale]:
    if not 1 <= min_depth <= max_depth:
        raise ValueError(
            f"need 1 <= min_depth <= max_depth, got min_depth={min_depth}, max_depth={max_depth}"
        )
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if num_layers == 1:
        return [BlockScale(min_depth, float(width_mult))]
    span, steps = max_depth - min_depth, num_layers - 1
    return [
        BlockScale(
            min_depth + span * b // steps,  # integer floor: exact, no float truncation
            round(width_mult + span * b / (min_depth * steps), 3),
        )
        for b in range(num_layers)
    ]


def _openelm(
    num_layers: int,
    model_dim: int,
    head_dim: int,
    qkv_multipliers: float | Sequence[float],
    ffn_multipliers: float | Sequence[float],
    num_gqa_groups: int = 1,
    ffn_dim_divisor: int = 256,
) -> list[LayerScale]:
    for name, v in (
        ("model_dim", model_dim),
        ("head_dim", head_dim),
        ("num_gqa_groups", num_gqa_groups),
        ("ffn_dim_divisor", ffn_dim_divisor),
    ):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    alphas = _linear(qkv_multipliers, num_layers, "qkv_multipliers")
    betas = _linear(ffn_multipliers, num_layers, "ffn_multipliers")
    out = []
    for a, b in zip(alphas, betas, strict=True):
        q_heads = make_divisible(model_dim * a, head_dim * num_gqa_groups) // head_dim
        ffn = make_divisible(model_dim * b, ffn_dim_divisor)
        out.append(LayerScale(q_heads, q_heads // num_gqa_groups, ffn))
    return out


_REQUIRED = {
    "block": ("min_depth", "max_depth", "width_mult"),
    "uniform": ("min_depth", "width_mult"),
    "openelm": ("model_dim", "head_dim", "qkv_multipliers", "ffn_multipliers"),
}
_OPTIONAL = {
    "block": (),
    "uniform": ("max_depth",),
    "openelm": ("num_gqa_groups", "ffn_dim_divisor"),
}


def depth_width_schedule(
    kind: str, num_layers: int, **options: float | int | Sequence[float]
) -> list[BlockScale] | list[LayerScale]:
    """Per-layer scales for ``kind`` in ``"block" | "uniform" | "openelm"`` (module
    docstring); a list of ``num_layers`` ``BlockScale`` (block, uniform) or ``LayerScale``
    (openelm)."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {KINDS}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    missing = [k for k in _REQUIRED[kind] if k not in options]
    unknown = sorted(set(options) - set(_REQUIRED[kind]) - set(_OPTIONAL[kind]))
    if missing or unknown:
        raise ValueError(
            f"schedule {kind!r} takes {_REQUIRED[kind]} (optional: {_OPTIONAL[kind]}); "
            f"missing {missing}, unknown {unknown}"
        )
    if kind == "openelm":
        return _openelm(num_layers, **options)
    if kind == "uniform":
        depth = options["min_depth"]
        if options.get("max_depth", depth) != depth:
            raise ValueError(
                f"uniform scaling needs min_depth == max_depth, got min_depth={depth}, "
                f"max_depth={options['max_depth']}; use kind='block' for a growing depth"
            )
        return _block(num_layers, depth, depth, options["width_mult"])
    return _block(num_layers, options["min_depth"], options["max_depth"], options["width_mult"])


__all__ = ["BlockScale", "LayerScale", "depth_width_schedule", "make_divisible"]
