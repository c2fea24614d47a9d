"""The ``retrolm`` command line, the only code that prints: ``main.py`` the entry point and
its error reporting, one module per sub-command (``db``, ``train``, ``eval``, ``generate``,
``demo``), each a thin layer over the library functions it calls."""

from retrolm.cli.main import build_parser, describe_os_error, entry, main, one_line

__all__ = ["build_parser", "describe_os_error", "entry", "main", "one_line"]
