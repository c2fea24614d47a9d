"""Memory-lean language-model loss: output projection fused with cross-entropy.

``linear_cross_entropy(h, W, labels)`` equals ``F.cross_entropy(h @ W.T, labels)`` but never
holds the (tokens, vocab) logits for the whole batch: it walks the tokens in blocks, and the
backward pass recomputes each block's logits instead of storing them. At L=2048 and a 29k
vocabulary the stored fp32 logits, their softmax and their gradient alone are ~0.7 GB; here
they are one block at a time. Cost: the projection is computed twice (forward and backward).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, block: int):
        # h (N, d), weight (V, d), labels (N,) -> summed loss (fp32), count of counted labels
        valid = labels != ignore_index
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        total = h.new_zeros((), dtype=acc)
        for s in range(0, h.shape[0], block):
            logits = (h[s : s + block] @ weight.t()).to(acc)  # (B, V)
            lab = labels[s : s + block]
            ok = valid[s : s + block]
            lse = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
            total += ((lse - tgt) * ok).sum()
        count = valid.sum()
        ctx.save_for_backward(h, weight, labels)
        ctx.ignore_index, ctx.block = ignore_index, block
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, labels = ctx.saved_tensors
        valid = labels != ctx.ignore_index
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        scale = grad_out.to(acc) / valid.sum().clamp(min=1)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, h.shape[0], ctx.block):
            hb = h[s : s + ctx.block]
            lab, ok = labels[s : s + ctx.block], valid[s : s + ctx.block]
            probs = (hb @ weight.t()).to(acc).softmax(dim=-1)  # recomputed logits
            probs[torch.arange(len(lab), device=h.device), lab.clamp(min=0)] -= 1.0
            dlogits = (probs * (ok[:, None] * scale)).to(h.dtype)  # (B, V)
            if grad_h is not None:
                grad_h[s : s + ctx.block] = dlogits @ weight.to(h.dtype)
            if ctx.needs_input_grad[1]:
                grad_w += (dlogits.t() @ hb).to(acc)
        gw = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, gw, None, None, None


def linear_cross_entropy(
    h: Tensor,  # (..., d)
    weight: Tensor,  # (V, d)
    labels: Tensor,  # (...) int64
    ignore_index: int = -100,
    block: int = 256,
) -> Tensor:  # scalar (fp32, or fp64 for fp64 inputs): mean over labels != ignore_index
    """Mean cross-entropy of ``h @ weight.T`` against ``labels`` without storing all logits.

    Under autocast the projection runs in the autocast dtype (as ``nn.Linear`` would); the
    log-sum-exp and the loss are accumulated in fp32.
    """
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index, block
        )
