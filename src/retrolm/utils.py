"""Small helpers shared by every module (defined once, imported everywhere)."""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

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


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's per-field docstrings (the string literal under each field), by name:
    the one place a config documents its fields, read back for ``--help`` texts."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs, last = {}, None
    for node in tree.body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[last], last = " ".join(str(node.value.value).split()), None
        else:
            last = None
    return docs


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and for new directories (the caller creates whatever it wants at the
    temporary path). A crash or exception leaves ``path`` untouched. An existing
    directory is refused: replacing one takes two renames, and a kill between them leaves
    neither there (checkpoints use versioned folders behind a pointer file instead).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory: atomic_path replaces files and creates directories, "
            "but cannot replace a directory atomically"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.rmdir()  # the caller decides whether it is a file or a directory
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        _rm(tmp)


def move_aside(folder: Path) -> Path:
    """Rename ``folder`` to a hidden ``.tmp`` sibling (the caller deletes it), so that a kill
    while it is being deleted never leaves a partial folder under its name."""
    folder = Path(folder)
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", suffix=".tmp", dir=folder.parent))
    os.replace(folder, trash)  # onto the empty folder mkdtemp made
    fsync_path(folder.parent)
    return trash


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that it serialises as
    strict JSON (``json.dumps`` would write ``NaN``, which strict parsers such as ``jq`` and
    JavaScript's ``JSON.parse`` reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(
    path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """Write ``obj`` as strict JSON (``json_safe``) atomically: a kill mid-write leaves the
    previous file (or none), never a truncated one."""
    text = json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """``fig.savefig(path)`` atomically, in the format of ``path``'s suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _rm(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's (its entries': renames) contents to disk; best effort
    (some file systems cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@functools.lru_cache(maxsize=64)
def _parameters(fn: Callable[..., Any]) -> frozenset[str] | None:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        return None


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` (a function, method or ``module.forward``) takes the keyword ``name``.
    Looked up once per function (generation asks on every decoded token, and
    ``inspect.signature`` costs ~17 us)."""
    params = _parameters(getattr(fn, "__func__", fn))
    return params is not None and name in params
