"""DExTra for a few rows without autograd (decoding), with its mixers and shuffles folded away.

Notation as in ``dextra.py``: p = d_m / 2, GLT l maps in_l -> out_l with g_l groups, r rows.

A decoding step pushes one row through every GLT of every block: as written (``DExTra.forward``)
each GLT is a mixer (split, concatenate, flatten), a grouped matmul with its reshapes and
transposes, the channel shuffle, the bias, a per-group norm and the activation, about twenty
dispatched operators on tensors of a few hundred numbers, so a step cost the operators'
overhead, not arithmetic (delight-small: ~1,200 operators a token). For a few rows the same
function is computed here with dense weights into which the mixers and the shuffles are folded:

* GLT l's pre-activation is ``mix(x, h_{l-1}, g_l) @ G_l + b_l`` with ``G_l`` block-diagonal up
  to the shuffle's column order. The mixer only orders the input features, so the product is
  ``x @ X_l + h_{l-1} @ H_l + b_l`` with ``X_l`` (p, out_l) and ``H_l`` (out_{l-1}, out_l) the rows
  of the dense ``G_l`` that x's and h's features reach (read off by pushing identity matrices
  through the layer itself, so the fold cannot disagree with the module).
* x is the same for every GLT and the output layer: all ``x @ X_l + b_l`` come from one matmul
  with the ``X_l`` side by side; each GLT then adds ``h_{l-1} @ H_l`` (one ``addmm``), its norm
  over the g_l slices of the (r, g_l, out_l/g_l) view and the activation.

On CPU in fp32 (``nn.fused.decode.usable``) the whole folded function is one call of the fused
decoding extension (``dextra_step`` in ``nn/fused/csrc/decode_blocks.cpp``: plain loops over the
few rows, so none of the ~4 dispatched operators per GLT); elsewhere, or with the extension
off or unbuilt, the ATen code below runs (the reference the fused step is tested against).

A dense ``G_l`` holds g_l times the weights of the grouped one; a GLT whose dense weight would
exceed ``FOLD_NUMEL`` elements (wide layers with many groups, e.g. WikiText-103's d_m 512) keeps
its grouped matmul here, so a step never reads much more memory than before. The values are
those of ``DExTra.forward`` up to float rounding (sums in another order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call

from retrolm.models.delight.mixer import mix
from retrolm.nn import norms
from retrolm.nn.feedforward import ACTIVATIONS
from retrolm.nn.fused import decode as fused_decode

if TYPE_CHECKING:
    from retrolm.models.delight.dextra import DExTra

MAX_ROWS = 32  # rows (tokens) a call may have to take this path: decoding, not a prefill
FOLD_NUMEL = 2**18  # largest dense GLT weight folded (1 MiB in fp32: stays in cache)


class FoldedGLT(NamedTuple):
    cols: tuple[int, int]  # (index, width) of this layer's x @ X_l + b_l among the x products
    h_weight: Tensor | None  # H_l (out_{l-1}, out_l); None for GLT 1 (it reads x alone)


class FoldedDExTra(NamedTuple):
    x_weight: Tensor  # (p, S): every folded layer's X_l and the output layer's, side by side
    x_bias: Tensor  # (S,) their biases
    widths: list[int]  # the widths of the X_l (how the (r, S) product splits)
    glts: tuple[FoldedGLT | None, ...]  # None: that GLT runs grouped (its dense weight is large)
    out: FoldedGLT  # the output layer's columns and H (d_o, d_o)
    fused: tuple | None  # dextra_step's arguments after the input; None: no fused step (not fp32,
    # or a norm it lacks). It holds the norms' and in_proj's Parameter objects: in-place
    # updates are seen, a Parameter replaced by another object is not (as the folded weights)


def _rows(layer, groups: int, p: int, h_width: int, ref: Tensor) -> tuple[Tensor, Tensor]:
    """A linear ``layer`` reading ``mix(x, h, groups)`` (x p wide, h h_width wide) ->
    (X (p, out), H (h_width, out)): the rows of its dense weight that x and h reach, bias-free.
    ``layer`` runs on identity rows with a zero bias, which is exact (one product by 1 each)."""
    params = {"weight": layer.weight, "bias": torch.zeros_like(layer.bias)}
    eye_x = torch.eye(p, dtype=ref.dtype, device=ref.device)
    if h_width == 0:  # GLT 1 reads x alone
        return functional_call(layer, params, (eye_x,)), ref.new_zeros(0, layer.out_features)
    eye_h = torch.eye(h_width, dtype=ref.dtype, device=ref.device)
    eye_x = mix(eye_x, ref.new_zeros(p, h_width), groups)  # (p, p + h_width)
    eye_h = mix(ref.new_zeros(h_width, p), eye_h, groups)  # (h_width, p + h_width)
    return functional_call(layer, params, (eye_x,)), functional_call(layer, params, (eye_h,))


def fold(dextra: DExTra, dtype: torch.dtype) -> FoldedDExTra:
    """The folded weights of ``dextra`` in ``dtype`` (built once per parameter version)."""
    p = dextra.in_features // 2
    w = dextra.out_proj.weight
    x_parts, b_parts, glts = [], [], []
    h_width = 0  # out_{l-1}
    for l, glt in enumerate(dextra.glts):  # noqa: E741 (the paper's l, 0-based here)
        lin = glt.linear
        if lin.groups > 1 and lin.in_features * lin.out_features > FOLD_NUMEL:
            glts.append(None)
        else:
            x_w, h_w = _rows(lin, glt.groups, p, h_width, w)
            x_parts.append(x_w)
            b_parts.append(lin.bias)
            glts.append(
                FoldedGLT((len(x_parts) - 1, lin.out_features), h_w.to(dtype) if l else None)
            )
        h_width = lin.out_features
    x_w, h_w = _rows(dextra.out_proj, dextra.glts[-1].groups, p, h_width, w)
    x_parts.append(x_w)
    b_parts.append(dextra.out_proj.bias)
    out = FoldedGLT((len(x_parts) - 1, dextra.out_features), h_w.to(dtype))
    x_weight = torch.cat(x_parts, dim=1).to(dtype).contiguous()
    widths = [t.shape[1] for t in x_parts]
    plan = FoldedDExTra(x_weight, torch.cat(b_parts).to(dtype), widths, tuple(glts), out, None)
    return plan._replace(fused=_fused_args(dextra, plan)) if dtype is torch.float32 else plan


_NORM_KINDS = {norms.LayerNorm: 0, norms.RMSNorm: 1, norms.ScaleNorm: 2}  # dextra_step's codes
_ACT_CODES = {"gelu": 0, "silu": 1, "relu": 2}


def _norm_arg(norm) -> tuple[Tensor, Tensor, float]:
    if isinstance(norm, norms.ScaleNorm):
        return norm.g, fused_decode.NONE, norm.eps
    bias = getattr(norm, "bias", None)  # LayerNorm's (if any); RMSNorm has none
    return norm.weight, fused_decode.NONE if bias is None else bias, norm.eps


def _fused_args(dextra: DExTra, plan: FoldedDExTra) -> tuple | None:
    """The arguments of ``dextra_step`` after the input (see its comment in decode_blocks.cpp),
    or None where it does not apply (a norm or an activation it does not compute)."""
    all_norms = [dextra.in_norm, *(g.norm for g in dextra.glts), dextra.out_norm]
    kind = _NORM_KINDS.get(type(dextra.in_norm))
    act = next((c for n, c in _ACT_CODES.items() if ACTIVATIONS[n] is dextra.act), None)
    if kind is None or act is None or any(type(n) is not type(dextra.in_norm) for n in all_norms):
        return None
    starts = [0]
    for w in plan.widths:
        starts.append(starts[-1] + w)
    cols, widths, groups, shuffle, weights, biases = [], [], [], [], [], []
    for glt, f in (*zip(dextra.glts, plan.glts, strict=True), (None, plan.out)):
        lin = glt.linear if glt is not None else None
        kept = f is None  # a wide grouped GLT: its own weight, bias and shuffle
        cols.append(-1 if kept else starts[f.cols[0]])
        widths.append(lin.out_features if lin is not None else dextra.out_features)
        groups.append(glt.groups if glt is not None else 1)
        shuffle.append(int(kept and lin.shuffle))
        h = None if kept else f.h_weight
        weights.append(lin.weight if kept else fused_decode.NONE if h is None else h.contiguous())
        biases.append(lin.bias if kept else fused_decode.NONE)
    norm_w, norm_b, eps = zip(*(_norm_arg(n) for n in all_norms), strict=True)
    return (
        dextra.in_proj.weight, dextra.in_proj.bias, kind, act, list(norm_w), list(norm_b),
        list(eps), plan.x_weight, plan.x_bias, cols, widths, groups, shuffle, weights, biases,
    )  # fmt: skip


def folded_forward(dextra: DExTra, plan: FoldedDExTra, inp: Tensor) -> Tensor:
    """``dextra(inp)`` for a few rows in eval mode without autograd: (..., d_m) -> (..., d_o).
    Modules' ``forward`` is called directly and activations run in place: every dispatched
    call counts here (dropout is the identity in eval mode)."""
    lead, act_ = inp.shape[:-1], dextra.act_
    if plan.fused is not None and fused_decode.usable(inp):
        out = fused_decode.extension().dextra_step(
            inp.reshape(-1, inp.shape[-1]).contiguous(), *plan.fused
        )
        return out.view(*lead, -1)
    x = dextra.in_proj.forward(inp.reshape(-1, inp.shape[-1]))  # (r, p)
    x = act_(dextra.in_norm.forward(x))
    r = x.shape[0]
    xc = torch.addmm(plan.x_bias, x, plan.x_weight).split(plan.widths, 1)  # x @ X_l + b_l
    h = x
    for l, (glt, f) in enumerate(zip(dextra.glts, plan.glts, strict=True)):  # noqa: E741
        if f is None:  # a wide grouped GLT: as DExTra.forward runs it
            h = glt(mix(x, h, glt.groups) if l else h)
            continue
        y = xc[f.cols[0]] if f.h_weight is None else torch.addmm(xc[f.cols[0]], h, f.h_weight)
        h = glt.act_(glt.norm.forward(y.view(r, glt.groups, -1))).view(r, -1)
    y = torch.addmm(xc[plan.out.cols[0]], h, plan.out.h_weight)  # (r, d_o)
    return act_(dextra.out_norm.forward(y)).view(*lead, -1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the folded weights are kept in: autocast's, when it is on for x's device."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


__all__ = ["FOLD_NUMEL", "MAX_ROWS", "FoldedDExTra", "compute_dtype", "fold", "folded_forward"]
