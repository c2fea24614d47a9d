"""Reversible residual layers (RevNet, Gomez et al. 2017; as used by Reformer and the
Routing Transformer) that carry auxiliary losses.

Two streams: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``. Activations are not stored: the
backward pass recomputes each layer's inputs from its outputs, so activation memory does not
grow with depth. Each ``f``/``g`` returns ``(out, aux)``, where ``aux`` is a scalar auxiliary
loss; the stack returns the sum of all of them, and its gradient flows through the
recomputation like the outputs' gradients do.

During the recomputation ``is_recomputing()`` is True: modules with side effects (the k-means
statistics of routing attention, memory writes) must skip them then. Dropout masks are
reproduced by restoring the RNG state recorded in the forward.

``recompute=False`` runs the same two-stream equations with ordinary autograd (activations
stored); the tests use it as the oracle for the memory-saving backward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "retrolm_reversible_recomputing", default=False
)

Branch = Callable[..., tuple[Tensor, Tensor]]  # (x, **kwargs) -> (out, aux scalar)


_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "retrolm_reversible_forward", default=False
)


def in_reversible_forward() -> bool:
    """True inside a reversible stack's forward, which runs without autograd although it
    is a training forward (side effects such as k-means statistics must still happen)."""
    return _FORWARD.get()


def is_recomputing() -> bool:
    """True inside a reversible stack's backward recomputation."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


class _RngState:
    """Records the RNG state before a call so the recomputation draws the same dropout."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda":
            self.cuda = (device, torch.cuda.get_rng_state(device))

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.cuda[0]] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
            yield


def _call(fn: Branch, x: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
    out, aux = fn(x, **kwargs)
    return out, aux.reshape(()).to(torch.float32)


def _backward(outputs, grads) -> None:
    """autograd.backward over the outputs that have a graph (a constant aux has none)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _recompute(
    fn: Branch, state: _RngState, x: Tensor, kwargs: dict, grads
) -> tuple[Tensor, Tensor]:
    """One branch of the backward: fn(x) again under the forward's random state, and its
    gradients into x.grad (and the parameters'). Returns (x with .grad, fn(x))."""
    with torch.enable_grad(), state.restored():
        x = x.detach().requires_grad_(True)
        out, aux = _call(fn, x, kwargs)
        _backward((out, aux), grads)
    return x, out


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, context: Tensor | None, blocks, kwargs):  # type: ignore[override]
        x1, x2 = x.chunk(2, dim=-1)
        kw = dict(kwargs)
        if context is not None:
            kw["context"] = context
        aux = x.new_zeros((), dtype=torch.float32)
        states = []
        token = _FORWARD.set(True)
        with torch.no_grad():
            for f, g in blocks:
                sf = _RngState(x.device)
                fx, af = _call(f, x2, kw)
                x1 = x1 + fx
                sg = _RngState(x.device)
                gx, ag = _call(g, x1, kw)
                x2 = x2 + gx
                aux = aux + af + ag
                states.append((sf, sg))
        _FORWARD.reset(token)
        y = torch.cat((x1, x2), dim=-1)
        ctx.blocks, ctx.kwargs, ctx.states = blocks, kwargs, states
        ctx.has_context = context is not None
        ctx.save_for_backward(y.detach(), context)
        return y, aux

    @staticmethod
    def backward(ctx, dy: Tensor, daux: Tensor):  # type: ignore[override]
        y, context = ctx.saved_tensors
        kw = dict(ctx.kwargs)
        dctx = None
        if ctx.has_context:
            context = context.detach().requires_grad_(True)
            kw["context"] = context
        y1, y2 = y.chunk(2, dim=-1)
        dy1, dy2 = dy.chunk(2, dim=-1)
        daux = daux.reshape(())
        with _recomputing():
            for (f, g), (sf, sg) in zip(reversed(ctx.blocks), reversed(ctx.states)):
                y1, gy1 = _recompute(g, sg, y1, kw, (dy2, daux))  # undo y2 = x2 + g(y1)
                with torch.no_grad():
                    x2 = y2 - gy1
                    dy1 = dy1 + y1.grad
                x2, fx2 = _recompute(f, sf, x2, kw, (dy1, daux))  # undo y1 = x1 + f(x2)
                with torch.no_grad():
                    y1 = y1 - fx2
                    dy2 = dy2 + x2.grad
                    y2 = x2
        if ctx.has_context:
            dctx = context.grad
        return torch.cat((dy1, dy2), dim=-1), dctx, None, None


def reversible(
    x: Tensor,
    pairs: Sequence[tuple[Branch, Branch]],
    context: Tensor | None = None,
    *,
    recompute: bool = True,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Run ``pairs`` of branches reversibly: x (b, n, d) -> (y (b, n, d), aux scalar).

    The input is duplicated into both streams and the output is their mean. ``kwargs`` go to
    every branch unchanged; ``context`` (e.g. an encoder output for cross-attention) is passed
    as ``context=`` too and also receives its gradient.
    """
    x = torch.cat((x, x), dim=-1)
    if recompute and torch.is_grad_enabled():
        y, aux = _ReversibleFunction.apply(x, context, list(pairs), kwargs)
    else:
        y, aux = _plain(x, context, pairs, kwargs)
    y1, y2 = y.chunk(2, dim=-1)
    return (y1 + y2) / 2, aux


def _plain(x, context, pairs, kwargs):
    kw = dict(kwargs)
    if context is not None:
        kw["context"] = context
    x1, x2 = x.chunk(2, dim=-1)
    aux = x.new_zeros((), dtype=torch.float32)
    for f, g in pairs:
        fx, af = _call(f, x2, kw)
        x1 = x1 + fx
        gx, ag = _call(g, x1, kw)
        x2 = x2 + gx
        aux = aux + af + ag
    return torch.cat((x1, x2), dim=-1), aux


class ReversibleSequence(nn.Module):
    """A module holding (f, g) branch pairs, run with ``reversible``. ``keep`` (one bool per
    pair) skips pairs, for LayerDrop."""

    def __init__(self, blocks: Sequence[tuple[nn.Module, nn.Module]], recompute: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleList(pair) for pair in blocks])
        self.recompute = recompute

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        keep: Sequence[bool] | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        pairs = [(f, g) for i, (f, g) in enumerate(self.blocks) if keep is None or keep[i]]
        return reversible(x, pairs, context, recompute=self.recompute, **kwargs)
