"""RETRO's retrieval database: LM tokenizer, chunk store, frozen encoder, faiss index,
precomputed neighbours. The only part of retrolm that imports faiss, transformers or
tokenizers (``import retrolm`` never loads this package).

The names below load on first use: a family without retrieval reads its text through
``retrieval.tokenizer`` and ``retrieval.chunking`` (``tokenizers`` only) and never loads
faiss or transformers."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "BuildConfig": "build",
    "build_database": "build",
    "check_index": "check",
    "add_documents": "grow",
    "NeighbourSet": "query",
    "query_corpus": "query",
    "DocumentChunker": "chunking",
    "list_documents": "chunking",
    "RetrievalDatabase": "database",
    "FrozenEncoder": "encoder",
    "IndexSpec": "index",
    "Searcher": "index",
    "choose_index": "index",
    "EOS_ID": "tokenizer",
    "PAD_ID": "tokenizer",
    "LMTokenizer": "tokenizer",
}

__all__ = sorted(_NAMES, key=str.lower)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
