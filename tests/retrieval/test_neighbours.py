"""Neighbour table properties and the retrieved-token values RETRO consumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrolm.retrieval.index import Searcher, build_index, choose_index
from retrolm.retrieval.neighbours import neighbours_block
from retrolm.retrieval.tokenizer import PAD_ID


def test_table_properties(db):
    nb = np.asarray(db.neighbours)  # (N, K)
    doc = np.asarray(db.doc_ids)
    n, k = nb.shape
    assert nb.dtype == np.int32 and k == db.manifest["num_neighbour_columns"] == 2 + 3
    assert db.num_neighbours == 2
    rows = np.arange(n)[:, None]
    valid = nb >= 0
    assert not (nb == rows).any()  # never itself
    assert not (valid & (doc[np.maximum(nb, 0)] == doc[:, None])).any()  # never its document
    assert not (~valid[:, :-1] & valid[:, 1:]).any()  # -1 only as trailing padding
    other = n - np.bincount(doc)[doc]  # chunks in other documents
    assert (valid.sum(1) == np.minimum(other, k)).all()  # -1 only when justified (exact index)
    d = np.asarray(db.neighbour_dists)
    assert np.all(np.diff(np.where(valid, d, np.inf), axis=1) >= 0)  # sorted by distance


def test_equals_brute_force_filtered_top_k(db):
    emb = np.asarray(db.embeddings, dtype=np.float64)
    doc = np.asarray(db.doc_ids)
    q = np.arange(0, db.num_chunks, 37)
    d2 = ((emb[q, None] - emb[None]) ** 2).sum(-1)  # (Q, N)
    d2[doc[q, None] == doc[None]] = np.inf
    ref = np.sort(d2, axis=1)[:, : db.neighbours.shape[1]]
    np.testing.assert_allclose(db.neighbour_dists[q], ref, atol=1e-4)


def test_minus_one_when_other_documents_run_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    doc_ids = np.array([0, 0, 0, 0, 0, 1, 1, 2], dtype=np.int32)
    spec = choose_index(8, 16)
    ids, dists = neighbours_block(Searcher(build_index(spec, x), spec, x), x, doc_ids, 0, 8, 6)
    assert (ids[:5, :3] >= 0).all() and (ids[:5, 3:] == -1).all()  # doc 0 sees 3 others
    assert (ids[5:7, :6] >= 0).all()  # doc 1 sees 6 others
    assert (ids[7, :6] >= 0).all() and np.isinf(dists[ids < 0]).all()


def test_big_own_document_is_searched_past():
    # one document of near-identical chunks hides the only other document from a short search
    x = np.ones((300, 8), dtype=np.float32) + 1e-3 * np.arange(300)[:, None]
    x = np.concatenate([x, -x[:2]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    doc_ids = np.array([0] * 300 + [1, 2], dtype=np.int32)
    spec = choose_index(len(x), 8)
    ids, _ = neighbours_block(Searcher(build_index(spec, x), spec, x), x, doc_ids, 0, 3, 2)
    assert sorted(ids[0].tolist()) == [300, 301]


def test_retrieved_tokens_neighbour_plus_continuation(db):
    m = db.chunk_size
    doc = np.asarray(db.doc_ids)
    mid = int(np.flatnonzero(np.diff(doc) == 0)[0])  # a chunk followed by its own document
    last_of_doc = int(np.flatnonzero(np.diff(doc))[0])  # last chunk of the first document
    ids = np.array([[[mid, last_of_doc, -1], [db.num_chunks - 1, 5, -1]]])  # (1, 2, 3)
    tokens, mask = db.retrieved_tokens(ids)
    assert tokens.shape == (1, 2, 3, 2 * m) and tokens.dtype == torch.int64
    assert mask.tolist() == [[[True, True, False], [True, True, False]]]
    chunks = torch.from_numpy(np.asarray(db.chunks, dtype=np.int64))
    assert torch.equal(tokens[0, 0, 0], torch.cat([chunks[mid, :m], chunks[mid + 1, :m]]))
    assert torch.equal(tokens[0, 0, 1, :m], chunks[last_of_doc, :m])
    assert (tokens[0, 0, 1, m:] == PAD_ID).all()  # never crosses into the next document
    assert (tokens[0, 1, 0, m:] == PAD_ID).all()  # the very last chunk has no continuation
    assert (tokens[..., 2, :] == PAD_ID).all()  # -1: all padding, masked
    # the precomputed table feeds the model directly: (N, k) -> (N, k, 2m)
    t, m_ = db.retrieved_tokens(torch.from_numpy(np.array(db.neighbours[:4, :2])))
    assert t.shape == (4, 2, 2 * m) and m_.all()


def test_bad_ids_and_shapes(db):
    with pytest.raises(ValueError, match=r"neighbour ids must be in \[-1, "):
        db.retrieved_tokens(np.array([[db.num_chunks]]))
    with pytest.raises(ValueError, match=r"chunk_token_ids must be \(Q, 16\)"):
        db.search_tokens(np.zeros((2, 17), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="search takes a list of texts"):
        db.search("one text", 2)


def test_search_finds_a_chunk_from_its_own_text(db):
    i = db.num_chunks // 2
    text = db.tokenizer.decode(db.chunks[i, :-1])
    ids, dists = db.search([text, "an unrelated query"], 3)
    assert ids.shape == (2, 3) and ids.dtype == np.int64 and dists.dtype == np.float32
    assert dists[0, 0] < 1e-4  # identical recipe for keys and queries
    assert ids[0, 0] == i or np.allclose(db.embeddings[ids[0, 0]], db.embeddings[i], atol=1e-5)


def test_search_tokens_excludes_documents(db):
    q = np.asarray(db.chunks[[10, 200], :-1])
    ids, _ = db.search_tokens(torch.from_numpy(q.astype(np.int64)), 4)
    assert ids[0, 0] == 10 or np.isclose(
        ((db.embeddings[ids[0, 0]] - db.embeddings[10]) ** 2).sum(), 0, atol=1e-6
    )
    own = [int(db.doc_ids[10]), int(db.doc_ids[200])]
    ex_ids, _ = db.search_tokens(q, 4, exclude_doc_ids=[[own[0]], [own[1], 0]])
    assert (ex_ids >= 0).all()
    assert not np.isin(db.doc_ids[ex_ids[0]], [own[0]]).any()
    assert not np.isin(db.doc_ids[ex_ids[1]], [own[1], 0]).any()
