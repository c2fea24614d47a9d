"""A retrieval database on disk: ``manifest.json`` and the file names, raw arrays opened as
memmaps or read and written by row ranges (``RowFile``), and the done-markers of the
resumable stages' row blocks (``.progress/<stage>/``). ``build.py`` writes it,
``database.py`` reads it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from retrolm.utils import write_json

FORMAT = "retrolm-retrieval-db"
FORMAT_VERSION = 1
MANIFEST, TOKENIZER_FILE, INDEX_FILE = "manifest.json", "tokenizer.json", "index.faiss"
EMBEDDINGS_FILE, NEIGHBOURS_FILE, NEIGHBOUR_DISTS_FILE = (
    "embeddings.bin",
    "neighbours.bin",
    "neighbour_dists.bin",
)
PROGRESS_DIR = ".progress"
GATHER_ROWS = 4096  # RowFile.gather turns this many row ids into Python ints at a time


# ---- manifest -----------------------------------------------------------------------------
def read_manifest(db_dir: Path) -> dict | None:
    path = Path(db_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_manifest(db_dir: Path, manifest: dict) -> None:
    write_json(Path(db_dir) / MANIFEST, manifest, indent=1, sort_keys=True)


def array_info(file: str, dtype: np.dtype | str, shape: tuple) -> dict:
    return {"file": file, "dtype": np.dtype(dtype).name, "shape": list(shape)}


def open_array(db_dir: Path, info: dict, mode: str = "r") -> np.ndarray:
    """A raw array file as a memmap (read-only by default); empty arrays are plain arrays."""
    shape = tuple(info["shape"])
    if 0 in shape:
        return np.zeros(shape, dtype=info["dtype"])
    return np.memmap(Path(db_dir) / info["file"], dtype=info["dtype"], mode=mode, shape=shape)


def read_whole(db_dir: Path, info: dict) -> np.ndarray:
    """A raw array file read into memory with plain reads: unlike copying a memmap, no
    mapped file pages stay in the process's resident set beside the copy."""
    shape = tuple(info["shape"])
    if 0 in shape:
        return np.zeros(shape, dtype=info["dtype"])
    count = int(np.prod(shape, dtype=np.int64))
    return np.fromfile(Path(db_dir) / info["file"], dtype=info["dtype"], count=count).reshape(shape)


class RowFile:
    """A raw row-major array file, read and written by row ranges with plain file I/O.

    Unlike a memmap, rows that were read or written do not stay mapped into the
    process, so the build's resident memory stays flat however large the file grows.
    """

    def __init__(self, db_dir: Path, info: dict, writable: bool = False):
        self.path = Path(db_dir) / info["file"]
        self.dtype, self.shape = np.dtype(info["dtype"]), tuple(info["shape"])
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._f = open(self.path, "r+b" if writable else "rb")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if not isinstance(rows, slice):  # row ids (an index training sample, re-ranking)
            return self.gather(rows)
        start, stop, step = rows.indices(len(self))
        assert step == 1, "RowFile reads contiguous row ranges"
        self._f.seek(start * self.row_bytes)
        data = self._f.read(max(0, stop - start) * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, *self.shape[1:])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (any order, repeats allowed) as a new array ``(len(rows), ...)``.

        Each run of consecutive rows is read with one ``os.preadv``, never through a map: a
        map's page faults also map the pages around each row (the kernel's fault-around), so
        gathering from all over a large file (re-ranking candidates, an index training
        sample) would hold much of the file in this process's resident set; reads hold only
        the rows asked for. Besides the result, the bookkeeping is bounded too: rows already
        sorted and distinct (a training sample) are read as given, and the row ids become
        Python ints ``GATHER_ROWS`` at a time (a list of 400k ints alone is 15 MB)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0 or 0 in self.shape:
            return np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row ids must be in [0, {len(self)}) for {self.path.name}")
        inverse = None
        if not bool((rows[1:] > rows[:-1]).all()):  # else: sorted and distinct already
            rows, inverse = np.unique(rows, return_inverse=True)  # sorted: forward reads
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        fd, size, buf = self._f.fileno(), self.row_bytes, memoryview(out).cast("B")
        for s in range(0, len(rows), GATHER_ROWS):
            part = rows[s : s + GATHER_ROWS]
            cut = np.flatnonzero(np.diff(part) != 1) + 1  # runs of consecutive rows
            starts, ends = np.r_[0, cut], np.r_[cut, len(part)]
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                self._read_into(fd, buf[(s + a) * size : (s + b) * size], int(part[a]) * size)
        return out if inverse is None else out[inverse]

    def _read_into(self, fd: int, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from byte ``offset`` (one call reads at most ~2 GiB on Linux)."""
        while len(buf):
            got = os.preadv(fd, [buf], offset)
            if got <= 0:
                raise OSError(f"{self.path} ends before byte {offset}: the file is truncated")
            buf, offset = buf[got:], offset + got

    def write(self, start: int, rows: np.ndarray) -> None:
        self._f.seek(start * self.row_bytes)
        self._f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self._f.flush()  # in the page cache: survives the process being killed

    def close(self) -> None:
        self._f.close()


class _Blocks:
    """Done-markers for fixed-size row blocks of one stage (``.progress/<stage>/<i>.done``)."""

    def __init__(self, db_dir: Path, stage: str, n: int, block_size: int):
        self.dir = Path(db_dir) / PROGRESS_DIR / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n, self.size = n, block_size
        self.count = -(-n // block_size)

    def rows(self, i: int) -> tuple[int, int]:
        return i * self.size, min(self.n, (i + 1) * self.size)

    def done(self, i: int) -> bool:
        return (self.dir / f"{i:08d}.done").exists()

    def mark(self, i: int) -> None:
        (self.dir / f"{i:08d}.done").touch()

    def todo(self, blocks: list[int] | range | None = None) -> list[int]:
        """Unfinished blocks among ``blocks`` (default: all)."""
        blocks = range(self.count) if blocks is None else blocks
        return [i for i in blocks if not self.done(i)]


def _preallocate(path: Path, nbytes: int) -> None:
    """Create (or keep) a file of exactly ``nbytes``; unfinished blocks are rewritten later."""
    with open(path, "ab") as f:
        if f.tell() != nbytes:
            f.truncate(nbytes)
