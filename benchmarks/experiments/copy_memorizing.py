"""Can the kNN path learn to copy? A synthetic check of the Memorizing Transformer.

Random tokens (vocabulary 32), each window 16 tokens then the same 16 again; segments of 8,
XL 8, so the second copy's answers lie beyond the XL window (only the kNN memory, or XL
recurrence across layers, reaches them). A tiny model (dim 64, depth 2, kNN layer 2, top-4)
trained segment by segment as the trainer does (``segment_losses``), against the same model
without a kNN layer. Printed: the second half's loss (nats) with the memory read and off,
for segments 3 and 4, beside chance (ln 32 = 3.466). A model that copies gets far below.

  python -m benchmarks.experiments.copy_memorizing knn|xl STEPS
"""

from __future__ import annotations

import math
import sys
import time
from types import SimpleNamespace

import torch

from retrolm import MemorizingConfig, MemorizingLanguageModel
from retrolm.models.memorizing.family import segment_losses

V, H = 32, 16  # vocabulary, half window


def batch(n: int) -> torch.Tensor:  # (n, 2H + 1): the second half repeats the first
    a = torch.randint(0, V, (n, H))
    return torch.cat([a, a, a[:, :1]], 1)


def main() -> None:
    knn, steps = sys.argv[1] == "knn", int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = MemorizingConfig(
        num_tokens=V + 1, dim=64, depth=2, heads=4, dim_head=16,
        memorizing_layers=(2,) if knn else (), max_knn_memories=64, num_retrieved_memories=4,
        segment_len=8, max_seq_len=2 * H, xl_max_memories=8, pad_id=None,
    )  # fmt: skip
    m = MemorizingLanguageModel(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for piece in segment_losses(m, SimpleNamespace(seq=batch(32))):
            piece().backward()
        opt.step()
        opt.zero_grad()
        if step % 500 == 0:
            print(f"step {step}, {time.time() - t0:.0f} s", flush=True)
    m.eval()
    with torch.no_grad():
        s = batch(256)
        for use in (True, False):
            lg = m(s[:, :-1], use_memory=use)[:, H:]
            ce = torch.nn.functional.cross_entropy(
                lg.reshape(-1, V + 1), s[:, H + 1 :].reshape(-1), reduction="none"
            ).view(256, -1)
            print(
                f"{'kNN' if knn else 'XL-only'} memory {'on' if use else 'off'}: second half "
                f"{ce[:, :8].mean():.3f} (segment 3), {ce[:, 8:].mean():.3f} (segment 4); "
                f"chance {math.log(V):.3f}"
            )


if __name__ == "__main__":
    main()
