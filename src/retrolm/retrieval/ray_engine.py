"""Building a database on Ray (``retrolm db build --engine ray``; optional extra ``retrolm[ray]``).

The embed, index-add and neighbour stages run as Ray Data ``map_batches`` over the build's
row blocks, each stage's work held by actors (class UDFs with ``concurrency`` = workers):

- embed: each actor loads the encoder once (one GPU per actor with ``device="cuda"``),
  embeds whole blocks into the preallocated ``embeddings.bin`` and marks each block done
  under ``.progress/embed/``, exactly as a local worker does;
- index: the driver trains the index (evenly spaced rows, as locally); actors encode the
  add blocks into the index's codes (flat, ivf, ivfpq without OPQ: ``sa_encode``) or just
  read them (hnsw, OPQ), and the driver adds them in block order, so the index file is the
  local build's byte for byte;
- neighbours: each actor opens the index once and searches whole blocks, writing rows and
  done-markers under ``.progress/neighbours/``.

Blocks are written where the local engine writes them and marked by the same files, so a
killed driver resumes (with either engine) and the files equal a local build's. Ray does
the scheduling: on a cluster, ``address`` joins it; otherwise Ray starts on this machine.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from retrolm.errors import DatabaseError
from retrolm.retrieval.index import IndexSpec, train_index
from retrolm.retrieval.store import RowFile, _Blocks

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'retrolm[ray]'"
ADD_BLOCK = 65536  # rows per index-add block: build_index's, so an hnsw graph grows alike


def require_ray():
    """The ``ray`` module with Ray Data, or a one-line ``ValueError`` naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra brings it; plain `ray` lacks pandas/pyarrow)
    except ImportError as e:
        raise ValueError(
            f"--engine ray needs Ray Data, which is not installed ({e}): {INSTALL_HINT}"
        ) from None
    return ray


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Ray for the length of a build: the session already running in this process if any,
    else the cluster at ``address`` (host:port or ``auto``), else a local one (no
    dashboard, no usage reports), shut down at the end."""
    ray = require_ray()
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        log.info("building on the Ray session this process already runs")
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report to the network
    kwargs = {} if address is not None else {"include_dashboard": False}
    try:
        ray.init(address=address, log_to_driver=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        why = " ".join(str(e).split())[:300]
        raise DatabaseError(
            f"cannot start or join Ray at --address {address!r} ({why}): start a cluster "
            "with `ray start --head` and pass its address, or drop --address to run Ray here"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in a second, naming the address, when no Ray head listens there (``ray.init``
    would retry for a minute and then print a page)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r} is not host:port (e.g. 10.0.0.5:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise DatabaseError(
            f"no Ray cluster answers at --address {address!r} ({e.strerror or e}): start one "
            "with `ray start --head` there, or drop --address to run Ray on this machine"
        ) from None


def _resources(config, gpu: bool = False) -> dict:
    if gpu and config.device != "cpu":
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def _run_blocks(todo: list[int], actor: type, kwargs: dict, config, stage: str, gpu=False):
    """Map ``actor`` over ``todo`` blocks (one block per call, ``config.workers`` actors)
    and yield each result row as it comes (in no particular order)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # our log says it
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a dozen lines per stage
    ds = ray.data.from_items([{"block": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        **_resources(config, gpu),
    )
    try:
        for done, row in enumerate(ds.iter_rows(), 1):
            if done == len(todo) or done % max(1, len(todo) // 10) == 0:
                log.info("%s on Ray: %d of %d blocks done", stage, done, len(todo))
            yield row
    except Exception as e:  # Ray wraps an actor's error (with its traceback) in its own
        cause = _user_error(e)
        if cause is None:
            raise
        raise cause from None


def _user_error(e: BaseException) -> BaseException | None:
    """The first one-line error (ours, a bad value, the disk) an actor raised under Ray's
    wrappers, or None."""
    from retrolm.errors import RetrolmError

    seen = 0
    while e is not None and seen < 8:
        if type(e).__module__.split(".")[0] != "ray" and isinstance(
            e, (RetrolmError, ValueError, OSError)
        ):
            return e
        e, seen = getattr(e, "cause", None) or e.__cause__, seen + 1
    return None


# ---- embed --------------------------------------------------------------------------------
class _EmbedActor:
    """Holds the build's encoder; embeds the blocks it is given into ``embeddings.bin``."""

    def __init__(self, db_dir: str, manifest: dict, block_size: int, batch_size: int, device):
        from retrolm.retrieval.encoder import load_build_encoder
        from retrolm.retrieval.store import open_array
        from retrolm.retrieval.tokenizer import LMTokenizer

        db = Path(db_dir)
        self.encoder = load_build_encoder(manifest["encoder"], device)
        self.tok = LMTokenizer.from_file(db / manifest["tokenizer"]["file"])
        self.chunks = open_array(db, manifest["arrays"]["chunks"])
        self.emb = RowFile(db, manifest["arrays"]["embeddings"], writable=True)
        self.blocks = _Blocks(db, "embed", len(self.chunks), block_size)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        from retrolm.retrieval.encoder import embed_block

        for i in batch["block"]:
            embed_block(
                int(i), self.blocks, self.tok, self.chunks, self.emb, self.encoder, self.batch_size
            )
        return {"block": batch["block"]}


def embed_on_ray(db_dir: Path, manifest: dict, config, blocks: _Blocks) -> None:
    """The embed stage's unfinished blocks on Ray actors (the encoder loaded once per actor)."""
    todo = blocks.todo()
    if not todo:
        return
    if config.device != "cpu":  # Ray would wait for ever for a GPU that never comes
        import ray

        if ray.cluster_resources().get("GPU", 0) < 1:
            raise ValueError(
                f"device={config.device!r}, but the Ray cluster has no GPU: use --device cpu, "
                "or join a cluster with GPUs (--address)"
            )
    kwargs = dict(
        db_dir=str(db_dir),
        manifest=manifest,
        block_size=config.block_size,
        batch_size=config.batch_size,
        device=config.device,
    )
    for _ in _run_blocks(todo, _EmbedActor, kwargs, config, "embed", gpu=True):
        pass


# ---- index add ----------------------------------------------------------------------------
def _encodes(spec: IndexSpec) -> bool:
    """Whether actors can turn rows into the index's stored codes (``sa_encode``; the driver
    then appends them with ``add_sa_codes``, the same bytes as ``add``). OPQ's transform and
    the hnsw graph have no such codec: actors only read those rows."""
    return spec.kind in ("flat", "ivf") or (spec.kind == "ivfpq" and "OPQ" not in spec.factory)


class _IndexAddActor:
    """Reads add blocks of the keys and, where the index has a codec, encodes them."""

    def __init__(self, db_dir: str, info: dict, trained: bytes | None, rows: int):
        import faiss

        self.emb, self.rows = RowFile(Path(db_dir), info), rows
        self.index = None if trained is None else faiss.deserialize_index(
            np.frombuffer(trained, dtype=np.uint8)
        )  # fmt: skip

    def __call__(self, batch: dict) -> dict:
        out = []
        for j in batch["block"]:
            s = int(j) * self.rows
            x = np.ascontiguousarray(self.emb[s : s + self.rows], dtype=np.float32)  # (B, d)
            out.append((x if self.index is None else self.index.sa_encode(x)).tobytes())
        return {"block": batch["block"], "data": np.array(out, dtype=object)}


def index_on_ray(db_dir: Path, manifest: dict, config, spec: IndexSpec):
    """Train the index here, encode its add blocks on Ray actors, add them here in order."""
    import faiss

    from retrolm.retrieval.index import faiss_errors

    info = manifest["arrays"]["embeddings"]
    emb = RowFile(db_dir, info)
    n, d = emb.shape
    index = train_index(spec, emb)
    emb.close()
    encodes = _encodes(spec)
    trained = faiss.serialize_index(index).tobytes() if encodes else None
    kwargs = dict(db_dir=str(db_dir), info=info, trained=trained, rows=ADD_BLOCK)
    count = -(-n // ADD_BLOCK)
    pending, added = {}, 0
    with faiss_errors(
        f"add {n} vectors to index {spec.factory}", "rerun the same command to resume"
    ):
        for row in _run_blocks(list(range(count)), _IndexAddActor, kwargs, config, "index add"):
            pending[int(row["block"])] = row["data"]
            while added in pending:  # block order, whatever order the actors finish in
                data = np.frombuffer(pending.pop(added), dtype=np.uint8)
                if encodes:
                    index.add_sa_codes(data.reshape(-1, index.sa_code_size()))
                else:
                    index.add(data.view(np.float32).reshape(-1, d))
                added += 1
    if added != count:
        raise DatabaseError(
            f"the index of {str(db_dir)!r} got {added} of {count} add blocks from Ray: rerun "
            "the same command to resume"
        )
    return index


# ---- neighbours ---------------------------------------------------------------------------
class _NeighbourActor:
    """Holds the index and the keys; searches the blocks it is given."""

    def __init__(self, db_dir: str, manifest: dict, block_size: int):
        from retrolm.retrieval.neighbours import NeighbourSearch

        self.search = NeighbourSearch(Path(db_dir), manifest)
        self.blocks = _Blocks(Path(db_dir), "neighbours", manifest["num_chunks"], block_size)

    def __call__(self, batch: dict) -> dict:
        for i in batch["block"]:
            self.search.block(int(i), self.blocks)
        return {"block": batch["block"]}


def neighbours_on_ray(db_dir: Path, manifest: dict, config, blocks: _Blocks) -> None:
    """The neighbour stage's unfinished blocks on Ray actors (the index opened once each)."""
    todo = blocks.todo()
    if not todo:
        return
    # read the index here first: Ray Data retries an actor that fails to start without end,
    # so a damaged index file must fail here, in one line
    _NeighbourActor(str(db_dir), manifest, config.block_size).search.close()
    kwargs = dict(db_dir=str(db_dir), manifest=manifest, block_size=config.block_size)
    for _ in _run_blocks(todo, _NeighbourActor, kwargs, config, "neighbours"):
        pass
