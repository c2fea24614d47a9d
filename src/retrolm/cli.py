"""The ``retrolm`` command line.

Each sub-command lives in its own module and registers itself here through
``register(subparsers)``; the module's parser sets ``func`` to a plain function
``run(args) -> int``. Only the CLI prints; library code logs.

Errors a user can cause (``ValueError``, ``FileNotFoundError``, ``RetrolmError``)
are printed as one line, never as a stack trace (``RETROLM_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# sub-command name -> module providing register(subparsers)
COMMANDS: dict[str, str] = {
    "db": "retrolm.retrieval.cli",
    "train": "retrolm.commands.train",
    "eval": "retrolm.commands.evaluate",
    "generate": "retrolm.commands.generate",
    "demo": "retrolm.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrolm",
        description=(
            "Retrieval-enhanced language models: build a database, train, evaluate, generate."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    from retrolm.errors import RetrolmError

    try:
        return int(args.func(args) or 0)
    except (RetrolmError, ValueError, FileNotFoundError) as e:
        if os.environ.get("RETROLM_DEBUG"):
            raise
        print(f"retrolm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retrolm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
