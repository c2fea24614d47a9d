"""What the benchmark scripts share: paths, threads, timing, peak RSS, child processes, result
files, the stub of an anchor's unused import, and the benchmark models of the issues.

Scripts import it as ``from benchmarks import common``, which works because they are run as
modules from the repository root (``python -m benchmarks.compare.bench_routing``, see
``benchmarks/README.md``); the child processes they start get the root on ``PYTHONPATH``, so
they import it the same way from any folder. retrolm itself is the installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = ROOT / "benchmarks" / "results"  # raw rows the scripts append (jsonl)


# --- command line, threads, memory -------------------------------------------------------


def parser(doc: str, *, threads: int | None = None, rounds: int | None = None):
    """An argument parser whose ``--help`` prints the script's docstring; with ``threads``
    and ``rounds`` it has ``--threads`` / ``--rounds`` with those defaults."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch threads")
    if rounds is not None:
        ap.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds")
    return ap


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def peak_rss_mb() -> float:
    """This process's peak resident set so far (``ru_maxrss``), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


# --- timing ------------------------------------------------------------------------------


def interleave(
    sides: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each side: ``warmup`` calls of each side first, then ``rounds``
    rounds of one call per side in turn, so that load from other processes on a shared
    machine hits every side alike (compare medians, or medians of per-round ratios)."""
    for run in sides.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def timed_calls(fn: Callable[[int], object], n: int) -> list[float]:
    """Seconds of each of ``fn(0)``, ..., ``fn(n - 1)``."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def cached_step_times(model, call: Callable[[], object]) -> list[float]:
    """Run ``call()`` (one generation with ``model``) and return the seconds of each of its
    one-token forwards (the cached steps; the prompt's forward is not among them)."""
    steps: list[float] = []
    forward = model.forward

    def timed(ids, *a, **k):
        t0 = time.perf_counter()
        out = forward(ids, *a, **k)
        if ids.shape[1] == 1:
            steps.append(time.perf_counter() - t0)
        return out

    model.forward = timed
    try:
        call()
    finally:
        model.forward = forward
    return steps


def interleaved_medians(sides: dict, rounds: int, label: str) -> dict[str, float]:
    """Each side returns per-step seconds; after one warm-up call per side, ``rounds`` rounds
    of one call per side in turn. Prints each side's per-round medians (ms) and returns the
    median over rounds."""
    for run in sides.values():  # warm-up (weight copies, caches, first-touch memory)
        run()
    medians: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            medians[name].append(statistics.median(run()) * 1e3)
    best = {name: statistics.median(v) for name, v in medians.items()}
    width = max(map(len, sides))
    for name, v in medians.items():
        per_round = ", ".join(f"{x:.2f}" for x in v)
        print(f"{name:{width}s} ms per step ({label}): {per_round} -> {best[name]:.2f}")
    return best


# --- child processes and result files ----------------------------------------------------


class ChildFailed(RuntimeError):
    """A child process ended without a RESULT line (or ran out of time)."""

    def __init__(self, message: str, stderr: str = "", timed_out: bool = False):
        super().__init__(message)
        self.stderr, self.timed_out = stderr, timed_out


def emit(result: dict) -> None:
    """A child's answer: one ``RESULT {json}`` line on stdout (what ``run_child`` reads)."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(
    argv: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None
) -> dict:
    """Run ``python *argv`` in a fresh process (so its peak RSS is its own) and return the
    JSON of the ``RESULT`` line it prints. The repository root goes first on its
    ``PYTHONPATH``, so ``-m benchmarks....`` works whatever the working folder; ``env``
    adds variables."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = dict(os.environ, PYTHONPATH=path, **(env or {}))
    cmd = [sys.executable, *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        raise ChildFailed(f"timeout after {timeout} s: {cmd[1:4]}", timed_out=True) from e
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise ChildFailed(f"{cmd[1:4]} failed:\n{p.stderr[-3000:]}", p.stderr)


def rerun(module: str, *args: str, timeout: float | None = None, env=None) -> dict:
    """``run_child`` of a script itself: ``python -m module *args`` (pass ``__spec__.name``)."""
    return run_child(["-m", module, *args], timeout=timeout, env=env)


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON row to ``path`` (its folder created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# --- anchors -----------------------------------------------------------------------------


def stub_autofaiss() -> None:
    """RETRO-pytorch imports autofaiss at import time only (to build indexes, which the
    benchmarks never do): an empty module stands in when it is not installed."""
    if "autofaiss" not in sys.modules:
        stub = types.ModuleType("autofaiss")
        stub.build_index = None
        sys.modules["autofaiss"] = stub


# --- the benchmark models of the issues --------------------------------------------------


def retro_bench_model(*drop: str) -> dict:
    """Issue 2's benchmark RETRO (dec 256x6, enc 256x2, CCA (3, 6), heads 4, dim_head 64,
    chunk 64): the ``retro-bench`` preset, less the keys in ``drop`` (set per run)."""
    from retrolm.models.retro.config import PRESETS

    return {k: v for k, v in PRESETS["retro-bench"].items() if k not in drop}


# RETRO generation (issues 2/4): vocabulary, prompt, new tokens, max length, neighbours
GEN_VOCAB, GEN_PROMPT, GEN_NEW, GEN_L, GEN_K = 28996, 448, 64, 512, 2


class StubRetriever:
    """Retrieval at every chunk boundary without faiss or BERT: random neighbour tokens
    (model cost only)."""

    num_neighbours = GEN_K

    def __init__(self):
        import torch

        self.g = torch.Generator().manual_seed(1)

    def search_tokens(self, chunks, k):
        import numpy as np

        return np.zeros((len(chunks), k), dtype=np.int64), np.zeros((len(chunks), k))

    def retrieved_tokens(self, ids):
        import torch

        toks = torch.randint(1, GEN_VOCAB, (*ids.shape, 128), generator=self.g)
        return toks, torch.ones(ids.shape, dtype=torch.bool)


# Issue 7: the config of shared/bench/bench_hier.py; generation: prompt + new tokens
HIER_CFG = dict(
    num_tokens=256, dim=256, depth=4, heads=4, dim_head=64,
    hierarchies=(1, 2, 8), window_sizes=(32, 64, None),
)  # fmt: skip
HIER_PROMPT, HIER_NEW = 992, 32


def build_hier(side: str, seq_len: int):
    """Issue 7's benchmark model: retrolm's ``HierarchicalTransformer`` (side "ours") or
    simple-hierarchical-transformer 0.4.0's (side "ref"), seed 0."""
    import torch

    torch.manual_seed(0)
    if side == "ref":
        from simple_hierarchical_transformer import HierarchicalTransformer
    else:
        from retrolm import HierarchicalTransformer
    return HierarchicalTransformer(seq_len=seq_len, **HIER_CFG)


# Issue 6: the config of shared/bench/bench_routing.py
ROUTING_CFG = dict(
    num_tokens=256, dim=256, heads=4, depth=4, causal=True, window_size=128,
    n_local_attn_heads=2,
)  # fmt: skip


def build_routing(side: str, seq_len: int):
    """Issue 6's benchmark model: retrolm's ``RoutingTransformerLM`` (side "ours") or
    routing-transformer 1.6.1's (side "ref") in its ``AutoregressiveWrapper``, seed 0."""
    import torch

    if side == "ours":
        from retrolm import AutoregressiveWrapper, RoutingTransformerLM
    else:
        from routing_transformer import AutoregressiveWrapper, RoutingTransformerLM
    torch.manual_seed(0)
    return AutoregressiveWrapper(RoutingTransformerLM(max_seq_len=seq_len, **ROUTING_CFG))


# --- trained runs (the experiments) ------------------------------------------------------


def load_run(run: str | Path, db: str | Path):
    """(the trained model of a run folder, in eval mode; the retrieval database)."""
    from retrolm.checkpoint import load_model
    from retrolm.retrieval import RetrievalDatabase

    database = RetrievalDatabase.open(db)
    model, _ = load_model(run)
    return model.eval(), database
