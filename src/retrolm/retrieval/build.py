"""Building a retrieval database: tokenizer → chunk → embed → index → neighbours.

Every stage is resumable. Chunking records its position after each block of files;
embedding and neighbour search write fixed-size row blocks into preallocated files
and mark each finished block with a file under ``.progress/``; the index is written
atomically once built. A rerun after a kill (even SIGKILL) skips what is finished,
redoes the unfinished block, and ends with files byte-identical to an uninterrupted
build. ``manifest.json`` is rewritten atomically after every stage and says
``"complete": true`` only after the last one, so an unfinished database never opens.

A rerun resumes only the same build: the same settings, the same encoder weights and the
same input files (``inputs.jsonl``: path, size, mtime); ``restart=True`` (``--restart``)
discards an earlier build instead. A build refuses a folder without text before it writes
anything, and a build that finished no stage is started afresh on the rerun.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.config import require_positive_ints
from retrolm.errors import DatabaseError, IncompatibleError
from retrolm.locking import LOCK_FILE, exclusive_lock
from retrolm.retrieval import chunking, inputs
from retrolm.retrieval.encoder import (
    DTYPES,
    POOLINGS,
    FrozenEncoder,
    check_encoder_identity,
    embed_block,
    load_build_encoder,
)
from retrolm.retrieval.index import INDEX_KINDS, choose_index, parse_size
from retrolm.retrieval.neighbours import NeighbourSearch
from retrolm.retrieval.store import (
    EMBEDDINGS_FILE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
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
from retrolm.retrieval.tokenizer import MIN_VOCAB, LMTokenizer
from retrolm.utils import atomic_path

log = logging.getLogger(__name__)

STAGES = ("tokenizer", "chunk", "embed", "index", "neighbours")
ENGINES = ("local", "ray")
RUN_ONLY = ("workers", "engine", "address", "device")  # fields that never change the files


@dataclass
class BuildConfig:
    """How to build a retrieval database (each field is also a ``retrolm db build`` option)."""

    glob: str = "**/*.txt"
    """Which files under TEXT_DIR are documents (pathlib glob, relative to TEXT_DIR)."""
    chunk_size: int = 64
    """m: LM tokens per chunk (the paper uses 64)."""
    seq_len: int = 2048
    """n: training sequence length in tokens; a multiple of chunk_size (sets seq_starts)."""
    encoder: str | None = None
    """Frozen encoder folder (BERT family); None = the bundled all-MiniLM-L6-v2."""
    pooling: str = "mean"
    """Encoder pooling: mean over the attention mask, or cls; L2-normalised either way."""
    encoder_max_length: int = 128
    """Encoder WordPieces per chunk text, [CLS]/[SEP] included; longer texts are truncated."""
    embed_dtype: str = "auto"
    """Encoder weights dtype: auto (time fp32 vs bf16, keep the faster), fp32 or bf16."""
    batch_size: int = 64
    """Chunk texts per encoder forward pass."""
    neighbours: int = 2
    """k: neighbours the model retrieves per chunk."""
    extra_neighbours: int = 6
    """Spare neighbour columns stored so the dataset can filter sequence documents further."""
    tokenizer: str | None = None
    """A tokenizer.json for the LM (with <pad>=0, <eos>=1, or a pretrained model's); None =
    train one on the corpus. ``retrolm db build --tokenizer BASE`` also takes a model folder
    (Hugging Face, or a retrolm run) and uses its tokenizer, to RETRO-fit that model."""
    vocab_size: int = 16384
    """Vocabulary size when training the LM tokenizer."""
    index: str = "auto"
    """faiss index kind: auto, flat, ivf, hnsw, ivfpq or autofaiss (optional extra)."""
    memory_budget: str = "4G"
    """Memory the index may use (e.g. 512M, 4G); auto picks exact search when it fits."""
    nprobe: int = 0
    """ivf/ivfpq: inverted lists each neighbour search probes (and queries by default);
    0 = nlist/8. Fewer is faster at a lower recall (neighbour time ~ nprobe x N²/nlist):
    see benchmarks/history/scale.md, and check a build with `retrolm db check --nprobe`."""
    workers: int = 1
    """Processes for the embed stage (each takes a range of blocks); with --engine ray, the
    actors of each Ray stage."""
    block_size: int = 4096
    """Chunks per resumable block in the embed and neighbour stages."""
    engine: str = "local"
    """Where embed, index-add and neighbours run: local (this machine's processes) or ray
    (Ray Data actors on a Ray cluster; optional extra retrolm[ray]). Same files either way."""
    address: str | None = None
    """With --engine ray: the Ray cluster to join (host:port, or auto); None = start Ray here."""
    device: str = "cpu"
    """Where the encoder runs: cpu, or cuda (with --engine ray: one GPU per encoder actor)."""

    def __post_init__(self):
        require_positive_ints(
            self,
            (
                "chunk_size",
                "seq_len",
                "encoder_max_length",
                "batch_size",
                "neighbours",
                "workers",
                "block_size",
            ),
        )
        if self.extra_neighbours < 0:
            raise ValueError(f"extra_neighbours={self.extra_neighbours} must be >= 0")
        if self.nprobe < 0 or (self.nprobe and self.index in ("flat", "hnsw", "autofaiss")):
            raise ValueError(
                f"nprobe={self.nprobe} with index={self.index!r}: nprobe is a count of lists "
                "(> 0) for ivf, ivfpq or auto indexes; drop it or pick one of those"
            )
        if self.seq_len % self.chunk_size:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of chunk_size={self.chunk_size}: "
                f"use e.g. --seq-len {max(1, self.seq_len // self.chunk_size) * self.chunk_size}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.embed_dtype not in DTYPES:
            raise ValueError(f"embed_dtype={self.embed_dtype!r} is not one of {DTYPES}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index={self.index!r} is not one of {INDEX_KINDS}")
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: use at least {MIN_VOCAB}")
        parse_size(self.memory_budget)
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} is not one of {ENGINES}")
        if self.address is not None and self.engine != "ray":
            raise ValueError(f"address={self.address!r} is for --engine ray: add it or drop it")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r} is not cpu or cuda (or cuda:N)")

    @property
    def num_columns(self) -> int:
        """K: stored neighbour columns."""
        return self.neighbours + self.extra_neighbours

    def output_settings(self) -> dict:
        """The settings the files depend on (all but where they run); a resume must match."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUN_ONLY}


# ---- the build ----------------------------------------------------------------------------
def build_database(
    text_dir: str | os.PathLike,
    db_dir: str | os.PathLike,
    config: BuildConfig | None = None,
    *,
    restart: bool = False,
) -> dict:
    """Build (or resume) the database of ``text_dir`` in ``db_dir``; returns the manifest.

    A rerun resumes only the same build: same settings and the same input files (path,
    size, mtime), else ``IncompatibleError``. ``restart``: discard what ``db_dir`` holds of
    an earlier build (a database's files only) and build from scratch.

    One builder per folder: another process building into ``db_dir`` raises
    ``LockedError`` at once (readers need no lock: a database opens only when complete).

    ``config.engine == "ray"`` runs the embed, index-add and neighbour stages on Ray
    (``ray_engine``); Ray is started (or joined, ``config.address``) before anything is
    written, and the files are the local engine's, byte for byte.
    """
    config = config or BuildConfig()
    with exclusive_lock(db_dir, "database"):
        if config.engine == "local":
            return _build_database(text_dir, db_dir, config, restart)
        from retrolm.retrieval.ray_engine import ray_session

        with ray_session(config.address):
            return _build_database(text_dir, db_dir, config, restart)


def _build_database(
    text_dir: str | os.PathLike,
    db_dir: str | os.PathLike,
    config: BuildConfig | None,
    restart: bool,
) -> dict:
    config = config or BuildConfig()
    text_dir, db_dir = Path(text_dir).resolve(), Path(db_dir)
    paths = chunking.list_documents(text_dir, config.glob)  # fails early on a bad folder/glob
    if config.tokenizer and not Path(config.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file {config.tokenizer!r} does not exist")
    listing = inputs.list_inputs(paths, text_dir)
    manifest = read_manifest(db_dir)
    if manifest is not None and (restart or not manifest.get("stages_done")):
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"DB_DIR {str(db_dir)!r} holds a manifest.json that is not a retrolm "
                "database's: pick a new or empty folder"
            )
        # nothing of a build that finished no stage is reusable, whatever its settings
        why = "restart requested" if restart else "the build there finished no stage"
        log.info("%s: discarding the build in %s", why, db_dir)
        inputs.require_text(paths, text_dir)
        manifest = _start_build(db_dir, config, text_dir, listing, discard=True)
    elif manifest is not None:
        _check_resumable(db_dir, manifest, config, text_dir, listing)
        if manifest["complete"]:
            log.info("database %s is already complete", db_dir)
            return manifest
        log.info("resuming the build in %s after stages %s", db_dir, manifest["stages_done"])
    else:
        if db_dir.exists() and not all(_left_before_a_manifest(p) for p in db_dir.iterdir()):
            raise ValueError(
                f"DB_DIR {str(db_dir)!r} is not empty and holds no retrieval database: "
                "pick a new or empty folder"
            )
        inputs.require_text(paths, text_dir)  # before anything is written
        manifest = _start_build(db_dir, config, text_dir, listing, discard=False)

    if "embed" not in manifest["stages_done"]:  # fail before the long stages on a bad encoder
        encoder = FrozenEncoder(
            config.encoder,
            pooling=config.pooling,
            dtype=config.embed_dtype,
            max_length=config.encoder_max_length,
            device=config.device if config.engine == "local" else "cpu",  # Ray: on its actors
        )
    else:
        encoder = None
    stages = {
        "tokenizer": _stage_tokenizer,
        "chunk": _stage_chunk,
        "embed": _stage_embed,
        "index": _stage_index,
        "neighbours": _stage_neighbours,
    }
    for name, fn in stages.items():
        if name in manifest["stages_done"]:
            continue
        t0 = time.perf_counter()
        fn(db_dir, manifest, config, paths=paths, encoder=encoder)
        if name == "embed":
            encoder = None  # the index stages do not need the model's memory
        manifest["stages_done"].append(name)
        write_manifest(db_dir, manifest)
        log.info(
            "stage %s done in %.1fs (peak RSS %.0f MB)",
            name,
            time.perf_counter() - t0,
            _peak_rss_mb(),
        )
    manifest["complete"] = True
    write_manifest(db_dir, manifest)
    shutil.rmtree(db_dir / PROGRESS_DIR, ignore_errors=True)
    return manifest


# every file a build writes besides the manifest and the input list (``--restart`` removes
# only these, so a user's own files in DB_DIR are never touched)
BUILD_FILES = (
    TOKENIZER_FILE,
    chunking.CHUNKS_FILE,
    chunking.DOC_IDS_FILE,
    chunking.DOCS_FILE,
    chunking.SEQ_STARTS_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    NEIGHBOURS_FILE,
    NEIGHBOUR_DISTS_FILE,
)


def _left_before_a_manifest(path: Path) -> bool:
    """What a build killed before its first manifest landed leaves: the lock file and the
    temporary of the manifest's atomic write (``.manifest.json.<random>.tmp``)."""
    name = path.name
    return name == LOCK_FILE or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp"))


def _start_build(
    db_dir: Path, config: BuildConfig, text_dir: Path, listing: list[dict], discard: bool
) -> dict:
    """Write the manifest of a build that has done nothing yet.

    ``discard``: an earlier build's files are there. Its progress markers go first, then
    the fresh manifest replaces the old one, then its data files go. A kill at any point
    leaves a state a rerun handles: the old manifest without markers (its unfinished stage
    restarts from scratch), or the fresh manifest beside stale files, which every stage
    truncates or overwrites before use.
    """
    if discard:
        shutil.rmtree(db_dir / PROGRESS_DIR, ignore_errors=True)
    db_dir.mkdir(parents=True, exist_ok=True)
    for tmp in db_dir.glob(f".{MANIFEST}.*.tmp"):  # a kill inside an earlier manifest write
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "stages_done": [],
        "config": config.output_settings(),
        "text_dir": str(text_dir),
        "inputs": inputs.summary(listing),
        "report": {},
    }
    write_manifest(db_dir, manifest)
    # after the manifest: a kill between the two leaves a build that finished no stage, which
    # the rerun starts afresh (written first, a lone inputs.jsonl made DB_DIR "not empty")
    inputs.write_inputs(db_dir, listing)
    if discard:
        for name in BUILD_FILES:
            (db_dir / name).unlink(missing_ok=True)
            for tmp in db_dir.glob(f".{name}.*.tmp"):  # left by a kill inside atomic_path
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return manifest


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # not on this platform
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_resumable(
    db_dir: Path, manifest: dict, config: BuildConfig, text_dir: Path, listing: list[dict]
) -> None:
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise IncompatibleError(
            f"{str(db_dir)!r} holds format {manifest.get('format')} "
            f"v{manifest.get('format_version')}, not {FORMAT} v{FORMAT_VERSION}: "
            "build into a new DB_DIR"
        )
    want = config.output_settings()
    default = {f.name: f.default for f in fields(BuildConfig)}  # settings added since
    have = {k: manifest["config"].get(k, default[k]) for k in want}
    diff = [f"{k}: {have[k]!r} vs {want[k]!r}" for k in want if have[k] != want[k]]
    if manifest["text_dir"] != str(text_dir):
        diff.append(f"text_dir: {manifest['text_dir']!r} vs {str(text_dir)!r}")
    if diff:
        raise IncompatibleError(
            f"DB_DIR {str(db_dir)!r} holds a build with other settings ({'; '.join(diff)}): "
            "rerun with the same settings to resume, or use a new DB_DIR"
        )
    recorded = manifest.get("inputs")
    if recorded is None:  # built before input files were recorded: nothing to compare
        log.warning("%s records no input files; cannot tell whether TEXT_DIR changed", db_dir)
    elif inputs.summary(listing)["sha256"] != recorded["sha256"]:
        changes = inputs.describe_changes(inputs.read_inputs(db_dir, recorded), listing)
        state = "was built" if manifest.get("complete") else "was started"
        raise IncompatibleError(
            f"TEXT_DIR {str(text_dir)!r} changed since DB_DIR {str(db_dir)!r} {state} "
            f"({changes}): rerun with --restart (restart=True) to rebuild from scratch, or "
            "restore the files"
        )


def _stage_tokenizer(db_dir, manifest, config, *, paths, **_):
    if config.tokenizer:
        tok = LMTokenizer.from_file(config.tokenizer)
    else:
        log.info("training a %d-token byte-level BPE on %d files", config.vocab_size, len(paths))
        tok = LMTokenizer.train(chunking.iter_texts(paths), config.vocab_size)
    with atomic_path(db_dir / TOKENIZER_FILE) as tmp:
        tok.save(tmp)
    manifest["tokenizer"] = {
        "file": TOKENIZER_FILE,
        "vocab_size": tok.vocab_size,
        "hash": tok.hash,
        "pad_id": tok.pad_id,
        "eos_id": tok.eos_id,
    }


def _stage_chunk(db_dir, manifest, config, *, paths, **_):
    tok = LMTokenizer.from_file(db_dir / TOKENIZER_FILE)
    m = config.chunk_size
    rep = chunking.chunk_corpus(
        paths,
        Path(manifest["text_dir"]),
        db_dir,
        tok,
        m,
        config.seq_len,
        db_dir / PROGRESS_DIR / "chunk.json",
    )
    n = rep.chunks
    n_seq = max(0, (n - config.seq_len // m) // (config.seq_len // m) + 1)
    manifest.update(
        chunk_size=m,
        seq_len=config.seq_len,
        num_chunks=n,
        num_documents=rep.documents,
        num_sequences=n_seq,
    )
    manifest.setdefault("arrays", {}).update(
        chunks=array_info(chunking.CHUNKS_FILE, chunking.token_dtype(tok.vocab_size), (n, m + 1)),
        doc_ids=array_info(chunking.DOC_IDS_FILE, np.int32, (n,)),
        seq_starts=array_info(chunking.SEQ_STARTS_FILE, np.int64, (n_seq,)),
    )
    manifest["documents_file"] = chunking.DOCS_FILE
    manifest["report"]["chunk"] = asdict(rep)
    log.info(
        "chunked %d documents into %d chunks (%d skipped, %d with invalid UTF-8 replaced)",
        rep.documents,
        n,
        rep.skipped_empty + rep.skipped_binary,
        rep.invalid_utf8_replaced,
    )


def _stage_embed(db_dir, manifest, config, *, encoder: FrozenEncoder, **_):
    n, d = manifest["num_chunks"], encoder.dim
    chunks = open_array(db_dir, manifest["arrays"]["chunks"])
    tok = LMTokenizer.from_file(db_dir / TOKENIZER_FILE)
    state = manifest.setdefault("encoder", {})
    if "dtype" not in state:  # resolve 'auto' once; a resumed build replays the choice
        sample = tok.decode_batch(chunks[: config.batch_size, :-1])
        dtype = encoder.resolve_dtype(sample, config.batch_size)
        state.update(
            encoder.identity,
            path=str(encoder.path.resolve()),
            pooling=config.pooling,
            max_length=config.encoder_max_length,
            dtype=dtype,
        )
        manifest["arrays"]["embeddings"] = array_info(EMBEDDINGS_FILE, np.float32, (n, d))
        write_manifest(db_dir, manifest)
    else:  # resuming: the blocks embedded so far came from the recorded weights
        check_encoder_identity(
            encoder,
            state,
            db_dir,
            "restore the encoder the build started with, or rerun with --restart to rebuild "
            "with this one",
        )
    _preallocate(db_dir / EMBEDDINGS_FILE, n * d * 4)
    blocks = _Blocks(db_dir, "embed", n, config.block_size)
    t0, todo = time.perf_counter(), len(blocks.todo())
    if config.engine == "ray":
        from retrolm.retrieval.ray_engine import embed_on_ray

        embed_on_ray(db_dir, manifest, config, blocks)
    else:
        _embed_locally(db_dir, manifest, config, blocks, encoder)
    if blocks.todo():
        raise DatabaseError(
            f"embed blocks {blocks.todo()[:5]} of {str(db_dir)!r} unfinished: rerun the same "
            "command to resume"
        )
    dt = time.perf_counter() - t0
    if todo:
        log.info(
            "embedded %d blocks in %.1fs (%.0f chunks/s, %s)",
            todo,
            dt,
            min(n, todo * config.block_size) / max(dt, 1e-9),
            state["dtype"],
        )


def _embed_locally(db_dir, manifest, config, blocks: _Blocks, encoder: FrozenEncoder) -> None:
    """The embed stage in this process (``workers=1``) or in ``workers`` spawned processes."""
    jobs = [
        dict(
            db_dir=str(db_dir),
            manifest=manifest,
            batch_size=config.batch_size,
            blocks=list(
                range(w * blocks.count // config.workers, (w + 1) * blocks.count // config.workers)
            ),
            block_size=config.block_size,
            threads=0,
            worker=w,
            device=config.device,
        )
        for w in range(config.workers)
    ]
    if config.workers == 1:
        encoder.set_dtype(manifest["encoder"]["dtype"])
        embed_blocks(jobs[0], encoder=encoder)
        return
    import torch

    threads = max(1, torch.get_num_threads() // config.workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=embed_blocks, args=(dict(j, threads=threads),)) for j in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise DatabaseError(
            f"embed workers failed in {str(db_dir)!r} (exit codes {bad}; their log is "
            "above): rerun the same command to resume"
        )


def embed_blocks(job: dict, encoder: FrozenEncoder | None = None) -> None:
    """Embed the unfinished blocks in ``job['blocks']`` (runs in a worker process too)."""
    db_dir, manifest = Path(job["db_dir"]), job["manifest"]
    state = manifest["encoder"]
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    if encoder is None:
        encoder = load_build_encoder(state, job.get("device", "cpu"))
    tok = LMTokenizer.from_file(db_dir / manifest["tokenizer"]["file"])
    chunks = open_array(db_dir, manifest["arrays"]["chunks"])
    emb = RowFile(db_dir, manifest["arrays"]["embeddings"], writable=True)  # (N, d)
    blocks = _Blocks(db_dir, "embed", len(chunks), job["block_size"])
    todo = blocks.todo(job["blocks"])
    for i in tqdm(
        todo, desc=f"embed (worker {job['worker']})", unit="block", position=job["worker"]
    ):
        embed_block(i, blocks, tok, chunks, emb, encoder, job["batch_size"])
    emb.close()


def _stage_index(db_dir, manifest, config, **_):
    from retrolm.retrieval.index import build_index, save_index

    emb = RowFile(db_dir, manifest["arrays"]["embeddings"])  # (N, d), read in blocks
    budget = parse_size(config.memory_budget)
    spec = choose_index(len(emb), emb.shape[1], config.index, budget, config.nprobe)
    log.info("index: %s (%s) over %d vectors", spec.kind, spec.factory, len(emb))
    if config.engine == "ray" and spec.kind != "autofaiss":
        from retrolm.retrieval.ray_engine import index_on_ray

        index = index_on_ray(db_dir, manifest, config, spec)
    else:
        index = build_index(spec, emb, memory_budget=budget)
    with atomic_path(db_dir / INDEX_FILE) as tmp:
        save_index(index, tmp)
    manifest["index"] = dict(spec.to_json(), file=INDEX_FILE, trained_on=len(emb))


def _stage_neighbours(db_dir, manifest, config, **_):
    n, k = manifest["num_chunks"], config.num_columns
    manifest["arrays"].update(
        neighbours=array_info(NEIGHBOURS_FILE, np.int32, (n, k)),
        neighbour_dists=array_info(NEIGHBOUR_DISTS_FILE, np.float32, (n, k)),
    )
    manifest.update(
        neighbours=config.neighbours,
        extra_neighbours=config.extra_neighbours,
        num_neighbour_columns=k,
    )
    _preallocate(db_dir / NEIGHBOURS_FILE, n * k * 4)
    _preallocate(db_dir / NEIGHBOUR_DISTS_FILE, n * k * 4)
    blocks = _Blocks(db_dir, "neighbours", n, config.block_size)
    if config.engine == "ray":
        from retrolm.retrieval.ray_engine import neighbours_on_ray

        neighbours_on_ray(db_dir, manifest, config, blocks)
    else:
        searcher = NeighbourSearch(db_dir, manifest)
        for i in tqdm(blocks.todo(), desc="neighbours", unit="block"):
            searcher.block(i, blocks)
        searcher.close()
    if blocks.todo():
        raise DatabaseError(
            f"neighbour blocks {blocks.todo()[:5]} of {str(db_dir)!r} unfinished: rerun the "
            "same command to resume"
        )
    table = RowFile(db_dir, manifest["arrays"]["neighbours"])  # count over all blocks
    missing = sum(
        int((table[s : s + 65536][:, : config.neighbours] < 0).sum()) for s in range(0, n, 65536)
    )
    table.close()
    manifest["report"]["neighbours"] = {"missing_in_first_k": missing}
