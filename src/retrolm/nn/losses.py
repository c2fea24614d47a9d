"""The language-model losses: cross-entropy of given logits, and of an output projection
fused with it.

``cross_entropy(logits, labels)`` is ``F.cross_entropy(logits.float(), labels)`` for (N, V)
logits, on CPU one C++ pass each way (``nn.fused.train.cross_entropy_kernel``).

``linear_cross_entropy(h, W, labels)`` equals ``F.cross_entropy(h @ W.T, labels)`` but never
holds the (tokens, vocab) logits for the whole batch: it walks the tokens in blocks, and the
backward pass recomputes each block's logits instead of storing them. At L=2048 and a 29k
vocabulary the stored fp32 logits, their softmax and their gradient alone are ~0.7 GB; here
they are one block at a time. Cost: the projection is computed twice (forward and backward).
Scratch buffers are allocated once per call and reused by every block (a fresh 30 MB block
costs its page faults each time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrolm.nn.fused import train as fused_train


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=...)`` (mean over counted
    labels) of given (N, V) logits: on CPU one pass forward (log-sum-exp per row, fp32) and
    one backward that writes softmax minus one-hot straight in the logits' dtype, with no
    fp32 copy of bf16 logits and no stored log-softmax. (``linear_cross_entropy`` takes the
    hidden states and the output weight instead, and never holds all the logits.)"""
    if fused_train.cross_entropy_applies(logits, labels):
        return fused_train.cross_entropy_kernel(logits, labels, ignore_index)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward in row blocks (B tokens x V), backward in column blocks (N tokens x Vb) of
    about the same size, reusing one buffer per dtype across blocks.

    The forward saves each token's log-sum-exp (N floats), so the backward needs no softmax
    reduction: p = exp(logit - lse). Blocking the backward over the vocabulary writes each
    vocabulary row's weight gradient once, in one matmul over all N tokens, instead of
    adding a (V, d) partial per row block (eight 30 MB passes at L=2048, 29k vocabulary);
    the token gradient (N, d) is the small one that accumulates."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, block: int):
        # h (N, d), weight (V, d), labels (N,) -> mean loss over counted labels (fp32/fp64)
        n, vocab = h.shape[0], weight.shape[0]
        valid = labels != ignore_index
        lab = labels.clamp(min=0)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=acc, device=h.device)
        tgt = torch.empty(n, dtype=acc, device=h.device)
        rows = min(block, n)
        buf_mm = torch.empty(rows, vocab, dtype=h.dtype, device=h.device)
        buf = buf_mm if h.dtype == acc else torch.empty(rows, vocab, dtype=acc, device=h.device)
        for s in range(0, n, block):
            hb = h[s : s + block]
            b = hb.shape[0]
            logits = torch.mm(hb, weight.t(), out=buf_mm[:b])  # (b, V) in h's dtype
            tgt[s : s + b] = logits.gather(1, lab[s : s + b, None]).squeeze(1)
            m = logits.amax(dim=-1, keepdim=True).to(acc)
            e = torch.sub(logits, m, out=buf[:b]).exp_()  # in acc: exact difference
            lse[s : s + b] = e.sum(dim=-1).log_() + m.squeeze(1)
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.ignore_index, ctx.block = ignore_index, block
        return (lse - tgt) * valid  # (N,) per-token loss, 0 where ignored

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, labels, lse = ctx.saved_tensors
        n, vocab = h.shape[0], weight.shape[0]
        valid = labels != ctx.ignore_index
        acc = lse.dtype
        scale = grad_out.to(acc) * valid.to(acc)  # (N,) d(loss)/d(token loss)
        cols = min(vocab, max(1, -(-ctx.block * vocab // n)))  # ~block * V elements a block
        buf = torch.empty(n, cols, dtype=acc, device=h.device)
        low = h.dtype != acc  # under autocast: matmuls in h's dtype, elementwise in acc
        buf_mm = torch.empty(n, cols, dtype=h.dtype, device=h.device) if low else buf
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        part_h = torch.empty_like(h) if need_h and low else None
        grad_w = torch.empty_like(weight) if need_w else None
        rows = torch.arange(n, device=h.device)
        for v0 in range(0, vocab, cols):
            w = weight[v0 : v0 + cols]
            c = w.shape[0]
            logits = torch.mm(h, w.t(), out=buf_mm[:, :c])  # (N, c) recomputed
            p = torch.sub(logits, lse[:, None], out=buf[:, :c]).exp_()  # softmax columns
            hit = (labels >= v0) & (labels < v0 + c) & valid  # labels inside this block
            p[rows[hit], labels[hit] - v0] -= 1.0
            d = torch.mul(p, scale[:, None], out=buf_mm[:, :c])  # dlogits, in h's dtype
            if need_w:
                torch.mm(d.t(), h, out=grad_w[v0 : v0 + c])
            if need_h:
                if low:
                    grad_h += torch.mm(d, w, out=part_h)
                else:
                    grad_h.addmm_(d, w)
        gh = grad_h.to(h.dtype) if need_h else None
        return gh, grad_w, None, None, None


def linear_cross_entropy(
    h: Tensor,  # (..., d)
    weight: Tensor,  # (V, d)
    labels: Tensor,  # (...) int64
    ignore_index: int = -100,
    block: int = 256,
    reduction: str = "mean",
) -> Tensor:  # fp32 (fp64 for fp64 inputs)
    """Cross-entropy of ``h @ weight.T`` against ``labels`` without storing all logits
    (``cross_entropy`` is the one for logits already computed).

    ``reduction="mean"``: a scalar, the mean over labels != ignore_index; ``"none"``: the
    per-token losses, shaped like ``labels``, 0 where ignored. Under autocast the projection
    runs in the autocast dtype (as ``nn.Linear`` would); the log-sum-exp and the loss are
    accumulated in fp32.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        per_token = _LinearCrossEntropy.apply(
            h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index, block
        )
    if reduction == "none":
        return per_token.view(labels.shape)
    return per_token.sum() / (labels != ignore_index).sum().clamp(min=1)
