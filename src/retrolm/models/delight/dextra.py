"""The DeLighT transformation, DExTra (Mehta et al., "DeLighT: Deep and Light-weight
Transformer", ICLR 2021, §3.1 and Fig. 1c).

Notation: ``...`` leading dims; d_m = in_features, d_o = out_features, N = depth,
w_m = width_mult, g_max = max_groups, p = d_m / 2; GLT l = 1 … N (1-based, as the paper).

DExTra maps ``(..., d_m) -> (..., d_o)`` through a deep expand-reduce stack of group linear
transformations (``nn.GroupLinear``):

1. Input layer: ``x = dropout(act(norm(Linear(d_m -> p)(input))))``, width p.
2. N GLTs. Groups ``g_l = min(2^(l-1), g_max)`` for l = 1 … ceil(N/2) (the paper's
   equation; ``glt_groups="reference"`` gives ``min(2^l, g_max)``, as sacmehta/delight's
   code does: 2 groups first), then the same list mirrored (odd N: the middle once).
   Widths ``int(linspace(p, w_m·d_m, ceil(N/2)))``, mirrored the same way; the last GLT
   outputs d_o, every other output is rounded up to a multiple of
   ``max(g_l, g_{l+1}, 8)`` (so both neighbouring GLTs can split it into their groups).
3. Input mixer: GLT 1 reads x alone (in_1 = p). GLT l+1 reads ``mix(x, out_l, g_{l+1})``:
   x and GLT l's output each split into g_{l+1} contiguous groups and concatenated group by
   group, ``[x_1, o_1, x_2, o_2, …]``, so its group j sees the j-th slice of the input and
   of the previous output, and ``in_{l+1} = out_l + p``.
4. Each GLT: the group linear (with bias and, if ``shuffle``, the channel shuffle), then a
   norm of width out/g applied to each of the g contiguous slices (one norm shared by the
   slices), the activation and dropout.
5. Output layer: ``act(norm(Linear(d_o + p -> d_o)(mix(x, out_N, g_N))))``. The mixer uses
   the last GLT's g_N groups; the layer is dense, so the mixer only fixes the order of its
   input features and does not change what it can compute.

With d_m 512, N 4, w_m 2, g_max 16, d_o 256 the GLTs (in, out, groups) are
(256, 256, 1) (512, 1024, 2) (1280, 1024, 2) (1280, 256, 1), and with the reference's
groups (256, 256, 2) (512, 1024, 4) (1280, 1024, 4) (1280, 256, 2): 923,136 parameters in
all (the research notes' table, run on the reference).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from retrolm.models.delight import dextra_decode
from retrolm.models.delight.mixer import mix
from retrolm.nn.feedforward import ACTIVATIONS, INPLACE
from retrolm.nn.group_linear import GroupLinear
from retrolm.nn.norms import NORMS, make_norm
from retrolm.nn.weight_cache import WeightCache

GLT_GROUPS = ("paper", "reference")
ACT_TYPES = {"swish": "silu", "gelu": "gelu", "relu": "relu"}  # DeLighT's name -> ours
NORM_TYPES = {"ln": "layer", **{n: n for n in NORMS}}  # DeLighT's "ln" and make_norm's names


def activation_name(act_type: str) -> str:
    """DeLighT's ``act_type`` (swish, gelu, relu) as a ``nn.feedforward`` activation name."""
    if act_type not in ACT_TYPES:
        raise ValueError(f"unknown act_type {act_type!r}; choose one of {list(ACT_TYPES)}")
    return ACT_TYPES[act_type]


def norm_name(norm_type: str) -> str:
    """``norm_type`` (ln, or any ``make_norm`` name) as a ``make_norm`` name."""
    if norm_type not in NORM_TYPES:
        raise ValueError(f"unknown norm_type {norm_type!r}; choose one of {list(NORM_TYPES)}")
    return NORM_TYPES[norm_type]


def default_max_groups(in_features: int) -> int:
    """``2^ceil(log2(d_m / 32))`` (at least 1): the fewest groups of at most 32 features."""
    g = 1
    while 32 * g < in_features:
        g *= 2
    return g


class GLTShape(NamedTuple):
    in_features: int
    out_features: int
    groups: int


def _mirror(half: list[int], depth: int) -> list[int]:
    """The expansion list followed by its mirror image; odd depths repeat no middle."""
    back = half[::-1] if depth % 2 == 0 else half[-2::-1]
    return half + back


def dextra_layers(
    in_features: int,
    out_features: int,
    depth: int,
    width_mult: float,
    max_groups: int,
    glt_groups: str = "paper",
) -> list[GLTShape]:
    """The GLTs' (in, out, groups), by rules 2 and 3 of the module docstring."""
    p, half = in_features // 2, math.ceil(depth / 2)
    first = 0 if glt_groups == "paper" else 1  # group exponent of GLT 1
    groups = _mirror([min(2 ** (first + i), max_groups) for i in range(half)], depth)
    top = width_mult * in_features
    widths = [p] if half == 1 else [int(p + (top - p) * i / (half - 1)) for i in range(half)]
    widths = _mirror(widths, depth)
    outs = []
    for l in range(depth - 1):  # noqa: E741 (the paper's l)
        m = max(groups[l], groups[l + 1], 8)
        outs.append(-(-widths[l] // m) * m)  # rounded up to a multiple of m
    outs.append(out_features)
    ins = [p] + [o + p for o in outs[:-1]]
    return [GLTShape(i, o, g) for i, o, g in zip(ins, outs, groups, strict=True)]


class GLTLayer(nn.Module):
    """One DExTra layer: group linear (bias, optional shuffle), a norm of width out/g on each
    of the g slices, activation, dropout. ``(..., in) -> (..., out)``."""

    def __init__(self, shape: GLTShape, shuffle: bool, norm: str, act: str, dropout: float) -> None:
        super().__init__()
        self.groups = shape.groups
        self.linear = GroupLinear(*shape, bias=True, shuffle=shuffle)
        self.norm = make_norm(norm, shape.out_features // shape.groups)
        self.act, self.act_ = ACTIVATIONS[act], INPLACE[act]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = self.linear(x).unflatten(-1, (self.groups, -1))  # (..., g, out/g)
        return self.dropout(self.act(self.norm(y)).flatten(-2))


def _check(
    in_features: int, out_features: int, depth: int, width_mult: float, max_groups: int
) -> None:
    if in_features < 2 or in_features % 2:
        raise ValueError(f"in_features must be even and >= 2 (p = d_m/2), got {in_features}")
    if out_features < 1 or depth < 1:
        raise ValueError(
            f"out_features and depth must be >= 1, got out_features={out_features}, depth={depth}"
        )
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    if max_groups < 1 or max_groups & (max_groups - 1):
        raise ValueError(f"max_groups must be a power of two (1, 2, 4, …), got {max_groups}")


class DExTra(nn.Module):
    """DeLighT's expand-reduce transformation, ``(..., in_features) -> (..., out_features)``;
    the rules are in the module docstring. ``max_groups=None``: ``default_max_groups``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        width_mult: float = 2.0,
        max_groups: int | None = None,
        glt_groups: str = "paper",
        shuffle: bool = True,
        norm_type: str = "ln",
        act_type: str = "swish",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        max_groups = default_max_groups(in_features) if max_groups is None else max_groups
        _check(in_features, out_features, depth, width_mult, max_groups)
        if glt_groups not in GLT_GROUPS:
            raise ValueError(f"unknown glt_groups {glt_groups!r}; choose one of {GLT_GROUPS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        norm, act = norm_name(norm_type), activation_name(act_type)
        table = dextra_layers(in_features, out_features, depth, width_mult, max_groups, glt_groups)
        p, widest = in_features // 2, max(s.groups for s in table)
        if p % widest or out_features % table[-1].groups:
            raise ValueError(
                f"in_features/2={p} must be a multiple of the most GLT groups ({widest}) and "
                f"out_features={out_features} of the last GLT's ({table[-1].groups}); lower "
                f"max_groups={max_groups} or change the widths"
            )
        self.in_features, self.out_features, self.max_groups = in_features, out_features, max_groups
        self.act, self.act_ = ACTIVATIONS[act], INPLACE[act]
        self.in_proj = nn.Linear(in_features, p)
        self.in_norm = make_norm(norm, p)
        self.dropout = nn.Dropout(dropout)
        self.glts = nn.ModuleList(GLTLayer(s, shuffle, norm, act, dropout) for s in table)
        self.out_proj = nn.Linear(out_features + p, out_features)
        self.out_norm = make_norm(norm, out_features)
        # decoding's folded weights (``dextra_decode``), rebuilt when a GLT or out_proj changes
        self._folded = WeightCache(_build_folded)

    def layer_table(self) -> list[GLTShape]:
        """The GLTs' (in_features, out_features, groups), first to last."""
        return [GLTShape(g.linear.in_features, g.linear.out_features, g.groups) for g in self.glts]

    def forward(self, inp: Tensor) -> Tensor:  # (..., d_m) -> (..., d_o)
        if (
            not self.training
            and inp.numel() <= dextra_decode.MAX_ROWS * self.in_features
            and not torch.is_grad_enabled()
        ):  # decoding: the same function with the mixers and shuffles folded away
            params = [t for g in self.glts for t in (g.linear.weight, g.linear.bias)]
            key = (self, dextra_decode.compute_dtype(inp))
            plan = self._folded.get(*params, self.out_proj.weight, self.out_proj.bias, key=key)
            return dextra_decode.folded_forward(self, plan, inp)
        x = self.dropout(self.act(self.in_norm(self.in_proj(inp))))  # (..., p)
        h = x
        for l, glt in enumerate(self.glts):  # noqa: E741
            h = glt(mix(x, h, glt.groups) if l else h)  # (..., out_l)
        h = mix(x, h, self.glts[-1].groups)  # (..., d_o + p)
        return self.act(self.out_norm(self.out_proj(h)))


def _build_folded(*params_and_key) -> dextra_decode.FoldedDExTra:
    """WeightCache build: the params only key the cache; the module and dtype are the key."""
    module, dtype = params_and_key[-1]
    return dextra_decode.fold(module, dtype)
