"""Group linear transformation (GLT; Mehta et al., DeLighT, ICLR 2021, §3.1).

Shapes: ``...`` any leading dims, i = in_features, o = out_features, g groups.

The ``i`` input features are split into ``g`` contiguous groups; group ``j`` maps its slice
``[j·i/g, (j+1)·i/g)`` to ``o/g`` outputs with its own ``(i/g, o/g)`` matrix: a
block-diagonal linear layer with ``i·o/g`` weights instead of ``i·o``. All groups run as one
batched matmul over a ``(g, i/g, o/g)`` weight.

``shuffle=True`` interleaves the groups' outputs (ShuffleNet's channel shuffle, which
DeLighT applies after every GLT): output ``m·g + j`` is group ``j``'s ``m``-th output, so
any later split into contiguous groups sees features of every group here. Without it,
outputs ``[j·o/g, (j+1)·o/g)`` are group ``j``'s.

Speed (CPU; measurements in ``benchmarks/history/delight.md``). Training in bf16 runs
``_GroupMatmul``, an autograd Function: the batched matmuls on contiguous ``(g, rows, i/g)``
operands, the output and its gradient moved between the ``(rows, o)`` and ``(g, rows, o/g)``
layouts once each. Autograd through the strided ``bmm`` (the plain way) copied the gradient
twice and ran the weight gradient on a transposed strided input, which oneDNN's bf16 path
takes about 3x longer on than on a contiguous one. Forward + backward of 4,096 rows,
512 -> 512, bf16, one thread (load ~8): 12.4 ms at g=4 the plain way, 8.8 ms regrouped; a dense
``nn.Linear`` 17.1 ms; regrouped is faster at g = 2, 4, 8, 16. In fp32 (MKL reads the
strided operands as they are) the plain way measured 5-20% faster at every g, so fp32 keeps
it: ``REGROUPED_DTYPES``. Measured and not taken: a block-diagonal dense weight (at g=2
slower than both: twice the multiply-adds), ``torch.compile`` of the plain way (slower, and
75 s to compile), a naive C++ shuffle kernel (slower than ATen's copies in bf16). Without
autograd (decoding: a few rows, every op's call counts) the plain strided ``bmm`` runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# compute dtypes whose training step runs _GroupMatmul on CPU (measured faster there); the
# others (fp32: measured slower; fp16, fp64, other devices: not measured) take autograd
# through the strided bmm
REGROUPED_DTYPES = frozenset({torch.bfloat16})


class GroupLinear(nn.Module):
    """``(..., in_features) -> (..., out_features)``, ``groups`` independent blocks.

    ``groups=1`` is ``nn.Linear`` (with the weight stored transposed, as ``(1, in, out)``).
    The bias is one ``(out_features,)`` vector added after the shuffle."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        bias: bool = True,
        shuffle: bool = False,
    ) -> None:
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(
                f"groups={groups} must be >= 1 and divide both in_features={in_features} and "
                f"out_features={out_features}; pick a group count that divides both widths"
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.shuffle = shuffle
        self.weight = nn.Parameter(
            torch.empty(groups, in_features // groups, out_features // groups)
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, with each group's own fan-in (in/g)
        bound = 1.0 / math.sqrt(self.in_features // self.groups)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:  # (..., i) -> (..., o)
        # bmm and matmul called directly: einsum's planning cost ~50 us a call, which
        # dominated a decoding step (one row through dozens of GLTs)
        g, lead, bias, w = self.groups, x.shape[:-1], self.bias, self.weight
        if g == 1:
            y = torch.matmul(x, w[0])  # (..., o)
        else:
            if torch.is_grad_enabled() and (
                x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)
            ):  # training: the strategy measured faster for the dtype the product runs in
                x, w = _autocast(x, w)
                if x.device.type == "cpu" and w.dtype in REGROUPED_DTYPES:
                    y = _GroupMatmul.apply(x.reshape(-1, self.in_features), w, bias, self.shuffle)
                    return y.view(*lead, self.out_features)  # the bias is in
            # autograd through a strided bmm (and, without autograd, decoding's few rows)
            xg = x.reshape(-1, g, self.in_features // g).transpose(0, 1)  # (g, r, i/g)
            y = _from_groups(torch.bmm(xg, w), self.shuffle, lead)  # (..., o)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.groups}, bias={self.bias is not None}, shuffle={self.shuffle}"
        )


def _autocast(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``weight`` in the dtype bmm would compute in: under autocast, floating types
    but float64 go to autocast's dtype (the bias is not cast: ``y + bias`` promotes)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (x, weight)
    )


def _to_groups(t: Tensor, groups: int, shuffle: bool, dtype: torch.dtype) -> Tensor:
    """(r, o) -> (g, r, o/g): a contiguous copy in ``dtype`` (one pass) of each group's columns
    of ``t``, in the layout ``GroupLinear`` gives its output (interleaved with ``shuffle``)."""
    r, n = t.shape[0], t.shape[1] // groups
    if shuffle:  # column m·g + j -> [j, :, m]
        src = t.view(r, n, groups).permute(2, 0, 1)
    else:
        src = t.view(r, groups, n).transpose(0, 1)
    return torch.empty(src.shape, dtype=dtype, device=t.device).copy_(src)


def _from_groups(t: Tensor, shuffle: bool, lead: tuple[int, ...] | None = None) -> Tensor:
    """The inverse of ``_to_groups``, (g, r, n) -> (*lead, g·n) (lead defaults to (r,)), a new
    tensor: group j's column m goes to m·g + j (``shuffle``) or j·n + m."""
    g, r, n = t.shape
    y = t.permute(1, 2, 0) if shuffle else t.transpose(0, 1)  # (r, n, g) or (r, g, n)
    return y.reshape(*(lead if lead is not None else (r,)), g * n)


class _GroupMatmul(torch.autograd.Function):
    """(r, i), (g, i/g, o/g), bias (o,) or None -> (r, o), on contiguous grouped operands:
    one copy of the input to (g, r, i/g), kept for the weight gradient, one of the output
    gradient to (g, r, o/g), and the bias added in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, shuffle: bool) -> Tensor:
        g, k = weight.shape[:2]
        xg = x.view(-1, g, k).transpose(0, 1).contiguous()  # (g, r, i/g): k-long runs, cheap
        y = _from_groups(torch.bmm(xg, weight), shuffle)  # (r, o), a new tensor
        if bias is not None:  # bf16 product + fp32 bias under autocast: fp32, as y + bias
            y = y.add_(bias) if y.dtype == bias.dtype else y + bias
        ctx.save_for_backward(xg, weight)
        ctx.shuffle, ctx.has_bias = shuffle, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (r, o)
        xg, weight = ctx.saved_tensors
        gg = _to_groups(grad, weight.shape[0], ctx.shuffle, weight.dtype)  # (g, r, o/g)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # (g, r, i/g) -> (r, i)
            gx = _from_groups(torch.bmm(gg, weight.transpose(1, 2)), shuffle=False)
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(xg.transpose(1, 2), gg)  # (g, i/g, o/g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)  # in the output's dtype, as autograd's y + bias
        return gx, gw, gb, None
