"""Small helpers shared by every module (defined once, imported everywhere)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def exists(x: Any) -> bool:
    return x is not None


def default(x: T | None, d: T) -> T:
    return d if x is None else x


def divisible_by(num: int, den: int) -> bool:
    return den != 0 and num % den == 0


def cast_tuple(x: Any, length: int) -> tuple:
    """An int/None becomes a tuple of ``length`` copies; a sequence is checked for length."""
    if isinstance(x, (list, tuple)):
        if len(x) != length:
            raise ValueError(f"expected {length} values, got {len(x)}: {tuple(x)}")
        return tuple(x)
    return (x,) * length


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and for directories (the caller creates whatever it wants at the
    temporary path). A crash or exception leaves ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.rmdir()  # the caller decides whether it is a file or a directory
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            # replace a directory: move the old one aside first, then swap
            old = path.with_name(f".{path.name}.old")
            _rm(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _rm(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _rm(tmp)


def _rm(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
