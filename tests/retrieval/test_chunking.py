"""Chunk layout: within-document rows of m tokens + next token, padding, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrolm.retrieval import build_database, chunking
from retrolm.retrieval.chunking import DocumentChunker, list_documents, token_dtype
from retrolm.retrieval.tokenizer import EOS_ID, PAD_ID, LMTokenizer

from .conftest import module_text


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 11])
def test_document_chunker_layout(n):
    m = 4
    toks = list(range(10, 10 + n))
    ch = DocumentChunker(m)
    rows = np.concatenate([ch.feed(toks[:2]), ch.feed(toks[2:]), ch.end()])  # (r, m+1)
    stream = toks + [EOS_ID]
    assert len(rows) == -(-len(stream) // m)  # ceil: no empty row
    flat = rows[:, :m].ravel()
    assert flat[: len(stream)].tolist() == stream  # tokens in order
    assert (flat[len(stream) :] == PAD_ID).all()  # right padding of the last row only
    assert rows[:-1, m].tolist() == rows[1:, 0].tolist()  # next token = next row's first
    assert rows[-1, m] == PAD_ID  # nothing follows the document


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_layout_and_round_trip_on_real_text(db, corpus_dir):
    m = db.chunk_size
    assert db.chunks.shape == (db.num_chunks, m + 1) and db.chunks.dtype == np.uint16
    assert not db.chunks.flags.writeable
    docs = db.documents
    paths = list_documents(corpus_dir)
    assert [d["path"] for d in docs] == [p.relative_to(corpus_dir).as_posix() for p in paths]
    assert np.all(np.diff(db.doc_ids) >= 0)  # documents in order, chunks contiguous
    for doc_id, d in enumerate(docs):
        rows = np.asarray(db.chunks[d["first_chunk"] : d["first_chunk"] + d["num_chunks"]])
        assert (db.doc_ids[d["first_chunk"] : d["first_chunk"] + d["num_chunks"]] == doc_id).all()
        stream = rows[:, :m].ravel().tolist()
        end = len(stream) - stream[::-1].index(EOS_ID) - 1  # the document's <eos>
        assert all(t == PAD_ID for t in stream[end + 1 :])
        text = (corpus_dir / d["path"]).read_text(encoding="utf-8")
        assert stream[:end] == db.tokenizer.encode(text)
        assert db.tokenizer.decode(stream) == text  # lossless round trip
        assert rows[:-1, m].tolist() == rows[1:, 0].tolist() and rows[-1, m] == PAD_ID
        assert d["chars"] == len(text) and d["bytes"] == len(text.encode())
    l = db.manifest["seq_len"] // m
    assert db.seq_starts.tolist() == list(range(0, db.num_chunks - l + 1, l))


def test_large_file_is_streamed_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(chunking, "PIECE_BYTES", 1000)  # force many pieces
    text = module_text("difflib") + "tail without newline ünïcödé"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    doc = chunking.read_document(tmp_path / "big.txt")
    pieces = list(doc.pieces)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert max(len(p.encode()) for p in pieces) < 2000


def test_bad_files_are_skipped_or_replaced_and_counted(tmp_path, tiny_config):
    src = tmp_path / "txt"
    src.mkdir()
    (src / "a_good.txt").write_text(module_text("bisect"), encoding="utf-8")
    (src / "b_empty.txt").write_bytes(b"")
    (src / "c_blank.txt").write_bytes(b"  \n\n\t \n")
    (src / "d_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (src / "e_latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 3)
    (src / "f_cut.txt").write_bytes("tail is cut: é".encode()[:-1])
    m = build_database(src, tmp_path / "db", tiny_config)
    rep = m["report"]["chunk"]
    assert (rep["files"], rep["documents"]) == (6, 3)
    assert (rep["skipped_empty"], rep["skipped_binary"], rep["invalid_utf8_replaced"]) == (2, 1, 2)
    assert any("d_binary.txt (binary)" in p for p in rep["skipped_paths"])
    docs = [json.loads(line) for line in open(tmp_path / "db" / "documents.jsonl")]
    assert [d["invalid_utf8"] for d in docs] == [False, True, True]
    from retrolm.retrieval import RetrievalDatabase

    db = RetrievalDatabase.open(tmp_path / "db")
    d = docs[1]
    rows = db.chunks[d["first_chunk"] : d["first_chunk"] + d["num_chunks"], :-1]
    assert db.tokenizer.decode(rows.ravel()) == "caf\ufffd cr\ufffdme br\ufffdl\ufffde\n" * 3


def test_folder_and_glob_errors(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="text folder .*missing.* does not exist"):
        build_database(tmp_path / "missing", tmp_path / "db", tiny_config)
    (tmp_path / "empty").mkdir()
    no_match = r"no file in text folder .*empty.* matches glob '\*\*/\*\.txt'"
    with pytest.raises(ValueError, match=no_match):
        build_database(tmp_path / "empty", tmp_path / "db", tiny_config)
    (tmp_path / "empty" / "x.md").write_text("hello")
    with pytest.raises(ValueError, match=r"matches glob '\*\.rst'"):
        list_documents(tmp_path / "empty", "*.rst")
    (tmp_path / "empty" / "y.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no text in the 1 file"):
        build_database(tmp_path / "empty", tmp_path / "db2", tiny_config)


def test_tokenizer_file_is_used(tmp_path, corpus_dir, tiny_config):
    from dataclasses import replace

    tok = LMTokenizer.train([module_text("json")], vocab_size=400)
    tok.save(tmp_path / "tok.json")
    src = tmp_path / "one"
    src.mkdir()
    (src / "x.txt").write_text(module_text("heapq"))
    config = replace(tiny_config, tokenizer=str(tmp_path / "tok.json"))
    m = build_database(src, tmp_path / "db", config)
    assert m["tokenizer"]["hash"] == tok.hash and m["tokenizer"]["vocab_size"] == 400
