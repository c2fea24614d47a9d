"""Command-line flags made from a config dataclass: one ``--flag`` per field, its help the
field's docstring (``utils.field_docs``) and its default."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from retrolm.utils import field_docs


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    types: dict[str, type] | None = None,
    *,
    defaults: bool = True,
    choices: dict[str, Any] | None = None,
) -> None:
    """``--name`` for each field of ``cls`` (only those in ``types``, in its order and of its
    types, when given; else every field, ``int`` or ``str``). ``defaults=False``: every flag
    defaults to None (the caller merges it over a config file); the help names the field's
    default either way."""
    docs = field_docs(cls)
    by_name = {f.name: f for f in fields(cls)}
    for name in types if types is not None else by_name:
        f = by_name[name]
        default = f.default if f.default is not MISSING else None
        typ = types[name] if types is not None else (int if f.type in ("int", int) else str)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=typ,
            dest=name,
            default=default if defaults else None,
            choices=(choices or {}).get(name),
            help=f"{docs.get(name, '')} (default: {default})",
        )
