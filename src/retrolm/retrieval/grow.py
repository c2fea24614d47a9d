"""Growing a database: ``retrolm db add DB NEW_DIR`` appends documents.

The new files are chunked with the database's tokenizer, embedded with its encoder
(weights checked by hash) and added to its index, and each new chunk gets its stored
neighbours among all chunks, old and new (its own document left out). An IVF or PQ index
keeps its trained quantizer; ``retrain`` trains a fresh index of the kind the build chose,
sized for the grown database (``retrolm db info`` says when the index was trained on far
fewer chunks than it holds). Older chunks keep their neighbours unless
``refresh_neighbours`` recomputes them (they may now have nearer ones among the new).

Everything is first made in ``DB/.add/`` (stages ``chunk`` -> ``embed`` -> ``index`` ->
``neighbours``, resumable by block like a build), while the database stays as it was and
opens. The commit then marks the manifest (``"adding"``: a database caught mid-commit
refuses to open), appends the new rows to the array files (each first cut back to its old
length, so a rerun after a kill appends once), swaps the index and neighbour files in, and
writes the grown manifest, which keeps every addition (``"additions"``: folder, files,
bytes, documents, chunks, time, index trained or extended, neighbours refreshed).

Shapes: M chunks before, A added, N = M + A after, d dims, K neighbour columns.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.errors import IncompatibleError
from retrolm.locking import exclusive_lock
from retrolm.retrieval import chunking, inputs
from retrolm.retrieval.build import embed_blocks
from retrolm.retrieval.database import RetrievalDatabase
from retrolm.retrieval.index import (
    IndexSpec,
    Searcher,
    build_index,
    choose_index,
    load_index,
    parse_size,
    save_index,
)
from retrolm.retrieval.neighbours import neighbours_block
from retrolm.retrieval.store import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    NEIGHBOUR_DISTS_FILE,
    NEIGHBOURS_FILE,
    PROGRESS_DIR,
    TOKENIZER_FILE,
    RowFile,
    _Blocks,
    _preallocate,
    array_info,
    read_manifest,
    write_manifest,
)
from retrolm.utils import atomic_path

log = logging.getLogger(__name__)

STAGING = ".add"
RETRAIN_RATIO = 4  # db info suggests --retrain once the index holds this many times more


class Rows:
    """Two row arrays seen as one ``(M + A, ...)``: slices and lists of row ids."""

    def __init__(self, first, second):
        self.parts, self.m = (first, second), len(first)
        self.shape = (len(first) + len(second), *first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            s, e, _ = rows.indices(len(self))
            a = self.parts[0][min(s, self.m) : min(e, self.m)]
            b = self.parts[1][max(s - self.m, 0) : max(e - self.m, 0)]
            return np.concatenate([np.asarray(a), np.asarray(b)])
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        old = rows < self.m
        if old.any():
            out[old] = self.parts[0][rows[old]]
        if (~old).any():
            out[~old] = self.parts[1][rows[~old] - self.m]
        return out


def add_documents(
    db_dir: str | os.PathLike,
    new_dir: str | os.PathLike,
    *,
    glob: str = "**/*.txt",
    retrain: bool = False,
    refresh_neighbours: bool = False,
) -> dict:
    """Append the documents of ``new_dir`` to the database in ``db_dir``; returns the grown
    manifest. Resumable: rerun the same call after a kill. One writer per database."""
    with exclusive_lock(db_dir, "database"):
        return _add(Path(db_dir), Path(new_dir).resolve(), glob, retrain, refresh_neighbours)


def _add(db_dir: Path, new_dir: Path, glob: str, retrain: bool, refresh: bool) -> dict:
    manifest = read_manifest(db_dir)
    stage_dir = db_dir / STAGING
    paths = chunking.list_documents(new_dir, glob)
    listing = inputs.list_inputs(paths, new_dir)
    settings = {
        "text_dir": str(new_dir),
        "glob": glob,
        "inputs": inputs.summary(listing),
        "retrain": retrain,
        "refresh_neighbours": refresh,
    }
    staged = read_manifest(stage_dir)
    if staged is not None and {k: staged.get(k) for k in settings} != settings:
        raise IncompatibleError(
            f"database {str(db_dir)!r} holds an unfinished addition of {staged['text_dir']!r} "
            f"with other settings or files: rerun that `retrolm db add` to finish it, or delete "
            f"{str(stage_dir)!r} to discard it"
        )
    if manifest is not None and "adding" in manifest:  # killed in the commit: finish it
        return _commit(db_dir, manifest, staged)
    db = RetrievalDatabase.open(db_dir)
    if staged is None:
        inputs.require_text(paths, new_dir)
        shutil.rmtree(stage_dir, ignore_errors=True)
        (stage_dir / PROGRESS_DIR).mkdir(parents=True)
        m = db.manifest
        staged = {
            **settings,
            "stages_done": [],
            "base_chunks": m["num_chunks"],
            "base_documents": m["num_documents"],
            "chunk_size": m["chunk_size"],
            "tokenizer": dict(m["tokenizer"], file=str(db_dir.resolve() / TOKENIZER_FILE)),
            "encoder": dict(m["encoder"]),
        }
        write_manifest(stage_dir, staged)
        inputs.write_inputs(stage_dir, listing)
    stages = (
        ("chunk", _stage_chunk),
        ("embed", _stage_embed),
        ("index", _stage_index),
        ("neighbours", _stage_neighbours),
    )
    for name, fn in stages:
        if name not in staged["stages_done"]:
            fn(db, stage_dir, staged, paths=paths)
            staged["stages_done"].append(name)
            write_manifest(stage_dir, staged)
    del db
    return _commit(db_dir, read_manifest(db_dir), staged)


def _stage_chunk(db, stage_dir: Path, staged: dict, *, paths) -> None:
    m, seq_len = db.chunk_size, db.manifest["seq_len"]
    rep = chunking.chunk_corpus(
        paths,
        Path(staged["text_dir"]),
        stage_dir,
        db.tokenizer,
        m,
        seq_len,
        stage_dir / PROGRESS_DIR / "chunk.json",
    )
    staged.update(num_chunks=rep.chunks, num_documents=rep.documents)
    staged["arrays"] = {
        "chunks": array_info(
            chunking.CHUNKS_FILE, chunking.token_dtype(db.tokenizer.vocab_size), (rep.chunks, m + 1)
        ),
        "doc_ids": array_info(chunking.DOC_IDS_FILE, np.int32, (rep.chunks,)),
    }


def _stage_embed(db, stage_dir: Path, staged: dict, **_) -> None:
    a, d = staged["num_chunks"], db.embeddings.shape[1]
    staged["arrays"]["embeddings"] = array_info(EMBEDDINGS_FILE, np.float32, (a, d))
    block = db.manifest["config"]["block_size"]
    _preallocate(stage_dir / EMBEDDINGS_FILE, a * d * 4)
    job = dict(
        db_dir=str(stage_dir),
        manifest=staged,
        batch_size=db.manifest["config"]["batch_size"],
        blocks=list(range(_Blocks(stage_dir, "embed", a, block).count)),
        block_size=block,
        threads=0,
        worker=0,
    )
    embed_blocks(job, encoder=db.encoder)


def _all_embeddings(db, stage_dir: Path, staged: dict) -> Rows:
    return Rows(
        RowFile(db.path, db.manifest["arrays"]["embeddings"]),
        _staged_rows(stage_dir, staged, "embeddings"),
    )


def _staged_rows(stage_dir: Path, staged: dict, name: str) -> RowFile:
    return RowFile(stage_dir, staged["arrays"][name])


def _stage_index(db, stage_dir: Path, staged: dict, **_) -> None:
    emb = _all_embeddings(db, stage_dir, staged)
    old = db.manifest["index"]
    if staged["retrain"]:
        cfg = db.manifest["config"]
        budget = parse_size(cfg["memory_budget"])
        spec = choose_index(len(emb), emb.shape[1], cfg["index"], budget, cfg.get("nprobe", 0))
        log.info("retraining the index: %s over %d vectors", spec.factory, len(emb))
        index = build_index(spec, emb, memory_budget=budget)
        info = dict(spec.to_json(), trained_on=len(emb))
    else:
        spec = IndexSpec(**{k: v for k, v in old.items() if k in IndexSpec.__annotations__})
        index = load_index(db.path / old["file"], spec)
        new = _staged_rows(stage_dir, staged, "embeddings")
        for s in range(0, len(new), 65536):
            index.add(np.ascontiguousarray(new[s : s + 65536], dtype=np.float32))
        info = dict(old, trained_on=old.get("trained_on", staged["base_chunks"]))
    with atomic_path(stage_dir / INDEX_FILE) as tmp:
        save_index(index, tmp)
    staged["index"] = dict(info, file=INDEX_FILE)


def _stage_neighbours(db, stage_dir: Path, staged: dict, **_) -> None:
    base, k = staged["base_chunks"], db.manifest["num_neighbour_columns"]
    emb = _all_embeddings(db, stage_dir, staged)
    n = len(emb)
    spec = IndexSpec(**{k: v for k, v in staged["index"].items() if k in IndexSpec.__annotations__})
    searcher = Searcher(load_index(stage_dir / INDEX_FILE, spec), spec, emb)
    new_docs = np.asarray(_staged_rows(stage_dir, staged, "doc_ids")[:], dtype=np.int64)
    doc_ids = np.concatenate(
        [np.asarray(db.doc_ids, dtype=np.int64), new_docs + staged["base_documents"]]
    )
    first = 0 if staged["refresh_neighbours"] else base  # rows whose neighbours are computed
    rows = n - first
    staged["arrays"].update(
        neighbours=array_info(NEIGHBOURS_FILE, np.int32, (rows, k)),
        neighbour_dists=array_info(NEIGHBOUR_DISTS_FILE, np.float32, (rows, k)),
    )
    staged["neighbours_from"] = first
    _preallocate(stage_dir / NEIGHBOURS_FILE, rows * k * 4)
    _preallocate(stage_dir / NEIGHBOUR_DISTS_FILE, rows * k * 4)
    ids_out = RowFile(stage_dir, staged["arrays"]["neighbours"], writable=True)
    d_out = RowFile(stage_dir, staged["arrays"]["neighbour_dists"], writable=True)
    blocks = _Blocks(stage_dir, "neighbours", rows, db.manifest["config"]["block_size"])
    for i in tqdm(blocks.todo(), desc="neighbours", unit="block"):
        s, e = blocks.rows(i)
        ids, dists = neighbours_block(searcher, emb, doc_ids, first + s, first + e, k)
        ids_out.write(s, ids)
        d_out.write(s, dists)
        blocks.mark(i)
    ids_out.close()
    d_out.close()


# ---- the commit ---------------------------------------------------------------------------
def _commit(db_dir: Path, manifest: dict, staged: dict) -> dict:
    """Move the staged addition into the database (idempotent: a rerun after a kill redoes
    it from the marker's recorded sizes)."""
    arrays = manifest["arrays"]
    if "adding" not in manifest:
        manifest["adding"] = {
            name: (db_dir / arrays[name]["file"]).stat().st_size
            for name in ("chunks", "doc_ids", "embeddings", "neighbours", "neighbour_dists")
        }
        manifest["adding"]["documents"] = (db_dir / chunking.DOCS_FILE).stat().st_size
        write_manifest(db_dir, manifest)
    sizes, stage_dir = manifest["adding"], db_dir / STAGING
    base, base_docs = staged["base_chunks"], staged["base_documents"]
    new_docs = np.fromfile(stage_dir / chunking.DOC_IDS_FILE, dtype=np.int32)
    appended = {
        "chunks": (stage_dir / chunking.CHUNKS_FILE).read_bytes(),
        "doc_ids": (new_docs + base_docs).astype(np.int32).tobytes(),
        "embeddings": (stage_dir / EMBEDDINGS_FILE).read_bytes(),
        "documents": b"".join(
            _moved(line, base, base_docs, staged["text_dir"])
            for line in (stage_dir / chunking.DOCS_FILE).read_bytes().splitlines()
        ),
    }
    if not staged["refresh_neighbours"]:
        appended["neighbours"] = (stage_dir / NEIGHBOURS_FILE).read_bytes()
        appended["neighbour_dists"] = (stage_dir / NEIGHBOUR_DISTS_FILE).read_bytes()
    for name, data in appended.items():
        path = db_dir / (chunking.DOCS_FILE if name == "documents" else arrays[name]["file"])
        with open(path, "r+b") as f:
            f.truncate(sizes[name])  # what a killed commit appended goes first
            f.seek(sizes[name])
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    moved = [INDEX_FILE] + (
        [NEIGHBOURS_FILE, NEIGHBOUR_DISTS_FILE] if staged["refresh_neighbours"] else []
    )
    for name in moved:
        if (stage_dir / name).exists():  # gone: moved by the killed commit
            os.replace(stage_dir / name, db_dir / name)
    return _grown_manifest(db_dir, manifest, staged)


def _moved(line: bytes, base: int, base_docs: int, text_dir: str) -> bytes:
    import json

    doc = json.loads(line)
    doc.update(first_chunk=doc["first_chunk"] + base, text_dir=text_dir)
    return (json.dumps(doc) + "\n").encode()


def _grown_manifest(db_dir: Path, manifest: dict, staged: dict) -> dict:
    stage_dir, arrays = db_dir / STAGING, manifest["arrays"]
    n = staged["base_chunks"] + staged["num_chunks"]
    l = manifest["seq_len"] // manifest["chunk_size"]
    starts = np.arange(0, n - l + 1, l, dtype=np.int64)
    with atomic_path(db_dir / chunking.SEQ_STARTS_FILE) as tmp:
        starts.tofile(tmp)
    for name in ("chunks", "doc_ids", "embeddings", "neighbours", "neighbour_dists"):
        arrays[name]["shape"][0] = n
    arrays["seq_starts"]["shape"] = [len(starts)]
    additions = manifest.setdefault("additions", [])
    listing = f"inputs-add-{len(additions) + 1}.jsonl"
    shutil.copyfile(stage_dir / inputs.INPUTS_FILE, db_dir / listing)
    additions.append(
        {
            "text_dir": staged["text_dir"],
            "glob": staged["glob"],
            "inputs": dict(staged["inputs"], file=listing),
            "documents": staged["num_documents"],
            "chunks": staged["num_chunks"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "index": "retrained" if staged["retrain"] else "extended",
            "refreshed_neighbours": staged["refresh_neighbours"],
        }
    )
    manifest.update(
        num_chunks=n,
        num_documents=staged["base_documents"] + staged["num_documents"],
        num_sequences=len(starts),
        index=staged["index"],
    )
    del manifest["adding"]
    write_manifest(db_dir, manifest)
    shutil.rmtree(stage_dir, ignore_errors=True)
    return manifest


def index_advice(manifest: dict) -> str | None:
    """A line for ``db info`` when a trained index holds far more chunks than it was
    trained for (its lists and codes fit the smaller sample), else None."""
    info = manifest.get("index", {})
    trained = info.get("trained_on")
    if not info.get("train_size") or not trained:
        return None
    n = manifest["num_chunks"]
    if n < RETRAIN_RATIO * trained:
        return None
    return (
        f"the {info['kind']} index was trained when the database held {trained} chunks and "
        f"now holds {n}: add the next folder with `retrolm db add DB NEW_DIR --retrain` (or "
        "rebuild) to train it for this size"
    )
