"""RETRO's retrieval database: LM tokenizer, chunk store, frozen encoder, faiss index,
precomputed neighbours. The only part of retrolm that imports faiss, transformers or
tokenizers (``import retrolm`` never loads this package)."""

from retrolm.retrieval.build import BuildConfig, build_database
from retrolm.retrieval.chunking import DocumentChunker, list_documents
from retrolm.retrieval.database import RetrievalDatabase
from retrolm.retrieval.encoder import FrozenEncoder
from retrolm.retrieval.index import IndexSpec, Searcher, choose_index
from retrolm.retrieval.tokenizer import EOS_ID, PAD_ID, LMTokenizer

__all__ = [
    "BuildConfig",
    "DocumentChunker",
    "EOS_ID",
    "FrozenEncoder",
    "IndexSpec",
    "LMTokenizer",
    "PAD_ID",
    "RetrievalDatabase",
    "Searcher",
    "build_database",
    "choose_index",
    "list_documents",
]
