"""Retrieving for another corpus from a database (Megatron-RETRO's "query" stage).

``query_corpus(DB, TRAIN_DIR, OUT)`` (``retrolm db query DB --text TRAIN_DIR --out OUT``)
chunks a training corpus with the database's tokenizer, chunk size and sequence length,
embeds the chunks with the database's encoder (its weights checked by hash) and stores
each chunk's K nearest chunks *of the database* in ``OUT``, a *neighbour set*. Stages
``chunk`` -> ``embed`` -> ``neighbours``, resumable and locked exactly as a build
(``build.py``: block markers under ``.progress/``, the manifest rewritten after each
stage, ``"complete": true`` last).

A chunk never retrieves its own document. The two corpora may share documents (a
training corpus that is also part of the database), and their ids are unrelated, so
documents are matched by *content*: the sha256 of a document's LM-token rows, which with
the same tokenizer and chunk size equals exactly when the texts do. A training document
with the same hash as a database document excludes that document's chunks.

``NeighbourSet.open(DB, OUT)`` is the training view (``retrolm train --db DB --neighbours
OUT``): the training corpus's chunks and sequences with neighbours pointing into DB's
chunks, read by ``data.RETRODataset`` like a database. Its documents and DB's share one
key space (``doc_ids``, ``candidate_doc_ids``): a DB document keeps its id, a training
document matched by content takes that id, an unmatched one ``num_db_documents + id``.

Shapes: N training chunks, M database chunks, m chunk size, K stored neighbour columns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.errors import IncompatibleError
from retrolm.locking import LOCK_FILE, exclusive_lock
from retrolm.retrieval import chunking, inputs
from retrolm.retrieval.build import embed_blocks
from retrolm.retrieval.database import RetrievalDatabase
from retrolm.retrieval.neighbours import search_excluding
from retrolm.retrieval.store import (
    EMBEDDINGS_FILE,
    MANIFEST,
    NEIGHBOUR_DISTS_FILE,
    NEIGHBOURS_FILE,
    PROGRESS_DIR,
    TOKENIZER_FILE,
    RowFile,
    _Blocks,
    _preallocate,
    array_info,
    open_array,
    read_manifest,
    write_manifest,
)
from retrolm.utils import atomic_path

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "retrolm-neighbour-set", 1
MATCHED_FILE = "matched_docs.bin"


def document_hashes(chunks: np.ndarray, documents: list[dict]) -> list[str]:
    """The sha256 of each document's chunk rows ``chunks[first : first + count]``."""
    return [
        hashlib.sha256(
            np.ascontiguousarray(chunks[d["first_chunk"] : d["first_chunk"] + d["num_chunks"]])
        ).hexdigest()
        for d in documents
    ]


def database_identity(db: RetrievalDatabase) -> dict:
    """What a neighbour set depends on in its database: the neighbours change with any."""
    m = db.manifest
    return {
        "path": str(Path(db.path).resolve()),
        "num_chunks": int(m["num_chunks"]),
        "num_documents": int(m["num_documents"]),
        "tokenizer_hash": m["tokenizer"]["hash"],
        "encoder_sha256": m["encoder"]["sha256"],
        "index": m["index"]["factory"],
        "additions": len(m.get("additions", [])),
    }


# ---- the query stage ----------------------------------------------------------------------
def query_corpus(
    db: str | os.PathLike | RetrievalDatabase,
    text_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    glob: str = "**/*.txt",
    block_size: int = 4096,
    restart: bool = False,
) -> dict:
    """Store the neighbours in ``db`` of every chunk of ``text_dir`` in ``out_dir``; returns
    its manifest. A rerun resumes the same query (same database, files and settings), else
    ``IncompatibleError``; ``restart`` discards an earlier one. One writer per ``out_dir``.
    Search parameters (``db.set_search``) apply; the database's K columns are stored."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if not isinstance(db, RetrievalDatabase):
        db = RetrievalDatabase.open(db)
    with exclusive_lock(out_dir, "neighbour set"):
        return _query(db, Path(text_dir).resolve(), Path(out_dir), glob, block_size, restart)


def _query(db, text_dir: Path, out: Path, glob: str, block_size: int, restart: bool) -> dict:
    paths = chunking.list_documents(text_dir, glob)
    listing = inputs.list_inputs(paths, text_dir)
    settings = {
        "database": database_identity(db),
        "text_dir": str(text_dir),
        "glob": glob,
        "block_size": block_size,
        "search": db.index_spec.to_json(),
        "inputs": inputs.summary(listing),
    }
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("format") != FORMAT:
        raise ValueError(
            f"OUT {str(out)!r} holds a manifest.json that is not a neighbour set's: "
            "pick a new or empty folder"
        )
    if manifest is not None and not restart:
        _check_resumable(out, manifest, settings)
        if manifest["complete"]:
            log.info("neighbour set %s is already complete", out)
            return manifest
    elif manifest is None and out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ValueError(
            f"OUT {str(out)!r} is not empty and holds no neighbour set: pick a new or empty folder"
        )
    if manifest is None or restart:
        inputs.require_text(paths, text_dir)
        manifest = _start(db, out, settings, listing)
    for name, fn in (("chunk", _stage_chunk), ("embed", _stage_embed), ("neighbours", _stage_nb)):
        if name in manifest["stages_done"]:
            continue
        t0 = time.perf_counter()
        fn(db, out, manifest, paths=paths)
        manifest["stages_done"].append(name)
        write_manifest(out, manifest)
        log.info("query stage %s done in %.1fs", name, time.perf_counter() - t0)
    manifest["complete"] = True
    write_manifest(out, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return manifest


def _start(db: RetrievalDatabase, out: Path, settings: dict, listing: list[dict]) -> dict:
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    (out / PROGRESS_DIR).mkdir(parents=True)
    m = db.manifest
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "stages_done": [],
        **settings,
        "chunk_size": m["chunk_size"],
        "seq_len": m["seq_len"],
        "tokenizer": dict(m["tokenizer"], file=TOKENIZER_FILE),
        "encoder": dict(m["encoder"]),
        "neighbours": m["neighbours"],
        "extra_neighbours": m["extra_neighbours"],
        "num_neighbour_columns": m["num_neighbour_columns"],
        "report": {},
    }
    write_manifest(out, manifest)
    inputs.write_inputs(out, listing)
    with atomic_path(out / TOKENIZER_FILE) as tmp:
        shutil.copyfile(db.path / m["tokenizer"]["file"], tmp)
    return manifest


def _check_resumable(out: Path, manifest: dict, settings: dict) -> None:
    diff = [k for k in settings if manifest.get(k) != settings[k]]
    if diff:
        what = {
            "database": "the database changed (rebuilt, grown or another one)",
            "inputs": "TRAIN_DIR's files changed",
            "search": "other search parameters (--nprobe / --ef-search)",
        }
        reasons = "; ".join(
            what.get(k, f"{k}: {manifest.get(k)!r} vs {settings[k]!r}") for k in diff
        )
        raise IncompatibleError(
            f"OUT {str(out)!r} holds neighbours computed otherwise ({reasons}): rerun with "
            "--restart (restart=True) to compute them afresh, or use a new OUT"
        )


def _stage_chunk(db: RetrievalDatabase, out: Path, manifest: dict, *, paths) -> None:
    m, seq_len = manifest["chunk_size"], manifest["seq_len"]
    rep = chunking.chunk_corpus(
        paths,
        Path(manifest["text_dir"]),
        out,
        db.tokenizer,
        m,
        seq_len,
        out / PROGRESS_DIR / "chunk.json",
    )
    n, l = rep.chunks, seq_len // m
    manifest.update(
        num_chunks=n, num_documents=rep.documents, num_sequences=max(0, (n - l) // l + 1)
    )
    manifest["arrays"] = {
        "chunks": array_info(
            chunking.CHUNKS_FILE, chunking.token_dtype(db.tokenizer.vocab_size), (n, m + 1)
        ),
        "doc_ids": array_info(chunking.DOC_IDS_FILE, np.int32, (n,)),
        "seq_starts": array_info(chunking.SEQ_STARTS_FILE, np.int64, (manifest["num_sequences"],)),
        "matched_docs": array_info(MATCHED_FILE, np.int32, (rep.documents,)),
    }
    manifest["report"]["chunk"] = asdict(rep)
    # each training document's twin in the database (same content), -1 if none
    ours = document_hashes(
        open_array(out, manifest["arrays"]["chunks"]), chunking.read_documents(out)
    )
    theirs = {h: i for i, h in enumerate(document_hashes(db.chunks, db.documents))}
    matched = np.array([theirs.get(h, -1) for h in ours], dtype=np.int32)
    with atomic_path(out / MATCHED_FILE) as tmp:
        matched.tofile(tmp)
    manifest["report"]["documents_in_database"] = int((matched >= 0).sum())


def _stage_embed(db: RetrievalDatabase, out: Path, manifest: dict, **_) -> None:
    n, d = manifest["num_chunks"], db.embeddings.shape[1]
    manifest["arrays"]["embeddings"] = array_info(EMBEDDINGS_FILE, np.float32, (n, d))
    _preallocate(out / EMBEDDINGS_FILE, n * d * 4)
    blocks = _Blocks(out, "embed", n, manifest["block_size"])
    job = dict(
        db_dir=str(out),
        manifest=manifest,
        batch_size=db.manifest["config"]["batch_size"],
        blocks=list(range(blocks.count)),
        block_size=manifest["block_size"],
        threads=0,
        worker=0,
    )
    embed_blocks(job, encoder=db.encoder)  # the build's recipe, weights checked by hash


def _stage_nb(db: RetrievalDatabase, out: Path, manifest: dict, **_) -> None:
    n, k = manifest["num_chunks"], manifest["num_neighbour_columns"]
    arrays = manifest["arrays"]
    arrays.update(
        neighbours=array_info(NEIGHBOURS_FILE, np.int32, (n, k)),
        neighbour_dists=array_info(NEIGHBOUR_DISTS_FILE, np.float32, (n, k)),
    )
    emb = RowFile(out, arrays["embeddings"])  # (N, d) queries, read in blocks
    doc_ids = np.array(open_array(out, arrays["doc_ids"]))  # (N,)
    matched = np.array(open_array(out, arrays["matched_docs"]), dtype=np.int64)  # per document
    twin = matched[doc_ids]  # (N,) the query chunk's document in DB, -1 if none
    db_docs = np.asarray(db.doc_ids)  # (M,)
    _preallocate(out / NEIGHBOURS_FILE, n * k * 4)
    _preallocate(out / NEIGHBOUR_DISTS_FILE, n * k * 4)
    ids_out = RowFile(out, arrays["neighbours"], writable=True)
    d_out = RowFile(out, arrays["neighbour_dists"], writable=True)
    blocks = _Blocks(out, "neighbours", n, manifest["block_size"])
    for i in tqdm(blocks.todo(), desc="neighbours", unit="block"):
        s, e = blocks.rows(i)
        x = np.ascontiguousarray(emb[s:e], dtype=np.float32)
        own = twin[s:e]

        def same_document(rows, ids, own=own):
            return db_docs[ids] == own[rows, None]  # never true for an unmatched document

        ids, dists = search_excluding(db.searcher, x, k, same_document)
        ids_out.write(s, ids)
        d_out.write(s, dists)
        blocks.mark(i)
    for f in (ids_out, d_out, emb):
        f.close()


# ---- the training view --------------------------------------------------------------------
class NeighbourSet:
    """A training corpus's chunks with neighbours in a database (module docstring): what
    ``RETRODataset`` and ``train`` read where they would read a ``RetrievalDatabase``."""

    def __init__(self, db: RetrievalDatabase, path: Path, manifest: dict):
        self.db, self.neighbours_path, self.manifest = db, path, manifest
        arrays = manifest["arrays"]
        self.path = db.path  # the database; ``neighbours_path`` the set
        self.tokenizer = db.tokenizer
        self.chunk_size = int(manifest["chunk_size"])
        self.chunks = open_array(path, arrays["chunks"])  # (N, m+1)
        self.seq_starts = open_array(path, arrays["seq_starts"])  # (S,)
        self.neighbours = open_array(path, arrays["neighbours"])  # (N, K) ids into DB
        self.neighbour_dists = open_array(path, arrays["neighbour_dists"])  # (N, K)
        matched = np.array(open_array(path, arrays["matched_docs"]), dtype=np.int64)
        key = np.where(
            matched >= 0, matched, db.manifest["num_documents"] + np.arange(len(matched))
        )
        self.doc_ids = key[np.asarray(open_array(path, arrays["doc_ids"]))]  # (N,) shared keys
        self.candidate_doc_ids = db.doc_ids  # (M,) a DB document's key is its id

    @classmethod
    def open(
        cls, db: str | os.PathLike | RetrievalDatabase, path: str | os.PathLike
    ) -> NeighbourSet:
        """Open a complete neighbour set of ``db``; ``IncompatibleError`` if it was computed
        from another state of the database, ``FileNotFoundError`` if ``path`` is none."""
        if not isinstance(db, RetrievalDatabase):
            db = RetrievalDatabase.open(db)
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None or manifest.get("format") != FORMAT:
            raise FileNotFoundError(
                f"{str(path)!r} is not a neighbour set (no {MANIFEST} of one): make it with "
                "`retrolm db query DB --text TRAIN_DIR --out NEIGHBOURS_DIR`"
            )
        redo = f"rerun `retrolm db query {db.path} --text {manifest.get('text_dir')} --out {path}"
        if not manifest.get("complete"):
            raise IncompatibleError(
                f"neighbour set {str(path)!r} is incomplete: {redo}` to finish it"
            )
        saved, now = manifest["database"], database_identity(db)
        diff = [k for k in now if k != "path" and saved.get(k) != now[k]]
        if diff:
            raise IncompatibleError(
                f"neighbour set {str(path)!r} was computed from another state of database "
                f"{str(db.path)!r} ({', '.join(f'{k} {saved.get(k)} vs {now[k]}' for k in diff)}): "
                f"{redo} --restart`"
            )
        return cls(db, path, manifest)

    @property
    def num_chunks(self) -> int:
        return int(self.manifest["num_chunks"])

    @property
    def num_neighbours(self) -> int:
        return int(self.manifest["neighbours"])

    def retrieved_tokens(self, neighbour_ids):
        """DB chunks and their continuations (``RetrievalDatabase.retrieved_tokens``)."""
        return self.db.retrieved_tokens(neighbour_ids)

    def __len__(self) -> int:
        return self.num_chunks

    def __repr__(self) -> str:
        return (
            f"NeighbourSet({str(self.neighbours_path)!r}, chunks={self.num_chunks}, "
            f"database={self.db!r})"
        )
