"""How much could retrieval lower held-out bits/byte, if the model copied from its neighbours?

A diagnostic for the demo's retrieval gain (issue 4). For every held-out token it finds the
neighbours that token may read under chunked cross-attention (those retrieved for the chunk
before its own, causally) and forms an n-gram *copy* distribution: the tokens that follow
the last ``--order`` context tokens wherever that context occurs in those neighbours. Mixing
it into the trained model's retrieval-off distribution where a match exists,

    p(x) = (1 - lam) * p_model(x) + lam * p_copy(x),

gives the bits/byte a model that had learnt this one simple copy rule would reach. Printed
beside it, from the same windows: the model with retrieval off and on, the fraction of
tokens with a match, and each mixture's ratio to retrieval-off. Random neighbours (same
count) are the control for how much of the matching is just frequent phrases.

    python -m benchmarks.experiments.retrieval_headroom RUN_DIR DB_DIR HELD_OUT_DIR
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks import common


def copy_counts(values: np.ndarray, context: tuple[int, ...], pad: int) -> Counter:
    """Next tokens after each occurrence of ``context`` in the rows of ``values`` (k, r)."""
    o, nxt = len(context), Counter()
    for row in values:
        for j in range(o - 1, len(row) - 1):
            if tuple(row[j - o + 1 : j + 1]) == context and row[j + 1] != pad:
                nxt[int(row[j + 1])] += 1
    return nxt


def main() -> None:
    p = common.parser(__doc__, threads=2)
    p.add_argument("run")
    p.add_argument("db")
    p.add_argument("text")
    p.add_argument("--neighbours", type=int, default=2)
    p.add_argument("--order", type=int, default=3, help="context tokens that must match")
    p.add_argument("--max-tokens", type=int, default=12000, help="per document")
    a = p.parse_args()
    common.set_threads(a.threads)
    model, db = common.load_run(a.run, a.db)
    tok, m, n = db.tokenizer, db.chunk_size, model.config.max_seq_len
    pad, lams = tok.pad_id, (0.3, 0.5, 0.7)
    rng = np.random.default_rng(0)
    tot: Counter = Counter()
    for path in sorted(Path(a.text).glob("*.txt")):
        ids = tok.encode(path.read_text())[: a.max_tokens]
        chunks = len(ids) // m
        ids = ids[: chunks * m]
        rows = np.asarray(ids).reshape(chunks, m)
        nbr, _ = db.search_tokens(rows, a.neighbours)
        vals, vmask = db.retrieved_tokens(nbr)
        rand, _ = db.retrieved_tokens(rng.integers(0, db.num_chunks, nbr.shape))
        vals_np, rand_np = vals.numpy(), rand.numpy()
        for w in range(0, len(ids) - n - 1, n):  # non-overlapping windows, chunk-aligned
            x = torch.tensor(ids[w : w + n + 1])[None]
            u0 = w // m
            r, rm = vals[u0 : u0 + n // m][None], vmask[u0 : u0 + n // m][None]
            with torch.no_grad():
                lp_off = torch.log_softmax(model(x[:, :-1]).float(), -1)[0]  # (n, V)
                lp_on = torch.log_softmax(model(x[:, :-1], r, neighbour_mask=rm).float(), -1)[0]
            for pos in range(m, n):  # targets with at least one chunk of context
                u = u0 + (pos + 1) // m - 1  # the chunk whose neighbours position pos reads
                t = int(x[0, pos + 1])
                ctx = tuple(ids[w + pos - a.order + 1 : w + pos + 1])
                tot["bytes"] += len(tok.decode([t]).encode("utf-8"))
                tot["tokens"] += 1
                tot["off"] += -lp_off[pos, t].item()
                tot["on"] += -lp_on[pos, t].item()
                p_off = math.exp(lp_off[pos, t].item())
                for name, source in (("copy", vals_np[u]), ("random", rand_np[u])):
                    nxt = copy_counts(source, ctx, pad)
                    tot[f"{name}_matched"] += bool(nxt)
                    for lam in lams:
                        q = (1 - lam) * p_off + lam * nxt[t] / sum(nxt.values()) if nxt else p_off
                        tot[f"{name}_mix{lam}"] += -math.log(q)

    def bpb(key: str) -> float:
        return tot[key] / math.log(2) / tot["bytes"]

    out = {
        "tokens": tot["tokens"],
        "matched_fraction": tot["copy_matched"] / tot["tokens"],
        "random_matched_fraction": tot["random_matched"] / tot["tokens"],
        "bpb_retrieval_off": bpb("off"),
        "bpb_retrieval_on": bpb("on"),
    }
    for lam in lams:
        out[f"bpb_copy_mix{lam}"] = bpb(f"copy_mix{lam}")
        out[f"bpb_random_mix{lam}"] = bpb(f"random_mix{lam}")
    best = min(lams, key=lambda lam: out[f"bpb_copy_mix{lam}"])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    print(
        f"retrieval on / off: {out['bpb_retrieval_on'] / out['bpb_retrieval_off']:.3f}; "
        f"{a.order}-gram copy mixture (lam {best}) / off: "
        f"{out[f'bpb_copy_mix{best}'] / out['bpb_retrieval_off']:.3f}; "
        f"same with random neighbours: "
        f"{out[f'bpb_random_mix{best}'] / out['bpb_retrieval_off']:.3f}"
    )


if __name__ == "__main__":
    main()
