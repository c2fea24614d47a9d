"""Exceptions a user can cause; the CLI prints them as one line."""


class RetrolmError(Exception):
    """Base class for user-facing errors (bad files, incompatible databases or runs)."""


class IncompatibleError(RetrolmError, ValueError):
    """A database, run directory or checkpoint does not match what the caller asked for."""
