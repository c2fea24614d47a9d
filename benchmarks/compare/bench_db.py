"""Retrieval database build: end-to-end chunks/s vs the encoder's bare forward rate, and
peak RSS for a corpus vs one 10x larger.

Corpus: the English Linux kernel documentation from Debian ``linux-doc-6.1``, fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache folder outside
the repository (never committed). The 10x corpus is the first files (sorted) up to
``--mb`` megabytes; the 1x corpus is the first tenth of those (by bytes).

Each build runs in its own process (so its peak RSS is its own); the bare forward rate
is measured in another process on 1024 chunk texts of the same database, with the same
dtype and batch size, right before and right after the 10x build (machines are noisy).

    python -m benchmarks.compare.bench_db [--mb 2] [--sample 512] [--cache DIR]
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks import common

CHILD_BUILD = """
import json, sys, time, logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from benchmarks.common import emit, peak_rss_mb
from retrolm.retrieval import BuildConfig, build_database
cfg = BuildConfig(**json.loads(sys.argv[3]))
t0 = time.perf_counter()
m = build_database(sys.argv[1], sys.argv[2], cfg)
dt = time.perf_counter() - t0
emit({"seconds": dt, "num_chunks": m["num_chunks"], "dtype": m["encoder"]["dtype"],
      "index": m["index"]["factory"], "maxrss_mb": peak_rss_mb()})
"""

CHILD_BARE = """
import sys, time
import numpy as np
from benchmarks.common import emit, peak_rss_mb
from retrolm.retrieval import FrozenEncoder, RetrievalDatabase
db = RetrievalDatabase.open(sys.argv[1])
n_sample, batch = int(sys.argv[2]), db.manifest["config"]["batch_size"]
rows = np.linspace(0, db.num_chunks - 1, min(n_sample, db.num_chunks)).astype(np.int64)
texts = db.tokenizer.decode_batch(np.asarray(db.chunks[rows, :-1]))
st = db.manifest["encoder"]
enc = FrozenEncoder(st["path"], pooling=st["pooling"], dtype=st["dtype"],
                    max_length=st["max_length"])
encs = enc._tok.encode_batch(texts)  # tokenized beforehand: only the model is timed
encs.sort(key=lambda e: len(e.ids))  # the build sorts by length too
enc._forward_encodings(enc._model, encs[:batch])  # warm-up
t0 = time.perf_counter()
for s in range(0, len(encs), batch):
    enc._forward_encodings(enc._model, encs[s:s + batch])
dt = time.perf_counter() - t0
emit({"chunks_per_s": len(encs) / dt, "dtype": st["dtype"], "maxrss_mb": peak_rss_mb()})
"""


def fetch_linux_docs(cache: Path) -> Path:
    """Decompressed English Linux docs under cache/linux-docs (fetched once)."""
    out = cache / "linux-docs"
    if (out / ".done").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob("linux-doc-6.1_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", "linux-doc-6.1"], cwd=cache, check=True)
        debs = sorted(cache.glob("linux-doc-6.1_*.deb"))
    root = cache / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    docs = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for gz in sorted(docs.rglob("*.gz")):
        rel = gz.relative_to(docs)
        if rel.parts[0] == "translations" or not rel.name.endswith((".rst.gz", ".txt.gz")):
            continue
        dst = out / rel.with_suffix("").with_suffix(".txt")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(gzip.decompress(gz.read_bytes()))
    (out / ".done").touch()
    return out


def make_subsets(docs: Path, cache: Path, mb: float) -> tuple[Path, Path]:
    files = sorted(p for p in docs.rglob("*.txt"))
    big, small = cache / f"corpus-{mb}mb-10x", cache / f"corpus-{mb}mb-1x"
    if not big.exists():
        chosen, total = [], 0
        for p in files:
            if total >= mb * 1e6:
                break
            chosen.append(p)
            total += p.stat().st_size
        small_bytes = 0
        for p in chosen:
            keep_small = small_bytes < total / 10  # the 1x corpus is the 10x corpus's first tenth
            small_bytes += p.stat().st_size if keep_small else 0
            for dst_root, keep in ((big, True), (small, keep_small)):
                if keep:
                    dst = dst_root / p.relative_to(docs)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, dst)
    return small, big


def run_child(code: str, *args: str) -> dict:
    """``code`` in a fresh process, so that its peak RSS is its own."""
    return common.run_child(["-c", code, *args])


def corpus_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.txt"))


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--cache", default="/tmp/retrolm-bench-cache", help="corpus and databases")
    ap.add_argument("--mb", type=float, default=2.0, help="size of the 10x corpus in MB")
    ap.add_argument("--embed-dtype", default="auto")
    ap.add_argument("--sample", type=int, default=1024, help="chunks for the bare forward rate")
    args = ap.parse_args()
    cache = Path(args.cache)
    small, big = make_subsets(fetch_linux_docs(cache), cache, args.mb)
    cfg = json.dumps({"embed_dtype": args.embed_dtype, "chunk_size": 64, "vocab_size": 16384})
    results = {}
    for name, corpus in (("1x", small), ("10x", big)):
        db = cache / f"db-{name}"
        shutil.rmtree(db, ignore_errors=True)
        if name == "10x":
            results["bare_before"] = run_child(CHILD_BARE, str(cache / "db-1x"), str(args.sample))
        t0 = time.time()
        results[name] = run_child(CHILD_BUILD, str(corpus), str(db), cfg)
        results[name]["wall_s"] = time.time() - t0
        results[name]["mb"] = corpus_bytes(corpus) / 1e6
    results["bare_after"] = run_child(CHILD_BARE, str(cache / "db-10x"), str(args.sample))
    bare = (results["bare_before"]["chunks_per_s"] + results["bare_after"]["chunks_per_s"]) / 2
    for name in ("1x", "10x"):
        r = results[name]
        r["chunks_per_s"] = r["num_chunks"] / r["seconds"]
        print(
            f"{name:4s} {r['mb']:6.2f} MB  {r['num_chunks']:7d} chunks  "
            f"build {r['seconds']:7.1f}s  {r['chunks_per_s']:6.1f} chunks/s  "
            f"peak RSS {r['maxrss_mb']:7.0f} MB  ({r['dtype']}, {r['index']})"
        )
    print(
        f"bare encoder forward: {results['bare_before']['chunks_per_s']:.1f} (before) / "
        f"{results['bare_after']['chunks_per_s']:.1f} (after) chunks/s, "
        f"{results['bare_after']['dtype']}; encoder-only process peak RSS "
        f"{results['bare_after']['maxrss_mb']:.0f} MB"
    )
    print(
        f"end-to-end / bare forward (10x): {results['10x']['chunks_per_s'] / bare:.2f}  "
        "(target >= 0.80)"
    )
    print(
        f"peak RSS 10x / 1x: {results['10x']['maxrss_mb'] / results['1x']['maxrss_mb']:.2f}  "
        "(target < 1.20)"
    )
    print("JSON", json.dumps(results))


if __name__ == "__main__":
    main()
