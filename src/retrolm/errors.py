"""Exceptions a user can cause; the CLI prints them as one line."""

from __future__ import annotations

import errno
import os
import re


class RetrolmError(Exception):
    """Base class for user-facing errors (bad files, incompatible databases or runs)."""


class IncompatibleError(RetrolmError, ValueError):
    """A database, run directory or checkpoint does not match what the caller asked for."""


class DatabaseError(RetrolmError):
    """A retrieval database or its build failed in faiss or on disk (a corrupt index file,
    an index that cannot be trained); the message names the file and the fix."""


# Rust's std::io::Error (safetensors, tokenizers) ends its text with "(os error N)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer reports a failed write without an errno
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` as an ``OSError`` when it is one, or when a library raised an I/O failure
    under another type (safetensors' ``SafetensorError`` "... (os error 28)" on a full
    disk, torch.save's ``RuntimeError``); None for anything else."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    if m := _RUST_OS_ERROR.search(text):
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
        return OSError(errno.EIO, "a file write failed (the disk may be full)")
    return None
