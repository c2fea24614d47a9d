"""Plan a database build at scale: the index the build would choose, its memory, and the
time of each stage, from rates measured by ``benchmarks/scale/bench_scale.py``.

The rates ship with the package (``scale_rates.json``: the CPU they were measured on, the
date, the command); ``rates=`` / ``--rates FILE`` reads others. Every time is a cost model
times a measured coefficient (seconds per unit of work), so it scales as stated here:

- chunk, embed: linear in N (chunks); plus the embed stage's fixed start-up.
- index train: k-means work, ``train_size x lists x d x iterations`` (ivf: 10 iterations over
  nlist lists; ivfpq adds its product quantizer, 2^nbits centroids x 25 iterations, and the
  OPQ rotation at scale); flat and hnsw train nothing.
- index add: reading the keys (linear in N) plus assigning each key to its list
  (``N x nlist x d``; ivfpq adds its PQ encoding, hnsw its graph insertion).
- neighbours: N queries, each costing ``N x d`` (flat) or
  ``(nlist + nprobe x N / nlist) x d`` (ivf; ivfpq scans codes instead of vectors), plus the
  stage's fixed start-up. Quadratic in N for flat and ivf (ivf probes 1/8 of its lists
  unless `--nprobe` says fewer).

Coefficients are fitted on the measured kinds (flat, ivf); ivfpq and hnsw reuse them
through their work counts (marked ``modelled``: not measured). Workers: embed, index add
and neighbours split into independent blocks (``--workers`` for embed, the Ray engine for
all three), so with W workers they take ``1/W`` of the time, assuming each worker has the
cores of the machine the rates came from; chunk and train run in one process.

Memory: the index's bytes (exact formulas per kind, checked against built indexes), and
each stage's peak: the stage's measured working memory (flat in N) plus the data it holds
by design (the training sample, the index, the doc_ids). While keys are added, faiss holds
the index in vectors that grow by doubling: the add stage holds the index's bytes times
the measured ratio ``held_per_index_byte`` (1 to 2).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrolm.retrieval.index import (
    INDEX_KINDS,
    NPROBE_DIV,
    IndexSpec,
    choose_index,
    parse_size,
)

log = logging.getLogger(__name__)

RATES_FILE = Path(__file__).with_name("scale_rates.json")
STAGES = ("chunk", "embed", "train", "add", "neighbours")
PARALLEL = ("embed", "add", "neighbours")  # split into independent blocks across workers
MAX_CHUNKS = 1_000_000_000
IVF_ITERS, PQ_ITERS, OPQ_ITERS, OPQ_PQ_ITERS, OPQ_POINTS = 10, 25, 50, 4, 65536  # faiss's
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 40  # faiss's HNSW32 defaults
GRAPH_PENALTY = 4.0  # graph distances are one vector at a time, not blocked matrix products
MB = 1 << 20


def parse_count(text: str | int) -> int:
    """'30M', '1.5M', '300k', '2B', '1e6', '100000' -> an int count of chunks (decimal)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"--chunks {text!r} is not a count: use e.g. 300000, 300k, 30M or 1e6")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))


# ---- the cost model -----------------------------------------------------------------------
def index_bytes(spec: IndexSpec, n: int, d: int) -> int:
    """Bytes of the index ``spec`` over ``n`` keys of ``d`` dims (as written by faiss, and
    held in memory while searching), headers aside."""
    nlist, codes = spec.nlist, _pq(spec)
    if spec.kind == "flat":
        return n * d * 4
    if spec.kind == "ivf":
        return n * (d * 4 + 8) + nlist * d * 4
    if spec.kind == "ivfpq":
        m, nbits = codes
        rotation = d * d * 4 if spec.factory.startswith("OPQ") else 0
        code = math.ceil(m * nbits / 8)
        return n * (code + 8) + nlist * d * 4 + (1 << nbits) * d * 4 + rotation
    if spec.kind == "hnsw":
        # level 0 holds 2M links, each higher level M; a key reaches level l with p = M^-l
        links = 2 * HNSW_M + HNSW_M / (HNSW_M - 1)
        return int(n * (d * 4 + links * 4 + 4 + 8))
    raise ValueError(f"no memory model for index kind {spec.kind!r}: plan flat, ivf, ivfpq or hnsw")


def _pq(spec: IndexSpec) -> tuple[int, int]:
    m = re.search(r"PQ(\d+)x(\d+)", spec.factory)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def work_units(spec: IndexSpec, n: int, d: int) -> dict[str, float]:
    """Units of work per stage (what the coefficients multiply): see the module docstring."""
    nlist, (m, nbits) = spec.nlist, _pq(spec)
    train = add = query = 0.0
    if spec.kind == "flat":
        query = float(n) * d
    elif spec.kind in ("ivf", "ivfpq"):
        train = spec.train_size * nlist * d * IVF_ITERS
        add = float(n) * nlist * d
        if spec.kind == "ivf":
            query = (nlist + spec.nprobe * n / nlist) * d
        else:
            train += spec.train_size * (1 << nbits) * d * PQ_ITERS
            if spec.factory.startswith("OPQ"):
                pts = min(spec.train_size, OPQ_POINTS)
                train += OPQ_ITERS * OPQ_PQ_ITERS * pts * (1 << nbits) * d
            add += float(n) * (1 << nbits) * d
            query = nlist * d + spec.nprobe * ((1 << nbits) * d + n / nlist * m)
    elif spec.kind == "hnsw":
        add = float(n) * HNSW_EF_CONSTRUCTION * 2 * HNSW_M * d * GRAPH_PENALTY
        query = spec.ef_search * HNSW_M * d * GRAPH_PENALTY
    return {"chunk": n, "embed": n, "train": train, "add": add, "neighbours": n * query}


# ---- fitting the rates from the benchmark -------------------------------------------------
def fit_rates(results: list[dict], out: dict) -> dict:
    """The coefficients of the cost model from ``bench_scale``'s rows (one per size): each
    stage's seconds per unit of work, its fixed start-up, and its working memory (peak RSS
    less the data it holds by design). Fitted on the largest size that ran each kind."""
    d = out["dim"]
    st: dict[str, dict] = {s: {} for s in STAGES}
    for r in sorted(results, key=lambda r: r["num_chunks"]):
        n, rows = r["num_chunks"], r["stages"]
        spec = IndexSpec(**rows["train"]["spec"])
        units = work_units(spec, n, d)
        st["chunk"]["s_per_unit"] = rows["chunk"]["seconds"] / n
        st["embed"].update(
            s_per_unit=1.0 / rows["embed"]["chunks_per_s"], fixed_s=rows["embed"]["fixed_s"]
        )
        if units["train"]:
            st["train"]["s_per_unit"] = rows["train"]["seconds"] / units["train"]
        nb = rows["neighbours"]
        fixed = max(0.0, nb["fixed_s"])
        st["neighbours"]["fixed_s"] = fixed
        st["neighbours"][f"s_per_unit_{spec.kind}"] = (nb["seconds"] - fixed) / units["neighbours"]
        if spec.kind == "flat":
            st["add"]["s_per_chunk"] = rows["add"]["seconds"] / n
        else:
            read = st["add"].get("s_per_chunk", 0.0) * n
            st["add"]["s_per_unit"] = max(0.0, rows["add"]["seconds"] - read) / units["add"]
        if rows["add"].get("held_mb"):  # faiss's lists grow by doubling: held > file bytes
            held = rows["add"]["held_mb"] * MB / rows["add"]["index_bytes"]
            st["add"]["held_per_index_byte"] = max(1.0, held)
        for s in STAGES:
            row = rows[s]
            working = (row["peak_rss_mb"] - row.get("resident_data_mb", 0.0)) * MB
            st[s]["working_bytes"] = max(st[s].get("working_bytes", 0), int(working))
    out["stages"] = st
    return out


def load_rates(path: str | Path | None = None) -> dict:
    """The rates ``path`` holds (default: those shipped with retrolm)."""
    path = Path(path) if path else RATES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"rates file {str(path)!r} does not exist: write one with "
            "`python -m benchmarks.scale.bench_scale`, or drop --rates to use the shipped rates"
        )
    try:
        rates = json.loads(path.read_text(encoding="utf-8"))
        for s in STAGES:
            rates["stages"][s]["working_bytes"]
        rates["cpu"], rates["dim"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"rates file {str(path)!r} is not a bench_scale rates file (missing {e}): write one "
            "with `python -m benchmarks.scale.bench_scale --save-rates`"
        ) from None
    return rates


# ---- the plan -----------------------------------------------------------------------------
@dataclass
class StagePlan:
    stage: str
    seconds: float  # one worker
    seconds_workers: float  # with the plan's workers
    peak_bytes: int  # the stage's peak memory (per worker)
    parallel: bool
    modelled: bool  # True: the index kind's time was not measured, only modelled


@dataclass
class BuildPlan:
    num_chunks: int
    memory_budget: int
    workers: int
    index: dict  # the IndexSpec the build would choose
    index_bytes: int
    build_peak_bytes: int  # the largest stage peak
    stages: list[StagePlan] = field(default_factory=list)
    cpu: str = ""
    rates_date: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def seconds_workers(self) -> float:
        return sum(s.seconds_workers for s in self.stages)

    def to_json(self) -> dict:
        return dict(asdict(self), seconds=self.seconds, seconds_workers=self.seconds_workers)


def plan_build(
    num_chunks: int | str,
    memory: int | str,
    workers: int = 1,
    index: str = "auto",
    rates: dict | str | Path | None = None,
    nprobe: int = 0,
) -> BuildPlan:
    """The build of ``num_chunks`` chunks under a ``memory`` budget (bytes or '4G'): the index
    ``choose_index`` picks (the build's own rule), its bytes, each stage's time and peak.
    ``rates``: a dict from ``load_rates``, or the path of a rates file (None: the shipped).
    ``nprobe``: the build's ``--nprobe`` (0: nlist/8); the neighbour time scales with it."""
    n, budget = parse_count(num_chunks), parse_size(memory)
    if not 1 <= n <= MAX_CHUNKS:
        raise ValueError(f"--chunks {n} is out of range: plan 1 to {MAX_CHUNKS:,} chunks")
    if budget <= 0:
        raise ValueError(f"--memory {memory!r} must be positive: use e.g. 4G or 64G")
    if workers < 1:
        raise ValueError(f"--workers {workers} must be at least 1")
    if index not in INDEX_KINDS or index == "autofaiss":
        kinds = [k for k in INDEX_KINDS if k != "autofaiss"]
        raise ValueError(f"--index {index!r} cannot be planned: use one of {kinds}")
    rates = rates if isinstance(rates, dict) else load_rates(rates)
    d = int(rates["dim"])
    spec = choose_index(n, d, index, budget, nprobe)
    units, st = work_units(spec, n, d), rates["stages"]
    ibytes = index_bytes(spec, n, d)
    held = {
        "chunk": 0,
        "embed": 0,
        "train": spec.train_size * d * 4,
        "add": int(ibytes * st["add"].get("held_per_index_byte", 1.0)),
        "neighbours": ibytes + n * 4,
    }
    measured = spec.kind in ("flat", "ivf")
    stages = []
    for s in STAGES:
        secs, modelled = _stage_seconds(s, spec, units, st, n), False
        if s in ("train", "add", "neighbours") and units[s] and not measured:
            modelled = True
        fixed = st[s].get("fixed_s", 0.0) if s in ("embed", "neighbours") else 0.0
        par = (secs - fixed) / workers + fixed if s in PARALLEL else secs
        peak = int(st[s]["working_bytes"]) + held[s]
        stages.append(StagePlan(s, secs, par, peak, s in PARALLEL, modelled))
    plan = BuildPlan(
        num_chunks=n,
        memory_budget=budget,
        workers=workers,
        index=spec.to_json(),
        index_bytes=ibytes,
        build_peak_bytes=max(s.peak_bytes for s in stages),
        stages=stages,
        cpu=f"{rates['cpu']} ({rates.get('cores', '?')} cores)",
        rates_date=str(rates.get("date", "")),
    )
    plan.notes = _notes(plan, rates)
    log.debug("plan for %d chunks: %s, %.0f s on one worker", n, spec.factory, plan.seconds)
    return plan


def _stage_seconds(stage: str, spec: IndexSpec, units: dict, st: dict, n: int) -> float:
    if stage in ("chunk", "embed"):
        return _coef(st, stage, "s_per_unit") * n + st[stage].get("fixed_s", 0.0)
    if not units[stage] and stage == "train":
        return 0.0
    if stage == "train":
        return _coef(st, "train", "s_per_unit") * units["train"]
    if stage == "add":
        read = _coef(st, "add", "s_per_chunk") * n  # reading and copying the keys
        return read + (_coef(st, "add", "s_per_unit") * units["add"] if units["add"] else 0.0)
    kind = "flat" if spec.kind == "flat" else "ivf"  # hnsw/ivfpq: the ivf coefficient
    return _coef(st, "neighbours", f"s_per_unit_{kind}") * units["neighbours"] + st[
        "neighbours"
    ].get("fixed_s", 0.0)


def _coef(st: dict, stage: str, key: str) -> float:
    if key not in st[stage]:
        raise ValueError(
            f"the rates file has no {stage} {key} (its benchmark built no index of the kind "
            "this plan needs): rerun `python -m benchmarks.scale.bench_scale` with sizes "
            "that build flat and ivf indexes (e.g. --sizes 100000,300000)"
        )
    return float(st[stage][key])


def _notes(plan: BuildPlan, rates: dict) -> list[str]:
    notes = []
    total = plan.build_peak_bytes
    if total > plan.memory_budget:
        notes.append(
            f"the build's peak ({total / 2**30:.1f} GiB) exceeds --memory "
            f"({plan.memory_budget / 2**30:.1f} GiB): the budget bounds the index only"
        )
    nlist, probe = IndexSpec(**plan.index).nlist, plan.index["nprobe"]
    if nlist and probe != min(nlist, max(8, nlist // NPROBE_DIV)):
        notes.append(
            f"nprobe {probe} of {nlist} lists (default {nlist // NPROBE_DIV}): faster "
            "neighbours at a lower recall; measure it on the built database with "
            f"`retrolm db check DB --nprobe {probe}`"
        )
    if any(s.modelled for s in plan.stages):
        notes.append(
            f"{plan.index['kind']} times are modelled from the flat/ivf rates (not measured)"
        )
    measured = [m["num_chunks"] for m in rates.get("measured", [])]
    if measured and plan.num_chunks > 2 * max(measured):
        notes.append(f"extrapolated from builds of up to {max(measured):,} chunks")
    if plan.workers > 1:
        notes.append(
            "workers: embed, index add and neighbours split over workers that each have "
            "the cores of the measured machine (one machine's cores are not multiplied)"
        )
    return notes
