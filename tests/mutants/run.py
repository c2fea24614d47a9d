"""Semantic mutants: each one a plausible bug in what the paper defines, which the default
suite must catch (``make mutants``; not part of the default run, and not collected by pytest).

For each mutant: copy the project's files (tracked and untracked-but-not-ignored, as git
lists them) into a temporary folder once, apply the mutant's replacements there (each
original snippet must occur exactly once in its file, or the run stops: the list cannot
rot silently), run the default suite (``pytest -q -x``; its ``hints`` first, a subset of
the same suite, so a caught mutant is quick; then the whole suite if they pass), report
"caught" with the first failing test or SURVIVED, and restore the file.

    python tests/mutants/run.py                # every mutant, then a summary table
    python tests/mutants/run.py --only cca_query_double_shift --quick   # hints only
    python tests/mutants/run.py --list

Exit status 0 when every mutant is caught, 1 when any survived, 2 on a bad list.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutants import MUTANTS, Mutant  # noqa: E402

PYTEST = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]


def project_files(root: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore (so local edits count)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_project(root: Path, dest: Path) -> None:
    for rel in project_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def check(mutant: Mutant, root: Path) -> list[str]:
    """Problems with a mutant's replacements against the files under root (empty: fine)."""
    problems = []
    path = root / mutant.file
    if not path.is_file():
        return [f"{mutant.name}: {mutant.file} does not exist"]
    text = path.read_text()
    for original, mutated in mutant.replace:
        count = text.count(original)
        if count != 1:
            problems.append(
                f"{mutant.name}: {mutant.file} holds the original snippet {count} times "
                f"(need exactly 1): {original!r}"
            )
        if original == mutated:
            problems.append(f"{mutant.name}: a replacement changes nothing: {original!r}")
    return problems


def first_failure(output: str) -> str:
    """The first FAILED/ERROR test id of pytest's short summary (or the last line)."""
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2)
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_pytest(workdir: Path, args: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(workdir / "src") + os.pathsep + str(workdir)}
    try:
        proc = subprocess.run(
            [sys.executable, *PYTEST, *args],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def run_mutant(mutant: Mutant, workdir: Path, quick: bool, timeout: float) -> tuple[str, str]:
    """(status, detail): status 'caught', 'SURVIVED' or 'TIMEOUT' (counted as caught)."""
    path = workdir / mutant.file
    original = path.read_text()
    text = original
    for old, new in mutant.replace:
        text = text.replace(old, new)
    path.write_text(text)
    try:
        stages = [list(mutant.hints)] if mutant.hints else []
        if not quick:
            stages.append([])  # the whole default suite (pyproject's testpaths, not slow)
        for args in stages:
            rc, out = run_pytest(workdir, args, timeout)
            if rc == -1:
                return "TIMEOUT", " ".join(args) or "whole suite"
            if rc != 0:
                return "caught", first_failure(out)
        return "SURVIVED", "hints only" if quick else "whole default suite passed"
    finally:
        path.write_text(original)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="run these mutants (names)")
    ap.add_argument("--quick", action="store_true", help="run each mutant's hint files only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = ap.parse_args(argv)

    problems = [p for m in MUTANTS for p in check(m, ROOT)]
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        problems.append("mutant names are not unique")
    chosen = MUTANTS if not args.only else [m for m in MUTANTS if m.name in args.only]
    unknown = set(args.only or ()) - set(names)
    if unknown:
        problems.append(f"unknown mutants {sorted(unknown)}; see --list")
    if problems:
        print("the mutant list does not match the code:", *problems, sep="\n  ")
        return 2
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.file}: {m.description}")
        return 0

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="retrolm-mutants-") as tmp:
        work = Path(tmp)
        copy_project(ROOT, work)
        if not args.no_baseline:  # the hint files must pass on the unmutated code
            hints = sorted({h for m in chosen for h in m.hints})
            rc, out = run_pytest(work, hints, args.timeout)
            if rc != 0:
                print(f"the unmutated code fails {first_failure(out)}: fix that first")
                return 2
            print(f"baseline: {len(hints)} hint files pass unmutated", flush=True)
        for m in chosen:
            t = time.perf_counter()
            status, detail = run_mutant(m, work, args.quick, args.timeout)
            dt = time.perf_counter() - t
            rows.append((m, status, detail, dt))
            print(f"{status:8s} {m.name:34s} {dt:6.0f} s  {detail}", flush=True)
    survived = [m.name for m, status, _, _ in rows if status == "SURVIVED"]
    print("\n| mutant | file | result | first failing test | s |\n|---|---|---|---|---|")
    for m, status, detail, dt in rows:
        print(f"| {m.name} | {m.file} | {status} | {detail} | {dt:.0f} |")
    total = time.perf_counter() - t0
    print(f"\n{len(rows) - len(survived)}/{len(rows)} caught in {total:.0f} s", end="")
    print(f"; SURVIVED: {', '.join(survived)}" if survived else "")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
