"""The ``retrolm`` command line.

Each sub-command lives in its own module and registers itself here through
``register(subparsers)``; the module's parser sets ``func`` to a plain function
``run(args) -> int``. Only the CLI prints; library code logs.

Errors a user or the machine can cause (``ValueError``, ``RetrolmError``, any ``OSError``
such as a full disk, and the I/O failures that libraries raise under other types) are
printed as one line naming the file or folder and the fix, with exit status 2, never as a
stack trace (``--debug`` or ``RETROLM_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys

# sub-command name -> module providing register(subparsers)
COMMANDS: dict[str, str] = {
    "db": "retrolm.cli.db",
    "train": "retrolm.cli.train",
    "eval": "retrolm.cli.eval",
    "generate": "retrolm.cli.generate",
    "demo": "retrolm.cli.demo",
    "export": "retrolm.cli.export",
    "serve": "retrolm.cli.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrolm",
        description=(
            "Retrieval-enhanced language models: build a database, train, evaluate, generate."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the stack trace of an error instead of its one-line message "
        "(same as RETROLM_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a command whose module is not part of this build
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from retrolm.errors import RetrolmError, as_os_error

    debug = args.debug or bool(os.environ.get("RETROLM_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"retrolm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, (RetrolmError, ValueError)) and not isinstance(e, OSError):
            message = str(e)
        elif (os_error := as_os_error(e)) is not None:
            message = describe_os_error(os_error, _output_folder(args))
        else:
            raise  # a bug: the traceback is what a report needs
        if debug:
            raise
        print(f"retrolm {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2


def entry() -> None:
    """The process entry (the ``retrolm`` script, ``python -m retrolm``, ``torchrun -m
    retrolm``): exits with ``main()``'s status. A process of a multi-process job
    (``WORLD_SIZE`` > 1) leaves once its output is flushed, without the interpreter's
    teardown: gloo's threads died there now and then in std::terminate (SIGABRT after all
    the work was done), which turned a finished job into a failed one."""
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def one_line(message: str) -> str:
    """A message with its line breaks (e.g. from a library's multi-line error) folded."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


# errno -> what the user can do about it
_FIXES = {
    errno.ENOSPC: "free disk space (or choose a folder on another disk) and rerun the same "
    "command: builds and training resume from what was saved",
    errno.EDQUOT: "free space within your disk quota and rerun the same command",
    errno.EFBIG: "raise the file size limit (ulimit -f) or choose another folder, then rerun",
    errno.EACCES: "check the permissions, or choose a folder you can write to",
    errno.EPERM: "check the permissions, or choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.EIO: "check the disk (it may be full or failing) and rerun the same command",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a file stands where a folder is expected",
    errno.EISDIR: "check the path: a folder stands where a file is expected",
}


def describe_os_error(e: OSError, where: str | None = None) -> str:
    """One line for an ``OSError``: what failed, on which file (or under which folder, when
    the error names none, as ``write()`` errors do), and what to do about it."""
    if e.strerror is None:  # raised with a message of our own: it already names the fix
        return str(e)
    files = [str(f) for f in (e.filename, e.filename2) if f is not None]
    if files:
        place = " -> ".join(files)
    elif where:
        place = f"while writing under {where}"
    else:
        place = "no file named"
    fix = _FIXES.get(e.errno, "check the file and rerun the same command")
    return f"{e.strerror} ({place}): {fix}"


def _output_folder(args: argparse.Namespace) -> str | None:
    """The folder a command writes to, to locate an I/O error that names no file."""
    for name in ("out", "db_dir", "work"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    return None


if __name__ == "__main__":
    entry()
