"""One stage of ``bench_scale`` in its own process: ``python -m benchmarks.scale.scale_stage
STAGE DB_DIR [SAMPLE_BLOCKS]``; prints ``RESULT {json}`` (seconds, peak RSS, peak anonymous
memory, and what the stage measured). Run by ``bench_scale``, not by hand."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

from benchmarks import common

MB = 1 << 20


class MemorySampler:
    """The peak of ``RssAnon`` (anonymous memory: not the file pages a stage maps), sampled
    every 5 ms in a thread; ``VmHWM`` (peak RSS) is read at the end."""

    def __init__(self):
        self.peak_anon_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status() -> dict[str, int]:
        text = open("/proc/self/status").read()
        return {k: int(v) for k, v in re.findall(r"(RssAnon|VmHWM|VmRSS):\s+(\d+)", text)}

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_anon_kb = max(self.peak_anon_kb, self._status()["RssAnon"])

    def __enter__(self):
        self.before_mb = self._status()["VmRSS"] / 1024
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        st = self._status()
        self.peak_anon_kb = max(self.peak_anon_kb, st["RssAnon"])
        self.peak_rss_mb, self.peak_anon_mb = st["VmHWM"] / 1024, self.peak_anon_kb / 1024


def _load(db: Path):
    from retrolm.retrieval.build import BuildConfig
    from retrolm.retrieval.store import read_manifest

    manifest = read_manifest(db)
    return manifest, BuildConfig(**manifest["config"])


def chunk(db: Path, _sample: int) -> dict:
    from retrolm.retrieval import build, chunking

    manifest, config = _load(db)
    paths = chunking.list_documents(manifest["text_dir"], config.glob)
    (db / build.PROGRESS_DIR).mkdir(exist_ok=True)
    t0 = time.perf_counter()
    build._stage_chunk(db, manifest, config, paths=paths)
    seconds = time.perf_counter() - t0
    manifest["stages_done"].append("chunk")
    build.write_manifest(db, manifest)
    n = manifest["num_chunks"]
    return {"seconds": seconds, "num_chunks": n, "note": f"{n} chunks, {len(paths)} files"}


def embed(db: Path, sample: int) -> dict:
    from benchmarks.scale.bench_scale import EMBED_BLOCK, mark_all_but
    from retrolm.retrieval import build
    from retrolm.retrieval.encoder import FrozenEncoder

    manifest, config = _load(db)
    config = replace(config, block_size=EMBED_BLOCK)
    n = manifest["num_chunks"]
    blocks = mark_all_but(db, "embed", n, sample, EMBED_BLOCK)
    enc = FrozenEncoder(
        config.encoder,
        pooling=config.pooling,
        dtype=config.embed_dtype,
        max_length=config.encoder_max_length,
    )
    spent, done, inner = [0.0], [0], enc.embed

    def timed_embed(texts, batch_size):
        t = time.perf_counter()
        out = inner(texts, batch_size)
        spent[0] += time.perf_counter() - t
        done[0] += len(texts)
        return out

    enc.embed = timed_embed
    t0 = time.perf_counter()
    build._stage_embed(db, manifest, config, encoder=enc)
    total = time.perf_counter() - t0
    build.write_manifest(db, manifest)
    rate = done[0] / spent[0]
    return {
        "seconds": total - spent[0] + n / rate,
        "sampled_seconds": total,
        "chunks_per_s": rate,
        "fixed_s": total - spent[0],
        "extrapolated": True,
        "note": f"{rate:.0f} chunks/s ({manifest['encoder']['dtype']}) on blocks {blocks}",
    }


def train(db: Path, _sample: int) -> dict:
    import faiss

    from retrolm.retrieval import build
    from retrolm.retrieval.index import choose_index, parse_size, train_index
    from retrolm.retrieval.store import RowFile

    manifest, config = _load(db)
    emb = RowFile(db, manifest["arrays"]["embeddings"])
    spec = choose_index(len(emb), emb.shape[1], config.index, parse_size(config.memory_budget))
    t0 = time.perf_counter()
    index = train_index(spec, emb)
    seconds = time.perf_counter() - t0
    faiss.write_index(index, str(db / "trained.faiss"))
    manifest["index"] = dict(spec.to_json(), file=build.INDEX_FILE, trained_on=len(emb))
    build.write_manifest(db, manifest)
    iters = faiss.extract_index_ivf(index).cp.niter if spec.nlist else 0
    return {
        "seconds": seconds,
        "spec": spec.to_json(),
        "niter": iters,
        "resident_data_mb": spec.train_size * emb.shape[1] * 4 / MB,
        "note": f"{spec.factory} on {spec.train_size} vectors",
    }


def add(db: Path, _sample: int) -> dict:
    import faiss

    from retrolm.retrieval import build
    from retrolm.retrieval.index import IndexSpec, add_vectors, save_index
    from retrolm.retrieval.store import RowFile

    manifest, _ = _load(db)
    spec = IndexSpec(**{f.name: manifest["index"][f.name] for f in fields(IndexSpec)})
    emb = RowFile(db, manifest["arrays"]["embeddings"])
    index = faiss.read_index(str(db / "trained.faiss"))
    before = MemorySampler._status()["RssAnon"] / 1024
    t0 = time.perf_counter()
    add_vectors(index, spec, emb)
    seconds = time.perf_counter() - t0
    held = MemorySampler._status()["RssAnon"] / 1024 - before  # the index as faiss holds it
    save_index(index, db / build.INDEX_FILE)
    manifest["stages_done"].append("index")
    build.write_manifest(db, manifest)
    size = (db / build.INDEX_FILE).stat().st_size
    return {
        "seconds": seconds,
        "index_bytes": size,
        "held_mb": held,
        "resident_data_mb": max(held, size / MB),
        "note": f"{spec.factory}: {size / MB:.0f} MB on disk, {held:.0f} MB held while adding",
    }


def neighbours(db: Path, sample: int) -> dict:
    from benchmarks.scale.bench_scale import mark_all_but
    from retrolm.retrieval import build
    from retrolm.retrieval import neighbours as stage

    manifest, config = _load(db)
    n = manifest["num_chunks"]
    blocks = mark_all_but(db, "neighbours", n, sample)
    spent, inner = [], stage.neighbours_block  # what NeighbourSearch.block calls

    def timed_block(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        spent.append(time.perf_counter() - t)
        return out

    stage.neighbours_block = timed_block
    t0 = time.perf_counter()
    build._stage_neighbours(db, manifest, config)
    total = time.perf_counter() - t0
    count = -(-n // config.block_size)
    per_block = sum(spent) / len(spent)
    index_mb = (db / build.INDEX_FILE).stat().st_size / MB
    return {
        "seconds": total - sum(spent) + count * per_block,
        "sampled_seconds": total,
        "block_s": per_block,
        "blocks": count,
        "fixed_s": total - sum(spent),
        "extrapolated": True,
        "resident_data_mb": index_mb + n * 4 / MB,
        "note": f"{per_block:.1f} s/block x {count} blocks (sampled {blocks})",
    }


STAGES = {"chunk": chunk, "embed": embed, "train": train, "add": add, "neighbours": neighbours}


def main() -> None:
    name, db = sys.argv[1], Path(sys.argv[2])
    sample = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    with MemorySampler() as mem:
        row = STAGES[name](db, sample)
    row.update(
        peak_rss_mb=mem.peak_rss_mb, peak_anon_mb=mem.peak_anon_mb, rss_before_mb=mem.before_mb
    )
    common.emit(json.loads(json.dumps(row)))


if __name__ == "__main__":
    main()
