"""Documents -> LM tokens -> chunk rows, streamed to memmaps (RETRO paper §2.3).

Notation: m = chunk size, N = number of chunks, l = seq_len / m chunks per sequence.

- Documents are the files under ``text_dir`` matching ``glob``, in sorted order of
  their relative path (stable across machines).
- Each document's tokens end with ``<eos>``; chunking is *within* a document: rows of
  m tokens, plus one extra column holding the next token of the same document (the
  first token of its next chunk), or ``<pad>`` after the last chunk. The last chunk of
  a document is right-padded with ``<pad>``; no chunk spans two documents.
- ``chunks`` ``(N, m+1)`` (uint16 when the vocabulary fits, else int32), ``doc_ids``
  ``(N,)`` int32, ``documents.jsonl`` (one line per document: relative path, bytes,
  chars, first chunk, chunk count) and ``seq_starts`` (chunk indices where training
  sequences of l chunks start along the packed chunk stream; only whole sequences;
  a sequence may span documents, so the dataset must filter neighbours from every
  document it touches).

Bad input policy (counted in the build report, never a crash): empty files (no bytes,
or only whitespace) and binary files (a NUL byte in their first 8 KiB) are skipped;
invalid UTF-8 is decoded with U+FFFD replacement. Files larger than ``PIECE_BYTES``
are read and tokenized in pieces cut after a newline, so memory stays constant.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retrolm.retrieval.tokenizer import EOS_ID, PAD_ID, LMTokenizer
from retrolm.utils import atomic_path, write_json

log = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # files above this are streamed in pieces of about this size
BLOCK_BYTES = 8 << 20  # a resumable chunking block: files until this many bytes are read
SNIFF_BYTES = 8 << 10  # a NUL byte in the first 8 KiB marks a binary file

CHUNKS_FILE, DOC_IDS_FILE, DOCS_FILE, SEQ_STARTS_FILE = (
    "chunks.bin",
    "doc_ids.bin",
    "documents.jsonl",
    "seq_starts.bin",
)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def list_documents(text_dir: str | os.PathLike, glob: str = "**/*.txt") -> list[Path]:
    """Files under ``text_dir`` matching ``glob``, sorted by relative path."""
    root = Path(text_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"text folder {str(root)!r} does not exist or is not a folder")
    files = [p for p in root.glob(glob) if p.is_file()]
    if not files:
        raise ValueError(
            f"no file in text folder {str(root)!r} matches glob {glob!r}: "
            "check the folder or pass --glob (e.g. '**/*.md')"
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# ---- reading ------------------------------------------------------------------------------
_replaced = [0]  # U+FFFD substitutions made by the decoder below (reset per file)


def _count_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += 1
    return "\ufffd", err.end


codecs.register_error("retrolm-count-replace", _count_replace)


@dataclass
class Document:
    """One readable file: its pieces of text (a single piece unless the file is large)."""

    path: Path
    size: int
    pieces: Iterator[str]
    invalid_utf8: bool = False  # set once the pieces are consumed
    chars: int = 0  # counted by ``document_rows`` as it reads the pieces
    tokens: int = 0  # likewise, with the <eos>


def read_document(path: Path) -> Document | str:
    """A ``Document``, or the reason it is skipped: ``"empty"`` or ``"binary"``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\x00" in head:
        return "binary"
    if size <= SNIFF_BYTES and not head.strip():
        return "empty"
    doc = Document(path, size, iter(()))
    doc.pieces = _pieces(path, doc)
    return doc


def _pieces(path: Path, doc: Document) -> Iterator[str]:
    """Decoded text in pieces of ~PIECE_BYTES cut after a newline (a split never loses text)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="retrolm-count-replace")
    _replaced[0] = 0
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(PIECE_BYTES)
            text = carry + decoder.decode(raw, final=not raw)
            if not raw:
                break
            cut = text.rfind("\n") + 1 or len(text)
            piece, carry = text[:cut], text[cut:]
            if piece:
                yield piece
    doc.invalid_utf8 = _replaced[0] > 0
    if text:
        yield text


def iter_texts(paths: list[Path]) -> Iterator[str]:
    """Every readable piece of text, in order (the tokenizer's training stream)."""
    for p in paths:
        doc = read_document(p)
        if isinstance(doc, Document):
            yield from doc.pieces


# ---- chunking -----------------------------------------------------------------------------
@dataclass
class ChunkReport:
    """Counts for the build report (all deterministic)."""

    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_binary: int = 0
    invalid_utf8_replaced: int = 0
    bytes: int = 0
    chars: int = 0
    tokens: int = 0  # including one <eos> per document
    chunks: int = 0
    skipped_paths: list[str] = field(default_factory=list)  # the first 20 skipped files


class DocumentChunker:
    """Cuts one document's token stream into ``(m+1)``-wide rows as tokens arrive."""

    def __init__(self, m: int, eos_id: int = EOS_ID, pad_id: int = PAD_ID):
        self.m, self.eos_id, self.pad_id = m, eos_id, pad_id
        self.buf = np.zeros(0, dtype=np.int64)

    def feed(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Append tokens; return the rows whose next token is now known ``(r, m+1)``."""
        self.buf = np.concatenate([self.buf, np.asarray(ids, dtype=np.int64)])
        r = (len(self.buf) - 1) // self.m if len(self.buf) else 0
        if r <= 0:
            return np.zeros((0, self.m + 1), dtype=np.int64)
        rows = np.empty((r, self.m + 1), dtype=np.int64)
        rows[:, : self.m] = self.buf[: r * self.m].reshape(r, self.m)
        rows[:, self.m] = self.buf[self.m : (r + 1) * self.m : self.m]
        self.buf = self.buf[r * self.m :]
        return rows

    def end(self) -> np.ndarray:
        """Append ``<eos>``, flush the rest; the last row is padded and has ``<pad>`` next."""
        rows = self.feed([self.eos_id])
        last = np.full((1, self.m + 1), self.pad_id, dtype=np.int64)
        last[0, : len(self.buf)] = self.buf
        self.buf = np.zeros(0, dtype=np.int64)
        return np.concatenate([rows, last])


def document_rows(doc: Document, tokenizer: LMTokenizer, m: int) -> Iterator[np.ndarray]:
    """One document's tokens (ending with ``<eos>``) as ``(r, m+1)`` rows, yielded as they
    are cut (``DocumentChunker``): no row spans two documents, and the +1 column is the
    next token of the same document (``<pad>`` after its end). Counts ``doc.chars`` and
    ``doc.tokens``. The database's chunks and a text run's training windows both come
    from here."""
    chunker = DocumentChunker(m, tokenizer.eos_id, tokenizer.pad_id)
    for piece in doc.pieces:
        ids = tokenizer.encode(piece)
        doc.chars += len(piece)
        doc.tokens += len(ids)
        yield chunker.feed(ids)
    doc.tokens += 1
    yield chunker.end()


def _skipped(rep: ChunkReport, rel: str, reason: str) -> None:
    """Count a file the policy skips (``reason``: "empty" or "binary")."""
    setattr(rep, f"skipped_{reason}", getattr(rep, f"skipped_{reason}") + 1)
    if len(rep.skipped_paths) < 20:
        rep.skipped_paths.append(f"{rel} ({reason})")


def corpus_rows(
    paths: list[Path], root: Path, tokenizer: LMTokenizer, m: int
) -> tuple[np.ndarray, np.ndarray, ChunkReport]:
    """Every document of ``paths`` as rows in memory, by ``document_rows`` under the same
    skip policy as a build: ``(rows (N, m+1) int64, doc_ids (N,) int64, report)``."""
    rep = ChunkReport()
    rows: list[np.ndarray] = []
    doc_ids: list[np.ndarray] = []
    for path in paths:
        rep.files += 1
        doc = read_document(path)
        if not isinstance(doc, Document):
            _skipped(rep, path.relative_to(root).as_posix(), doc)
            continue
        n = 0
        for r in document_rows(doc, tokenizer, m):
            rows.append(r)
            doc_ids.append(np.full(len(r), rep.documents, dtype=np.int64))
            n += len(r)
        _count(rep, doc, n)
    if rep.chunks == 0:
        raise ValueError(
            f"no text in the {rep.files} file(s) of {str(root)!r}: all are empty or binary "
            f"({rep.skipped_empty} empty, {rep.skipped_binary} binary)"
        )
    return np.concatenate(rows), np.concatenate(doc_ids), rep


def _count(rep: ChunkReport, doc: Document, chunks: int) -> None:
    """Add one read document (its ``chunks`` rows) to the report."""
    rep.documents += 1
    rep.chunks += chunks
    rep.tokens += doc.tokens
    rep.bytes += doc.size
    rep.chars += doc.chars
    rep.invalid_utf8_replaced += int(doc.invalid_utf8)


@dataclass
class _ChunkState:
    """Where a chunking run stands after its last finished block (saved as JSON)."""

    files_done: int = 0
    docs_bytes: int = 0  # size of documents.jsonl
    report: ChunkReport = field(default_factory=ChunkReport)


def chunk_corpus(
    paths: list[Path],
    root: Path,
    db_dir: Path,
    tokenizer: LMTokenizer,
    m: int,
    seq_len: int,
    progress_file: Path,
) -> ChunkReport:
    """Write chunks/doc_ids/documents/seq_starts; resumable at block boundaries."""
    dtype = token_dtype(tokenizer.vocab_size)
    state = _load_state(progress_file)
    files = {n: db_dir / n for n in (CHUNKS_FILE, DOC_IDS_FILE, DOCS_FILE)}
    sizes = {
        CHUNKS_FILE: state.report.chunks * (m + 1) * dtype.itemsize,
        DOC_IDS_FILE: state.report.chunks * 4,
        DOCS_FILE: state.docs_bytes,
    }
    for name, f in files.items():  # drop whatever a killed run wrote after its last block
        with open(f, "ab") as h:
            h.truncate(sizes[name])
    rep = state.report
    handles = {n: open(f, "ab") for n, f in files.items()}
    try:
        block_bytes = 0
        bar = tqdm(total=len(paths), initial=state.files_done, desc="chunk", unit="file")
        for i in range(state.files_done, len(paths)):
            block_bytes += _chunk_file(paths[i], root, tokenizer, m, dtype, handles, rep)
            bar.update(1)
            if block_bytes >= BLOCK_BYTES or i + 1 == len(paths):
                for h in handles.values():
                    h.flush()
                    os.fsync(h.fileno())
                state.files_done, state.docs_bytes = i + 1, handles[DOCS_FILE].tell()
                _save_state(progress_file, state)
                block_bytes = 0
        bar.close()
    finally:
        for h in handles.values():
            h.close()
    if rep.chunks == 0:
        raise ValueError(
            f"no text in the {rep.files} file(s) of {str(root)!r}: all are empty or binary "
            f"({rep.skipped_empty} empty, {rep.skipped_binary} binary)"
        )
    l = seq_len // m
    starts = np.arange(0, rep.chunks - l + 1, l, dtype=np.int64)  # whole sequences only
    if len(starts) == 0:
        log.warning("only %d chunks: fewer than one training sequence of %d", rep.chunks, l)
    with atomic_path(db_dir / SEQ_STARTS_FILE) as tmp:
        starts.tofile(tmp)
    return rep


def _chunk_file(path, root, tokenizer, m, dtype, handles, rep: ChunkReport) -> int:
    rep.files += 1
    rel = path.relative_to(root).as_posix()
    doc = read_document(path)
    if not isinstance(doc, Document):
        _skipped(rep, rel, doc)
        return 0
    doc_id, first = rep.documents, rep.chunks
    for rows in document_rows(doc, tokenizer, m):  # (r, m+1), streamed as they are cut
        handles[CHUNKS_FILE].write(rows.astype(dtype).tobytes())
        handles[DOC_IDS_FILE].write(np.full(len(rows), doc_id, dtype=np.int32).tobytes())
        rep.chunks += len(rows)
    meta = {
        "path": rel,
        "bytes": doc.size,
        "chars": doc.chars,
        "first_chunk": first,
        "num_chunks": rep.chunks - first,
        "invalid_utf8": doc.invalid_utf8,
    }
    handles[DOCS_FILE].write((json.dumps(meta) + "\n").encode())
    _count(rep, doc, 0)
    return doc.size


def _load_state(path: Path) -> _ChunkState:
    if not path.is_file():
        return _ChunkState()
    d = json.loads(path.read_text())
    return _ChunkState(d["files_done"], d["docs_bytes"], ChunkReport(**d["report"]))


def _save_state(path: Path, state: _ChunkState) -> None:
    write_json(path, asdict(state), indent=None)


def read_documents(db_dir: Path) -> list[dict]:
    with open(db_dir / DOCS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
