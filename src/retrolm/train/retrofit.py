"""What ``retrolm train --retrofit BASE`` adds to training: the RETRO-fit model config of a
base for a database (the base's identity, its context length), after checking that the
database was built with the base's tokenizer (``retrolm db build --tokenizer BASE``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retrolm.errors import IncompatibleError


def base_tokenizer_file(base: Any) -> Path:
    """The tokenizer.json a base reads its tokens with (an opened base or its path)."""
    from retrolm.models.retrofit import open_base

    base = open_base(base) if isinstance(base, (str, os.PathLike)) else base
    path = base.tokenizer_file
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"base {base.path} has no tokenizer.json (looked for {path}); RETRO-fit needs the "
            "tokenizer the base was trained with"
        )
    return Path(path)


def base_tokenizer_hash(base: Any) -> str:
    """The identity (``LMTokenizer.hash``) of the tokenizer an opened base reads."""
    if base.tokenizer_hash is not None:
        return base.tokenizer_hash
    from retrolm.retrieval.tokenizer import LMTokenizer

    return LMTokenizer.from_file(base_tokenizer_file(base)).hash


def check_tokenizer(base: Any, db: Any) -> None:
    """One line (IncompatibleError) when the database's tokenizer is not the base's."""
    have = db.tokenizer.hash
    want = base_tokenizer_hash(base)
    if have != want:
        raise IncompatibleError(
            f"database {getattr(db, 'path', '')} was built with tokenizer {have[:12]}, but base "
            f"{base.path} reads tokenizer {want[:12]}: rebuild it with `retrolm db build TEXT "
            f"DB --tokenizer {base.path}`"
        )


def retrofit_model_config(
    base_path: str | os.PathLike, db: Any, values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``model_config`` of a RETRO-fit run of ``base_path`` on ``db`` (a database, opened
    or its directory): ``values`` (cca_layers, unfreeze, encoder sizes, ...) with the base's
    path and content hash, and ``max_seq_len`` within the base's context."""
    from retrolm.models.retrofit import open_base

    if isinstance(db, (str, os.PathLike)):
        from retrolm.retrieval import RetrievalDatabase

        db = RetrievalDatabase.open(db)
    base = open_base(base_path)
    check_tokenizer(base, db)
    out = dict(values or {})
    m = int(db.chunk_size)
    longest = base.max_positions // m * m
    if longest < m:
        raise ValueError(f"base {base.path} reads {base.max_positions} positions, under one chunk")
    out["max_seq_len"] = min(int(out.get("max_seq_len") or longest), longest)
    out.update(base=str(Path(base_path).resolve()), base_hash=base.content_hash())
    return out
