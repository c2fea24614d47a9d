"""Neighbour-stage recall and time of an IVF index against exact search, by nprobe.

On a database ``bench_scale`` left behind (synthetic keys, real doc_ids): an exact Flat
index gives each sampled chunk's true neighbours (other documents only, the build's rule);
an ``IVF{nlist},Flat`` index (the build's ``choose_index(kind="ivf")``, trained and filled
by the build's own code, or the database's own index when it is that one) is searched
with each nprobe, with the build's exact re-ranking.
Reports recall@K (the share of the exact K neighbours found, K = the stored columns) and
seconds per 4096 queries, for the exact index too: the evidence for ``FLAT_MAX_N`` (exact
vs IVF at 0.1M chunks) and for a smaller ``--nprobe`` than the default nlist / 8. On the
synthetic keys each IVF list tends to hold one whole Gaussian cluster, so recall here is an
upper bound for real text embeddings: check a real build with ``retrolm db check --nprobe``.

    python -m benchmarks.scale.nprobe_recall --db /tmp/retrolm-bench-scale/db-1000000 \\
        [--queries 2048] [--nprobe 8,16,32,64,128,nlist/8]
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import common


def neighbours(searcher, emb, doc_ids, rows, k):
    """Neighbour ids ``(Q, k)`` of chunks ``rows`` and the seconds it took."""
    from retrolm.retrieval.neighbours import search_excluding

    x = emb.gather(rows)
    docs = doc_ids[rows]

    def same_document(r, ids):
        return doc_ids[ids] == docs[r, None]

    t = time.perf_counter()
    ids, _ = search_excluding(searcher, x, k, same_document)
    return ids, time.perf_counter() - t


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def main() -> None:
    import faiss

    from retrolm.retrieval.index import Searcher, add_vectors, choose_index, train_index
    from retrolm.retrieval.store import RowFile, open_array, read_manifest

    ap = common.parser(__doc__)
    ap.add_argument("--db", required=True)
    ap.add_argument("--queries", type=int, default=2048, help="chunks sampled (evenly spaced)")
    ap.add_argument("--nprobe", default="4,8,16,32,64,128,nlist/8", help="values to try")
    ap.add_argument("--out", default=None, help="append the row to this jsonl")
    args = ap.parse_args()
    db = Path(args.db)
    manifest = read_manifest(db)
    emb = RowFile(db, manifest["arrays"]["embeddings"])
    doc_ids = np.array(open_array(db, manifest["arrays"]["doc_ids"]))
    n, d = emb.shape
    cfg = manifest["config"]  # the K columns the neighbour stage stores
    k = manifest.get("num_neighbour_columns", cfg["neighbours"] + cfg["extra_neighbours"])
    rows = np.unique(np.linspace(0, n - 1, args.queries).astype(np.int64))
    print(f"{db.name}: N {n}, K {k}, {len(rows)} queries, load {common.load_average()}")

    flat = faiss.IndexFlatL2(d)
    for s in range(0, n, 65536):
        flat.add(emb.gather(np.arange(s, min(n, s + 65536))))
    exact_spec = choose_index(n, d, "flat")
    truth, t_exact = neighbours(Searcher(flat, exact_spec), emb, doc_ids, rows, k)
    del flat
    per_block = 4096 / len(rows)
    print(f"exact: {t_exact * per_block:.2f} s per 4096 queries")

    spec = choose_index(n, d, "ivf")
    t0 = time.perf_counter()
    built = db / "index.faiss"
    if manifest.get("index", {}).get("factory") == spec.factory and built.is_file():
        index = faiss.read_index(str(built))  # the one bench_scale's add stage built
    else:
        index = train_index(spec, emb)
        add_vectors(index, spec, emb)
    build_s = time.perf_counter() - t0
    print(f"{spec.factory}: {build_s:.1f} s to build or load (trained on {spec.train_size})")
    out = {
        "db": db.name,
        "num_chunks": n,
        "k": k,
        "queries": len(rows),
        "exact_s_per_4096": t_exact * per_block,
        "factory": spec.factory,
        "train_size": spec.train_size,
        "train_add_s": build_s,
        "load": common.load_average(),
        "nprobe": [],
    }
    for item in args.nprobe.split(","):
        p = spec.nlist // int(item.split("/")[1]) if item.startswith("nlist/") else int(item)
        p = max(1, min(spec.nlist, p))
        searcher = Searcher(index, replace(spec, nprobe=p), emb)
        found, t = neighbours(searcher, emb, doc_ids, rows, k)
        r = recall(found, truth)
        out["nprobe"].append({"nprobe": p, "recall": r, "s_per_4096": t * per_block})
        print(f"  nprobe {p:5d}: recall@{k} {r:.4f}  {t * per_block:7.2f} s per 4096 queries")
    out["load_end"] = common.load_average()
    if args.out:
        common.append_jsonl(args.out, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
