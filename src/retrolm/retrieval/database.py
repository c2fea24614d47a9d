"""Opening a built retrieval database: arrays, search, and RETRO's retrieved tokens.

Notation: N chunks, m = chunk size, K stored neighbour columns, Q queries, k results.
The retrieved value of a neighbour is the neighbour chunk followed by its
continuation, the next chunk of the *same* document (padding at a document end):
2m tokens, as ``RETRO(seq, retrieved (b, l, k, 2m), neighbour_mask=mask)`` takes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from retrolm.errors import IncompatibleError
from retrolm.retrieval import chunking
from retrolm.retrieval.build import BuildConfig, build_database
from retrolm.retrieval.encoder import (
    FrozenEncoder,
    check_encoder_identity,
    default_encoder_path,
    encoder_name,
    sha256_file,
    weights_file,
)
from retrolm.retrieval.index import IndexSpec, Searcher, load_index
from retrolm.retrieval.neighbours import search_excluding
from retrolm.retrieval.store import FORMAT, FORMAT_VERSION, MANIFEST, open_array, read_manifest
from retrolm.retrieval.tokenizer import LMTokenizer

__all__ = ["RetrievalDatabase", "BuildConfig", "build_database"]


class RetrievalDatabase:
    """A complete database directory; open with ``RetrievalDatabase.open(path)``."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        encoder: FrozenEncoder | Path | None = None,
        tokenizer: LMTokenizer | None = None,
    ):
        self.path, self.manifest = path, manifest
        arrays = manifest["arrays"]
        self.chunks = open_array(path, arrays["chunks"])  # (N, m+1), read-only
        self.doc_ids = open_array(path, arrays["doc_ids"])  # (N,) int32
        self.seq_starts = open_array(path, arrays["seq_starts"])  # (S,) int64
        self.neighbours = open_array(path, arrays["neighbours"])  # (N, K) int32, -1 = none
        self.neighbour_dists = open_array(path, arrays["neighbour_dists"])  # (N, K) float32
        self.embeddings = open_array(path, arrays["embeddings"])  # (N, d) float32
        # a FrozenEncoder given by the caller, else loaded on first use from the folder the
        # caller named (Path) or, by default, the one the manifest records
        self._encoder = encoder if isinstance(encoder, FrozenEncoder) else None
        self._encoder_path = Path(encoder) if isinstance(encoder, Path) else None
        self.tokenizer = tokenizer or LMTokenizer.from_file(path / manifest["tokenizer"]["file"])

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        encoder: FrozenEncoder | str | os.PathLike | None = None,
        tokenizer: LMTokenizer | str | os.PathLike | None = None,
        chunk_size: int | None = None,
    ) -> RetrievalDatabase:
        """Open a complete database; each given requirement must match what it was built with.

        Args:
            encoder: a ``FrozenEncoder`` or model folder the caller will query with.
            tokenizer: the ``LMTokenizer`` (or tokenizer.json) the caller's tokens come from.
            chunk_size: the caller's m.
        Raises ``IncompatibleError`` (one line, naming both sides) on a mismatch or an
        unfinished database, ``FileNotFoundError`` if ``path`` is not a database.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(
                f"{str(path)!r} is not a retrieval database (no {MANIFEST}): "
                "build one with `retrolm db build TEXT_DIR DB_DIR`"
            )
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise IncompatibleError(
                f"database {str(path)!r} has format {manifest.get('format')} "
                f"v{manifest.get('format_version')}, this retrolm reads {FORMAT} "
                f"v{FORMAT_VERSION}: rebuild it"
            )
        if "adding" in manifest:
            raise IncompatibleError(
                f"database {str(path)!r} is in the middle of `retrolm db add` (or one was "
                "interrupted there): rerun that `retrolm db add` to finish it"
            )
        if not manifest.get("complete"):
            raise IncompatibleError(
                f"database {str(path)!r} is incomplete (stages done: "
                f"{', '.join(manifest.get('stages_done', [])) or 'none'}): "
                "rerun `retrolm db build` with the same arguments to finish it"
            )
        if chunk_size is not None and chunk_size != manifest["chunk_size"]:
            raise IncompatibleError(
                f"database {str(path)!r} has chunk size {manifest['chunk_size']}, "
                f"but chunk size {chunk_size} was requested: rebuild with --chunk-size {chunk_size}"
            )
        tok = _check_tokenizer(path, manifest, tokenizer)
        enc = _check_encoder(path, manifest, encoder)
        return cls(path, manifest, enc, tok)

    # ---- sizes --------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return int(self.manifest["num_chunks"])

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def num_neighbours(self) -> int:
        """k the model retrieves; ``neighbours`` holds K = k + extra columns."""
        return int(self.manifest["neighbours"])

    def __len__(self) -> int:
        return self.num_chunks

    # ---- documents ----------------------------------------------------------------------
    @cached_property
    def documents(self) -> list[dict]:
        return chunking.read_documents(self.path)

    def doc_path(self, doc_id: int) -> str:
        """The source file of a document, as found under the build's text folder (or the
        folder of the ``retrolm db add`` that brought it)."""
        doc = self.documents[int(doc_id)]
        return str(Path(doc.get("text_dir", self.manifest["text_dir"])) / doc["path"])

    # ---- search -------------------------------------------------------------------------
    @property
    def encoder(self) -> FrozenEncoder:
        """The build's encoder with the build's recipe (loaded on first use).

        Whoever queries the database (``db query``, eval, generate) comes through here: the
        weights found at the recorded path must hash to the manifest's sha256, else another
        model there would give other neighbours silently (``IncompatibleError``).
        """
        st = self.manifest["encoder"]
        if self._encoder is None:
            folder = self._encoder_path or Path(st["path"])
            enc = FrozenEncoder(
                folder, pooling=st["pooling"], dtype=st["dtype"], max_length=st["max_length"]
            )
            check_encoder_identity(
                enc,
                st,
                self.path,
                "put the database's encoder back at that path (`retrolm db query --encoder "
                "PATH` or RetrievalDatabase.open(encoder=PATH) use a copy elsewhere), or "
                "rebuild the database with this encoder (`retrolm db build TEXT_DIR DB_DIR "
                "--encoder PATH --restart`)",
            )
            self._encoder = enc
        elif self._encoder.dtype != st["dtype"]:
            self._encoder.set_dtype(st["dtype"])
        return self._encoder

    @property
    def index_spec(self) -> IndexSpec:
        """The index as built, with any query-time parameters ``set_search`` gave."""
        if "searcher" in self.__dict__:
            return self.searcher.spec
        info = self.manifest["index"]
        spec = IndexSpec(**{k: v for k, v in info.items() if k in IndexSpec.__annotations__})
        return spec.with_search(*self._search_params)

    _search_params: tuple[int | None, int | None] = (None, None)

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Query with ``nprobe`` lists (ivf, ivfpq) or an HNSW beam of ``ef_search`` instead
        of the build's values; None keeps each. Checked against the index kind."""
        self.index_spec.with_search(nprobe, ef_search)  # ValueError before anything changes
        self._search_params = (
            nprobe if nprobe is not None else self._search_params[0],
            ef_search if ef_search is not None else self._search_params[1],
        )
        if "searcher" in self.__dict__:
            self.searcher.set_search(nprobe, ef_search)

    @cached_property
    def searcher(self) -> Searcher:
        spec = self.index_spec
        path = self.path / self.manifest["index"]["file"]
        return Searcher(load_index(path, spec), spec, self.embeddings)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Keys for texts with the build's recipe ``(Q, d)``."""
        return self.encoder.embed(list(texts), self.manifest["config"]["batch_size"])

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest chunks of each text: ids int64 ``(Q, k)`` (−1 = none), squared L2 float32."""
        if isinstance(texts, str):
            raise ValueError("search takes a list of texts; wrap a single text as [text]")
        return self.searcher.search(self.embed(texts), k)

    def search_tokens(
        self,
        chunk_token_ids: np.ndarray | torch.Tensor,
        k: int,
        exclude_doc_ids: Sequence[Sequence[int]] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of LM-token chunks ``(Q, m)``: decoded to text, embedded, searched.

        ``exclude_doc_ids``: per query, document ids whose chunks may not be returned
        (a ``(Q, E)`` array padded with −1, or a list of lists).
        Returns ids int64 ``(Q, k)`` (−1 = none) and squared L2 distances float32 ``(Q, k)``.
        """
        toks = np.asarray(
            chunk_token_ids.cpu() if torch.is_tensor(chunk_token_ids) else chunk_token_ids
        )
        if toks.ndim != 2 or toks.shape[1] != self.chunk_size:
            raise ValueError(
                f"chunk_token_ids must be (Q, {self.chunk_size}) LM tokens, got shape {toks.shape}"
            )
        x = self.embed(self.tokenizer.decode_batch(toks))
        if exclude_doc_ids is None:
            return self.searcher.search(x, k)
        ex = _pad_rows(exclude_doc_ids, len(toks))  # (Q, E)
        doc_ids = np.asarray(self.doc_ids)

        def excluded(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
            return (doc_ids[ids][:, :, None] == ex[rows][:, None, :]).any(-1)

        ids, dists = search_excluding(self.searcher, x, k, excluded)
        return ids.astype(np.int64), dists

    # ---- values for the model -----------------------------------------------------------
    def retrieved_tokens(self, neighbour_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour ids ``(..., k)`` -> tokens int64 ``(..., k, 2m)`` and mask bool ``(..., k)``.

        Each row is the neighbour chunk then its continuation (the next chunk when it
        belongs to the same document, else padding). Id −1 gives an all-pad row, mask False.
        """
        ids = np.asarray(
            neighbour_ids.cpu() if torch.is_tensor(neighbour_ids) else neighbour_ids, dtype=np.int64
        )
        n, m = self.num_chunks, self.chunk_size
        if ids.size and (ids.max() >= n or ids.min() < -1):
            raise ValueError(
                f"neighbour ids must be in [-1, {n - 1}], got {ids.min()}..{ids.max()}"
            )
        valid = ids >= 0
        cur = np.where(valid, ids, 0).ravel()
        nxt = np.minimum(cur + 1, n - 1)
        doc_ids = np.asarray(self.doc_ids)
        has_next = valid.ravel() & (cur + 1 < n) & (doc_ids[nxt] == doc_ids[cur])
        pad = self.tokenizer.pad_id
        out = np.full((cur.size, 2 * m), pad, dtype=np.int64)
        out[:, :m] = self.chunks[cur, :m]
        out[:, m:] = np.where(has_next[:, None], self.chunks[nxt, :m], pad)
        out[~valid.ravel()] = pad
        tokens = torch.from_numpy(out.reshape(*ids.shape, 2 * m))
        return tokens, torch.from_numpy(valid)

    def __repr__(self) -> str:
        return (
            f"RetrievalDatabase({str(self.path)!r}, chunks={self.num_chunks}, "
            f"m={self.chunk_size}, K={self.neighbours.shape[1]})"
        )


def _pad_rows(rows, q: int) -> np.ndarray:
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        out = rows.astype(np.int64)
    else:
        rows = [list(r) for r in rows]
        width = max([len(r) for r in rows] + [1])
        out = np.full((len(rows), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
    if len(out) != q:
        raise ValueError(f"exclude_doc_ids has {len(out)} rows for {q} queries")
    return out


def _check_tokenizer(path: Path, manifest: dict, tokenizer) -> LMTokenizer | None:
    if tokenizer is None:
        return None
    tok = tokenizer if isinstance(tokenizer, LMTokenizer) else LMTokenizer.from_file(tokenizer)
    built = manifest["tokenizer"]["hash"]
    if tok.hash != built:
        raise IncompatibleError(
            f"database {str(path)!r} was built with LM tokenizer {built[:12]} "
            f"(vocab {manifest['tokenizer']['vocab_size']}), but tokenizer {tok.hash[:12]} "
            f"(vocab {tok.vocab_size}) was requested: use the database's tokenizer.json or rebuild"
        )
    return tok


def _check_encoder(path: Path, manifest: dict, encoder) -> FrozenEncoder | Path | None:
    if encoder is None:
        return None
    built = manifest["encoder"]
    if isinstance(encoder, FrozenEncoder):
        name, sha = encoder.name, encoder.weights_sha256
        ours = (encoder.pooling, encoder.max_length)
        if ours != (built["pooling"], built["max_length"]):
            raise IncompatibleError(
                f"database {str(path)!r} keys use pooling={built['pooling']} and max_length="
                f"{built['max_length']}, but the encoder given has pooling={ours[0]} and "
                f"max_length={ours[1]}: build the encoder with the database's recipe"
            )
    else:
        folder = Path(encoder) if encoder else default_encoder_path()
        name, sha = encoder_name(folder), sha256_file(weights_file(folder))
    if sha != built["sha256"]:
        raise IncompatibleError(
            f"database {str(path)!r} was built with encoder {built['name']} "
            f"(sha256 {built['sha256'][:12]}), but encoder {name} (sha256 {sha[:12]}) "
            "was requested: query with the build's encoder or rebuild with --encoder"
        )
    return encoder if isinstance(encoder, FrozenEncoder) else folder
