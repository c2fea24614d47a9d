"""Collectives for module state that must agree across data-parallel ranks.

Gradients are synchronised by DDP; *statistics* kept in buffers (k-means counts and sums)
are not, and ``broadcast_buffers`` would simply overwrite every rank's statistics with rank
0's. These helpers all-reduce such statistics explicitly. Outside an initialised process
group they do nothing, so single-process code never pays for them.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(*tensors: Tensor) -> None:
    """In-place sum over ranks (one flat collective for all tensors)."""
    if not is_distributed() or not tensors:
        return
    flat = [t.reshape(-1) for t in tensors]
    buf = flat[0].new_empty(sum(f.numel() for f in flat))
    off = 0
    for f in flat:
        buf[off : off + f.numel()] = f
        off += f.numel()
    dist.all_reduce(buf)
    off = 0
    for t in tensors:
        t.copy_(buf[off : off + t.numel()].view_as(t))
        off += t.numel()


def broadcast_(tensor: Tensor, src: int = 0) -> None:
    """In-place: every rank receives ``src``'s tensor."""
    if is_distributed():
        dist.broadcast(tensor, src)
