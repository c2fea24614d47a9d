"""What a database was built from: the input files, recorded so a resume can tell a change.

A build records every document file it was started on (path relative to TEXT_DIR, size,
modification time in ns) in ``inputs.jsonl`` and their count, total size and digest in the
manifest. Resuming (or rerunning on a complete database) compares the folder as it is now
with that record: a file added, removed, resized or touched would mix two corpora (a
tokenizer trained on one, chunks resumed on another), so the build refuses, naming what
changed and the fix (``--restart``).

The list lives beside the manifest rather than in it: a corpus of a million files would
make a manifest of tens of MB, which every ``RetrievalDatabase.open`` reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from retrolm.retrieval import chunking
from retrolm.utils import atomic_path

INPUTS_FILE = "inputs.jsonl"


def list_inputs(paths: list[Path], text_dir: Path) -> list[dict]:
    """One record per file: ``{"path": relative posix path, "bytes": size, "mtime_ns": ...}``."""
    out = []
    for p in paths:
        st = p.stat()
        out.append(
            {
                "path": p.relative_to(text_dir).as_posix(),
                "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }
        )
    return out


def _lines(listing: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in listing).encode()


def summary(listing: list[dict]) -> dict:
    """The manifest's ``inputs`` entry: file count, total bytes and the list's sha256."""
    return {
        "file": INPUTS_FILE,
        "files": len(listing),
        "bytes": sum(r["bytes"] for r in listing),
        "sha256": hashlib.sha256(_lines(listing)).hexdigest(),
    }


def write_inputs(db_dir: Path, listing: list[dict]) -> None:
    with atomic_path(Path(db_dir) / INPUTS_FILE) as tmp:
        tmp.write_bytes(_lines(listing))


def read_inputs(db_dir: Path, recorded: dict) -> list[dict] | None:
    """The recorded list, or None when the file is missing or is not the one the manifest
    describes (a ``--restart`` killed between writing the two)."""
    path = Path(db_dir) / recorded["file"]
    if not path.is_file():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        return None
    return [json.loads(line) for line in data.decode().splitlines() if line]


def describe_changes(old: list[dict] | None, new: list[dict], limit: int = 3) -> str:
    """What differs between two listings, e.g. ``1 file added (c.txt); 1 changed (a.txt)``."""
    if old is None:
        return "the file list differs from the recorded one"
    before = {r["path"]: r for r in old}
    after = {r["path"]: r for r in new}
    groups = {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "resized": sorted(
            p for p in set(before) & set(after) if before[p]["bytes"] != after[p]["bytes"]
        ),
        "modified (same size, new time)": sorted(
            p
            for p in set(before) & set(after)
            if before[p]["bytes"] == after[p]["bytes"]
            and before[p]["mtime_ns"] != after[p]["mtime_ns"]
        ),
    }
    parts = []
    for what, names in groups.items():
        if names:
            shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
            parts.append(f"{len(names)} file{'s' if len(names) > 1 else ''} {what} ({shown})")
    return "; ".join(parts) or "the file list differs from the recorded one"


def require_text(paths: list[Path], text_dir: Path) -> None:
    """Refuse, before anything is written, a folder whose files are all empty or binary:
    a build would otherwise train a bytes-only tokenizer and record it as a finished stage,
    and a rerun with good files would resume on it. Stops at the first readable file."""
    reasons = []
    for p in paths:
        doc = chunking.read_document(p)
        if isinstance(doc, chunking.Document):
            return
        reasons.append(doc)
    raise ValueError(
        f"no text in the {len(paths)} file(s) of {str(text_dir)!r}: all are empty or binary "
        f"({reasons.count('empty')} empty, {reasons.count('binary')} binary); "
        "add readable text files or pass another --glob"
    )
