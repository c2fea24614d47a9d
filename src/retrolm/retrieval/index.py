"""The faiss index over chunk keys, chosen by database size and memory budget.

Keys are unit-norm, distances squared L2 (paper §2.3; on unit vectors this orders
neighbours exactly like cosine). Kinds:

- ``flat``: exact (``IndexFlatL2``), N·d·4 bytes; ``auto`` uses it up to FLAT_MAX_N.
- ``ivf``: ``IVF{nlist},Flat``; nlist ≈ 4·√N but never more lists than the training sample
  (at most TRAIN_MAX rows, whatever N) can train: at least 39 points per list, the faiss
  k-means floor; ``nprobe`` ≈ nlist/8 unless given (NPROBE_DIV).
- ``hnsw``: ``HNSW32`` graph (efSearch 128); fast queries, more memory than ivf.
  Multi-threaded insertion is not bit-reproducible across runs.
- ``ivfpq``: ``[OPQ{M},]IVF{nlist},PQ{M}`` with M code bytes per vector picked to fit the
  memory budget (OPQ rotation from OPQ_MIN_N vectors on); what ``auto`` picks when the
  vectors do not fit the budget.
- ``autofaiss``: delegate the choice to autofaiss (optional extra ``retrolm[autofaiss]``).

Approximate kinds over-fetch candidates and re-rank them with exact distances read
from the stored embeddings, so their top-k order is exact among what they find.
Shapes: Q queries, d dims, k results.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.errors import DatabaseError

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq", "autofaiss")
MIN_POINTS_PER_LIST = 39  # faiss k-means warns (and trains badly) below this
FLAT_MAX_N = 262_144  # auto: exact search up to this many chunks (all-pairs cost grows as N²)
PQ_BYTES = (4, 8, 16, 32, 48, 64, 96, 128, 192)
RERANK_ROWS = 16  # queries re-ranked at a time: 16 x 128 candidates x 384 dims = 3 MB a copy
SEARCH_ROWS = 1024  # queries per faiss call (bounds its result and coarse-list buffers)
# The training sample has a fixed cap, whatever N: faiss's k-means wants 39 to 256 points per
# centroid (it warns below 39 and subsamples above 256), so a sample of TRAIN_MAX rows trains
# at most TRAIN_MAX / 39 = 25,641 lists; ``choose_index`` caps nlist there (4·√N reaches it
# at N ≈ 41M). Below the cap the sample is TRAIN_PER_LIST points per list (30,000 at least).
TRAIN_MAX, TRAIN_PER_LIST = 1_000_000, 100
# Default nprobe = nlist / NPROBE_DIV (8 at least). Its cost: N queries x nprobe x N / nlist
# keys each, quadratic in N (30M chunks: ~243 days of neighbour search on 2 cores). A smaller
# ``nprobe`` (BuildConfig.nprobe, ``retrolm db build --nprobe``) trades recall for time:
# benchmarks/scale/nprobe_recall.py measures both, and ``retrolm db check --nprobe`` on a
# built database.
NPROBE_DIV = 8
OPQ_MIN_N = 1_000_000  # below this, ivfpq skips the OPQ rotation (slow to train, small gain)


def parse_size(text: str | int) -> int:
    """'4G', '512M', '1.5g', '123' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"memory budget {text!r} is not a size: use e.g. 512M, 4G or 1T")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass
class IndexSpec:
    """What to build: a faiss factory string and its search parameters."""

    kind: str
    factory: str
    nprobe: int = 0  # ivf/ivfpq lists searched per query
    ef_search: int = 0  # hnsw beam width
    train_size: int = 0  # vectors sampled (evenly spaced) to train; 0 = no training
    exact: bool = False  # True: faiss distances are already exact

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def nlist(self) -> int:
        """Inverted lists of an ivf/ivfpq index (0 for other kinds)."""
        m = re.search(r"IVF(\d+)", self.factory)
        return int(m.group(1)) if m else 0

    def with_search(self, nprobe: int | None = None, ef_search: int | None = None) -> IndexSpec:
        """This spec with query-time parameters replaced (None keeps the build's).

        ``nprobe`` (1..nlist) applies to ivf/ivfpq, ``ef_search`` (>= 1) to hnsw; a value
        for a kind without that parameter is refused (it would silently change nothing)."""
        out = replace(self)
        if nprobe is not None:
            if not self.nlist:
                raise ValueError(
                    f"--nprobe {nprobe}: the {self.kind} index ({self.factory}) has no inverted "
                    "lists; nprobe applies to ivf and ivfpq indexes, drop it"
                )
            if not 1 <= nprobe <= self.nlist:
                raise ValueError(
                    f"--nprobe {nprobe} is out of range for {self.factory}: use 1 to "
                    f"{self.nlist} (nlist; {self.nlist} searches every list)"
                )
            out.nprobe = int(nprobe)
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ValueError(
                    f"--ef-search {ef_search}: the {self.kind} index ({self.factory}) is not "
                    "an HNSW graph; ef_search applies to hnsw indexes, drop it"
                )
            if ef_search < 1:
                raise ValueError(f"--ef-search {ef_search} must be at least 1")
            out.ef_search = int(ef_search)
        return out


def choose_index(
    n: int, d: int, kind: str = "auto", memory_budget: int = 4 << 30, nprobe: int = 0
) -> IndexSpec:
    """The index for N vectors of d dims under a memory budget (bytes).

    ``nprobe``: lists an ivf/ivfpq index searches per query (at most nlist; 0 = the default
    nlist / NPROBE_DIV). With ``kind="auto"`` it applies only if the choice has lists."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {INDEX_KINDS}")
    if nprobe < 0 or (nprobe and kind in ("flat", "hnsw", "autofaiss")):
        raise ValueError(
            f"nprobe={nprobe}: use 0 (the default, nlist/{NPROBE_DIV}) or a positive count "
            f"of lists, for an ivf, ivfpq or auto index (not {kind!r})"
        )
    flat_bytes = n * d * 4
    if kind == "auto":
        if n <= FLAT_MAX_N and flat_bytes <= memory_budget:
            kind = "flat"
        elif flat_bytes * 1.1 <= memory_budget:
            kind = "ivf"
        else:
            kind = "ivfpq"
    nlist = max(1, min(int(4 * math.sqrt(n)), min(n, TRAIN_MAX) // MIN_POINTS_PER_LIST))
    nprobe = min(nlist, nprobe or max(8, nlist // NPROBE_DIV))
    if kind == "flat":
        return IndexSpec("flat", "Flat", exact=True)
    if kind == "ivf":
        return IndexSpec("ivf", f"IVF{nlist},Flat", nprobe=nprobe, train_size=_train_size(n, nlist))
    if kind == "hnsw":
        return IndexSpec("hnsw", "HNSW32", ef_search=128)
    if kind == "autofaiss":
        return IndexSpec("autofaiss", "autofaiss")
    # ivfpq: the most code bytes per vector that fit the budget (ids cost 8 more)
    # at least 4 dims per sub-quantizer (finer splits cost training time and gain little)
    fits = [
        b for b in PQ_BYTES if d % b == 0 and b <= d // 4 and n * (b + 8) <= 0.8 * memory_budget
    ]
    if not fits:
        raise ValueError(
            f"memory budget {memory_budget} bytes is too small for {n} vectors of {d} dims "
            f"even as IVF-PQ: raise --memory-budget to at least {n * (8 + 8) * 2} bytes"
        )
    m = max(fits)
    nbits = max(1, min(8, int(math.log2(max(2, n // MIN_POINTS_PER_LIST)))))  # small-N PQ
    opq = f"OPQ{m}," if n >= OPQ_MIN_N else ""  # the rotation pays off (and trains) at scale
    # "np": no polysemous training (we never use polysemous search; it is most of PQ training)
    return IndexSpec(
        "ivfpq",
        f"{opq}IVF{nlist},PQ{m}x{nbits}np",
        nprobe=nprobe,
        train_size=_train_size(n, max(nlist, 1 << nbits)),
    )


def _train_size(n: int, lists: int) -> int:
    """Rows sampled to train ``lists`` centroids: TRAIN_PER_LIST each, capped at TRAIN_MAX."""
    return min(n, max(TRAIN_PER_LIST * lists, 30_000), TRAIN_MAX)


def build_index(
    spec: IndexSpec, embeddings: np.ndarray, block_size: int = 65536, memory_budget: int = 4 << 30
):
    """Train (on evenly spaced rows, deterministic) and add every vector ``(N, d)`` in blocks."""
    if spec.kind == "autofaiss":
        return _build_autofaiss(embeddings[0 : len(embeddings)], memory_budget)
    index = train_index(spec, embeddings)
    add_vectors(index, spec, embeddings, block_size)
    return index


def train_index(spec: IndexSpec, embeddings: np.ndarray):
    """An empty index of ``spec``, trained on ``spec.train_size`` evenly spaced rows of
    ``embeddings (N, d)`` when its kind trains (deterministic: the same rows give the same
    index); the first half of ``build_index``."""
    import faiss  # here, not at the top: building the CLI never loads it

    n, d = embeddings.shape
    with _build_errors(spec, n, d):
        index = faiss.index_factory(d, spec.factory, faiss.METRIC_L2)
        if spec.train_size:
            sample = np.ascontiguousarray(embeddings[sample_rows(n, spec.train_size)], np.float32)
            log.info("training %s on %d of %d vectors", spec.factory, len(sample), n)
            index.train(sample)
    return index


def sample_rows(n: int, m: int) -> np.ndarray:
    """``m`` evenly spaced row ids of ``n`` (first and last included), strictly increasing:
    integer arithmetic, one int64 array (no float copy, no sort: an index training sample
    of 400k rows costs 3 MB of ids, not the 20 MB ``linspace`` + ``unique`` leave behind)."""
    m = min(m, n)
    if m <= 1:
        return np.zeros(m, dtype=np.int64)
    rows = np.arange(m, dtype=np.int64)
    rows *= n - 1
    rows //= m - 1
    return rows


def add_vectors(index, spec: IndexSpec, embeddings: np.ndarray, block_size: int = 65536) -> None:
    """Add every row of ``embeddings (N, d)`` to a trained ``index``, ``block_size`` rows at
    a time (the rows need not fit in memory; the second half of ``build_index``)."""
    n, d = embeddings.shape
    with _build_errors(spec, n, d):
        for s in tqdm(range(0, n, block_size), desc="index add", unit="block"):
            index.add(np.ascontiguousarray(embeddings[s : s + block_size], dtype=np.float32))


def _build_errors(spec: IndexSpec, n: int, d: int):
    return faiss_errors(
        f"build index {spec.factory} over {n} vectors of dimension {d}",
        "choose another --index (flat always works) or a larger --memory-budget",
    )


@contextmanager
def faiss_errors(doing: str, fix: str) -> Iterator[None]:
    """faiss reports every failure (a full disk, a corrupt file, an index it cannot train)
    as a ``RuntimeError`` with its C++ location; turn it into one line for the user:
    ``DatabaseError("faiss could not <doing> (<faiss's reason>): <fix>")``."""
    try:
        yield
    except RuntimeError as e:
        reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(e).strip())
        reason = " ".join(reason.split())
        raise DatabaseError(f"faiss could not {doing} ({reason}): {fix}") from e


def _build_autofaiss(embeddings: np.ndarray, memory_budget: int):
    """autofaiss picks and tunes the index under the budget (untested here: optional extra)."""
    try:
        from autofaiss import build_index as af_build
    except ImportError:
        raise ValueError(
            "index kind 'autofaiss' needs the optional extra: pip install 'retrolm[autofaiss]'"
        ) from None
    index, _ = af_build(
        embeddings=np.asarray(embeddings, dtype=np.float32),
        save_on_disk=False,
        metric_type="l2",
        max_index_memory_usage=f"{max(1, memory_budget >> 20)}M",
        current_memory_available=f"{max(1, 2 * memory_budget >> 20)}M",
    )
    return index


def configure(index, spec: IndexSpec) -> None:
    """Apply the spec's search-time parameters to a built or loaded index."""
    import faiss  # here, not at the top: building the CLI never loads it

    if spec.nprobe:
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    if spec.ef_search:
        faiss.downcast_index(index).hnsw.efSearch = spec.ef_search


def save_index(index, path: Path) -> None:
    import faiss  # here, not at the top: building the CLI never loads it

    with faiss_errors(
        f"write the index file {path}",
        "free disk space and rerun `retrolm db build` with the same arguments to resume",
    ):
        faiss.write_index(index, str(path))


def load_index(path: Path, spec: IndexSpec):
    import faiss  # here, not at the top: building the CLI never loads it

    with faiss_errors(
        f"read the index file {path}",
        "the file is damaged or was written by another faiss; rebuild the database with "
        "`retrolm db build TEXT_DIR DB_DIR --restart`",
    ):
        index = faiss.read_index(str(path))
        configure(index, spec)
    return index


class Searcher:
    """k-NN over the index, with exact re-ranking for approximate kinds.

    Args:
        index: a faiss index holding the N database keys (ids 0..N-1).
        spec: how it was built (search parameters, exactness).
        embeddings: the stored keys ``(N, d)`` used to re-rank approximate candidates.
    """

    def __init__(self, index, spec: IndexSpec, embeddings: np.ndarray | None = None):
        self.index, self.spec, self.embeddings = index, spec, embeddings
        configure(index, spec)
        self.exact = spec.exact or embeddings is None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the query-time parameters (``IndexSpec.with_search``); None keeps each."""
        self.spec = self.spec.with_search(nprobe, ef_search)
        configure(self.index, self.spec)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest ``k`` keys of queries ``x (Q, d)``: ids int64 ``(Q, k)`` (−1 = none) and
        squared L2 distances float32 ``(Q, k)`` (inf where −1), sorted by (distance, id).

        Queries go to faiss in equal parts of at most SEARCH_ROWS: what one call holds (its
        candidates, an IVF index's probed lists per query, the exact search's distance
        blocks) is then bounded by the part, not by Q. Equal parts keep every part on
        faiss's matrix-product path (a tail under its 20-query threshold would take
        another); results match one whole call up to the rounding of faiss's distances."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.index.d:
            raise ValueError(
                f"queries must be (Q, {self.index.d}) to search this index, got {x.shape}: "
                "embed them with the database's encoder"
            )
        if len(x) <= SEARCH_ROWS:
            return self._search_block(x, k)
        parts = [self._search_block(p, k) for p in np.array_split(x, -(-len(x) // SEARCH_ROWS))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_block(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k_eff = min(k, self.ntotal)
        with faiss_errors(
            f"search index {self.spec.factory}",
            "its file may be damaged; rebuild the database with `retrolm db build --restart`",
        ):
            if self.exact:
                dists, ids = self.index.search(x, k_eff) if k_eff else _empty(len(x), 0)
            else:
                fetch = min(self.ntotal, max(4 * k_eff, k_eff + 16))
                _, ids = self.index.search(x, fetch)  # faiss returns (distances, ids)
                dists = self._exact_dists(x, ids)
        dists = np.where(ids < 0, np.inf, dists).astype(np.float32)
        order = np.lexsort((ids, dists), axis=-1)[:, :k_eff]  # by distance, then id
        ids = np.take_along_axis(ids, order, -1)
        dists = np.take_along_axis(dists, order, -1)
        if k_eff < k:  # fewer keys than asked: pad, never wrap
            pad_i, pad_d = _empty(len(x), k - k_eff)
            ids, dists = np.concatenate([ids, pad_i], 1), np.concatenate([dists, pad_d], 1)
        return ids.astype(np.int64), dists.astype(np.float32)

    def _exact_dists(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact squared distances of the candidates ``ids (Q, F)``, RERANK_ROWS queries at a
        time: the gathered keys and their queries hold ``2 x RERANK_ROWS x F x d`` floats,
        whatever Q, and the differences are taken in place (same arithmetic, same bits)."""
        out = np.full(ids.shape, np.inf, dtype=np.float32)
        for s in range(0, len(x), RERANK_ROWS):
            part, dst = ids[s : s + RERANK_ROWS], out[s : s + RERANK_ROWS]
            valid = part >= 0
            flat = part[valid]
            order = np.argsort(flat, kind="stable")  # sorted reads from the file
            vecs = np.empty((len(flat), x.shape[1]), dtype=np.float32)
            vecs[order] = self.embeddings[flat[order]]
            q = np.repeat(np.arange(len(part)), valid.sum(1))
            np.subtract(vecs, x[s : s + RERANK_ROWS][q], out=vecs)
            dst[valid] = np.square(vecs, out=vecs).sum(-1)
        return out


def _empty(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -1, dtype=np.int64), np.full((q, k), np.inf, dtype=np.float32)
