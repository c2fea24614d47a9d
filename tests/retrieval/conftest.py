"""Shared fixtures: a small real-text corpus, tiny stand-in encoders, one built database."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest

# Real prose and code comments, written by people: the docstrings of stdlib modules.
CORPUS_MODULES = [
    "json",
    "csv",
    "textwrap",
    "string",
    "fractions",
    "heapq",
    "bisect",
    "shlex",
    "difflib",
    "calendar",
    "statistics",
    "contextlib",
]

# the RETRO model_config of the tiny CLI runs on a TINY_DB database (test_cli, test_serve,
# test_lm_eval)
TINY_RETRO = {
    "chunk_size": 16,
    "max_seq_len": 64,
    "dec_dim": 32,
    "dec_depth": 2,
    "dec_cross_attn_layers": [2],
    "enc_dim": 32,
    "enc_depth": 1,
    "heads": 2,
    "dim_head": 16,
}
TINY_DB = dict(
    chunk_size=16,
    seq_len=64,
    vocab_size=1000,
    embed_dtype="fp32",
    neighbours=2,
    extra_neighbours=3,
    block_size=128,
    batch_size=32,
)


def module_text(name: str) -> str:
    """A module's documentation: its docstring and those of its public members."""
    mod = __import__(name)
    parts = [inspect.getdoc(mod) or ""]
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        doc = inspect.getdoc(getattr(mod, attr))
        if doc and getattr(getattr(mod, attr), "__module__", name) == name:
            parts.append(f"{attr}\n{'=' * len(attr)}\n{doc}")
    return "\n\n".join(parts) + "\n"


def write_corpus(root: Path, modules=CORPUS_MODULES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(modules):
        sub = root / ("lib" if i % 2 else "docs")
        sub.mkdir(exist_ok=True)
        (sub / f"{name}.txt").write_text(module_text(name), encoding="utf-8")
    return root


def make_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) with the real MiniLM WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from retrolm.retrieval.encoder import default_encoder_path

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).eval().save_pretrained(folder)
    shutil.copy(default_encoder_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session", autouse=True)
def _one_faiss_thread():
    """faiss's OpenMP threads spin; on 2 shared cores that makes training 10-25x slower."""
    import faiss

    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"), seed=0)


@pytest.fixture(scope="session")
def other_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("other_encoder"), seed=1)


@pytest.fixture(scope="session")
def tiny_config(tiny_encoder):
    from retrolm.retrieval import BuildConfig

    return BuildConfig(encoder=str(tiny_encoder), **TINY_DB)


@pytest.fixture(scope="session")
def built_db(tmp_path_factory, corpus_dir, tiny_config) -> Path:
    from retrolm.retrieval import build_database

    db = tmp_path_factory.mktemp("built") / "db"
    build_database(corpus_dir, db, tiny_config)
    return db


@pytest.fixture(scope="session")
def db(built_db):
    from retrolm.retrieval import RetrievalDatabase

    return RetrievalDatabase.open(built_db)
