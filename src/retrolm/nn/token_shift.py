"""Token shift: mix features from earlier positions by shifting channel groups in time.

The channels are split into ``len(shifts)`` groups; group i at position t takes the value of
position ``t - shifts[i]`` (zeros where that is outside the sequence). Positive shifts look
into the past; a causal model may only use shifts >= 0.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_shift(x: Tensor, shifts: tuple[int, ...], mask: Tensor | None = None) -> Tensor:
    """x (b, n, d); mask (b, n) bool zeroes padded positions before they are shifted."""
    if mask is not None:
        x = x.masked_fill(~mask[..., None], 0.0)
    n = x.shape[-2]
    sizes = [x.shape[-1] // len(shifts)] * len(shifts)
    sizes[-1] += x.shape[-1] - sum(sizes)
    out = []
    for part, s in zip(x.split(sizes, dim=-1), shifts):
        if s > 0:
            part = F.pad(part, (0, 0, s, 0))[..., :n, :]
        elif s < 0:
            part = F.pad(part, (0, 0, 0, -s))[..., -s:, :]
        out.append(part)
    return torch.cat(out, dim=-1)


def token_shift_cached(
    x: Tensor, shifts: tuple[int, ...], past: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Token shift of new positions given the positions before them (incremental decoding).

    x (b, t, d) new positions; past (b, S, d) the S = max(shifts) positions just before them,
    or None at the start of the sequence (zeros, as ``token_shift`` pads). Returns the shifted
    new positions (b, t, d), equal to the matching rows of ``token_shift`` over the whole
    sequence, and the S positions to pass as ``past`` next time (None when S == 0; it may
    be ``x`` itself, so neither may be changed in place afterwards).
    """
    check_causal_shifts(shifts)
    s = max(shifts)
    if s == 0:
        return token_shift(x, shifts), None
    if past is None:
        past = x.new_zeros(x.shape[0], s, x.shape[-1])
    if x.shape[-2] == 1 and len(shifts) == 2 and shifts[0] == 0 and past.dtype == x.dtype:
        # one decoding step, groups (0, s) (the hierarchical blocks): a channel select of
        # x and the row s back, 2-4 kernels instead of 7 (this runs twice per block)
        first = _first_group_mask(x.shape[-1], x.device)  # (d,) True = the unshifted group
        out = torch.where(first, x, past[..., :1, :])
        return out, (x if s == 1 else torch.cat((past[..., 1:, :], x), dim=-2))
    full = torch.cat((past, x), dim=-2)  # (b, S + t, d)
    if x.shape[-2] == 1:  # one decoding step: each channel group is one row of `full`
        out = [
            full[..., s - sh : s - sh + 1, a:b] for (a, b), sh in zip(_groups(x, shifts), shifts)
        ]
        return torch.cat(out, dim=-1), full[..., 1:, :]
    return token_shift(full, shifts)[..., s:, :], full[..., -s:, :]


@functools.lru_cache(maxsize=16)
def _first_group_mask(d: int, device: torch.device) -> Tensor:
    """(d,) bool: the channels of the first of two shift groups (``token_shift``'s split)."""
    return torch.arange(d, device=device) < d // 2


def _groups(x: Tensor, shifts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Channel ranges of the shift groups, as token_shift splits them (the last is wider)."""
    d, g = x.shape[-1], len(shifts)
    bounds = [i * (d // g) for i in range(g)] + [d]
    return list(zip(bounds[:-1], bounds[1:]))


def check_causal_shifts(shifts: tuple[int, ...]) -> None:
    if any(s < 0 for s in shifts):
        raise ValueError(f"a causal model cannot shift tokens from the future: shifts={shifts}")


class TokenShift(nn.Module):
    """Apply ``token_shift`` to the input of ``fn``. The padding mask comes as ``shift_mask``
    (consumed here, so padded positions never leak into real ones through the shift); all
    other arguments go to ``fn``. ``causal=True`` refuses shifts from the future."""

    def __init__(self, fn: nn.Module, shifts: tuple[int, ...], causal: bool = True) -> None:
        super().__init__()
        if causal:
            check_causal_shifts(shifts)
        self.fn, self.shifts = fn, tuple(shifts)

    def forward(
        self,
        x: Tensor,
        *args,
        shift_mask: Tensor | None = None,
        shift_state: dict | None = None,
        **kwargs,
    ):
        """``shift_state`` (a dict kept by the caller) makes incremental decoding exact: the
        last inputs of the previous call are prepended, so the first new position shifts
        in its true predecessor rather than zeros."""
        if shift_state is None:
            return self.fn(token_shift(x, self.shifts, shift_mask), *args, **kwargs)
        if min(self.shifts) >= 0:  # causal: token_shift_cached (one step: a channel select)
            out, shift_state["prev"] = token_shift_cached(x, self.shifts, shift_state.get("prev"))
            return self.fn(out, *args, **kwargs)
        back = max(max(self.shifts), 0)
        prev = shift_state.get("prev")
        full = x if prev is None else torch.cat((prev, x), dim=-2)
        if back:
            shift_state["prev"] = full[:, -back:]
        start = 0 if prev is None else prev.shape[-2]
        return self.fn(token_shift(full, self.shifts)[:, start:], *args, **kwargs)
