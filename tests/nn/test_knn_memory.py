"""The kNN memory (``retrolm.nn.knn_memory``): a FIFO ring per row, exact and faiss backends."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrolm.nn.knn_memory import KNNMemory, KNNMemoryList


def pairs(rows, n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(rows, n, 2, d, generator=g)
    kv[:, :, 0] = F.normalize(kv[:, :, 0], dim=-1)  # unit keys: a key's best match is itself
    return kv


def oracle_search(held_kv, q, k):
    """Brute force over the pairs a row should hold: (values of the top-k, best first)."""
    sim = q @ held_kv[:, 0].T
    idx = sim.argsort(descending=True)[:k]
    return held_kv[idx]


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_exact_match_retrieval_across_wrap_around(backend):
    """Capacity 10, adds of 6 + 6 + 2: each held pair's key returns its own value, the 4
    evicted pairs are never returned (the reference resets its index here, and then returns
    the pair of another slot)."""
    mem = KNNMemory(8, max_memories=10, num_indices=2, backend=backend)
    kv = pairs(2, 14)
    for a, b in ((0, 6), (6, 12), (12, 14)):
        mem.add(kv[:, a:b])
        got, ok = mem.search(kv[:, :b, 0], 1)
        assert ok.all()
        held = slice(max(b - 10, 0), b)
        assert torch.equal(got[:, held, 0], kv[:, held])  # (b, n, 2, d): its own pair
    got, ok = mem.search(kv[:, :, 0], 10)
    assert ok.all()
    for r in range(2):
        returned = {tuple(v.tolist()) for v in got[r, ..., 1, :].reshape(-1, 8)}
        assert returned == {tuple(v.tolist()) for v in kv[r, 4:, 1]}  # exactly the held 10
        for i in range(14):  # and best first, as brute force over the held pairs ranks them
            expect = oracle_search(kv[r, 4:], kv[r, i, 0], 10)
            torch.testing.assert_close(got[r, i], expect)


def test_faiss_equals_exact_and_ivf_recall():
    kv = pairs(2, 3000, d=16, seed=1)
    q = F.normalize(torch.randn(2, 5, 7, 16), dim=-1)
    exact = KNNMemory(16, 1000, 2, backend="exact")
    flat = KNNMemory(16, 1000, 2, backend="faiss")
    ivf = KNNMemory(16, 1000, 2, backend="faiss", index="ivf", ivf_lists=8)
    for s in range(0, 3000, 700):
        for m in (exact, flat, ivf):
            m.add(kv[:, s : s + 700])
    (e, eok), (f, fok), (v, vok) = (m.search(q, 6) for m in (exact, flat, ivf))
    assert eok.all() and fok.all() and vok.all()
    torch.testing.assert_close(f, e)  # exact inner product both ways
    hits = (v[..., None, 1, :] == e[..., None, :, 1, :]).all(-1).any(-1).float().mean()
    assert hits > 0.3  # IVF is approximate, but never returns an evicted pair:
    held = kv[:, -1000:, 1]
    for r in range(2):
        found = v[r, ..., 1, :].reshape(-1, 16)
        assert (found[:, None] == held[r][None]).all(-1).any(-1).all()


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_clearing_or_scoping_one_row_leaves_the_others_exact(backend):
    kv = pairs(3, 12, seed=2)
    ref = KNNMemory(8, 8, 3, backend=backend)
    ref.add(kv[:, :6])
    ref.add(kv[:, 6:])
    mem = KNNMemory(8, 8, 3, backend=backend)
    mem.add(kv[:, :6])
    with mem.at_batch_indices([0, 2]):  # only rows 0, 2 get the second add
        mem.add(kv[[0, 2], 6:])
        got, ok = mem.search(kv[[0, 2], :, 0], 3)
        assert got.shape == (2, 12, 3, 2, 8)
    expect, eok = ref.search(kv[:, :, 0], 3)
    torch.testing.assert_close(got, expect[[0, 2]])
    assert mem.count == [12, 6, 12]  # a scoped add moves only its rows
    with mem.at_batch_indices([1]):
        mem.add(kv[[1], 6:])
    torch.testing.assert_close(mem.search(kv[:, :, 0], 3)[0], expect)
    mem.clear([1])
    got, ok = mem.search(kv[:, :, 0], 3)
    assert not ok[1].any() and (got[1] == 0).all()
    torch.testing.assert_close(got[[0, 2]], expect[[0, 2]])
    assert ok[[0, 2]].all()


def test_masked_pairs_are_not_stored_and_topk_beyond_content():
    mem = KNNMemory(8, 10, 1, backend="exact")
    kv = pairs(1, 6)
    mem.add(kv, mask=torch.tensor([[True, False, True, False, True, True]]))
    assert mem.count == [4]
    got, ok = mem.search(kv[:, :, 0], 6)
    assert ok.sum(-1).tolist() == [[4] * 6]  # 4 held, the other 2 results masked
    assert (got[~ok] == 0).all()
    assert torch.equal(got[0, 2, 0], kv[0, 2])
    assert not (got[0, 1, :, 1] == kv[0, 1, 1]).all(-1).any()  # the masked pair never returns


def test_memmap_and_list_helpers(tmp_path):
    mems = KNNMemoryList.create(2, 8, 16, 2, "exact", tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "knn.memory.layer.1.memmap",
        "knn.memory.layer.2.memmap",
    ]
    kv = pairs(2, 5)
    for m in mems:
        m.add(kv)
    mems.clear_memory(batch_indices=[0], memory_indices=[1])
    assert mems[0].count == [5, 5] and mems[1].count == [0, 5]
    with mems.at_batch_indices([1]):
        assert all(len(m) == 5 for m in mems)
    got, _ = mems[0].search(kv[:, :, 0], 1)
    assert torch.equal(got[:, :, 0], kv)
    assert np.fromfile(tmp_path / "m" / "knn.memory.layer.1.memmap", np.float32).size == 2 * 16 * 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(max_memories=-3), "max_memories"),
        (dict(backend="annoy"), "annoy"),
        (dict(index="hnsw"), "hnsw"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KNNMemory(**{"dim": 8, **kwargs})


def test_bad_shapes_and_rows_raise():
    mem = KNNMemory(8, 10, 2)
    with pytest.raises(ValueError, match="kv must be"):
        mem.add(torch.zeros(3, 4, 2, 8))
    with pytest.raises(ValueError, match="queries must be"):
        mem.search(torch.zeros(2, 4, 7), 2)
    with pytest.raises(ValueError, match=r"\[5\]"):
        with mem.at_batch_indices([5]):
            pass


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_search_scored_is_search_with_its_products(backend):
    """``search_scored``: the values of ``search``, their ``q·k`` as scores, the same mask
    (zero scores and values where a row holds fewer than topk pairs), also inside a scope;
    float64 queries get products in float64."""
    kv = pairs(3, 12, seed=4)
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[2, 2:] = False  # row 2 holds 2 pairs: 2 of its top-4 are masked
    mem = KNNMemory(8, 10, 3, backend=backend)
    mem.add(kv, mask=keep)
    q = F.normalize(torch.randn(3, 2, 5, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    for scope in (None, [2, 0]):
        qq = q if scope is None else q[scope]
        with mem.at_batch_indices(scope) if scope else contextlib.nullcontext():
            kv_got, ok = mem.search(qq, 4)
            scores, values, ok2 = mem.search_scored(qq, 4)
            s64, _, _ = mem.search_scored(qq.double(), 4)
        assert torch.equal(ok, ok2) and (~ok).sum() == 2 * 5 * 2
        torch.testing.assert_close(values, kv_got[..., 1, :])
        expect = torch.einsum("b...d,b...kd->b...k", qq, kv_got[..., 0, :])
        torch.testing.assert_close(scores, expect)
        assert (scores[~ok] == 0).all() and (values[~ok] == 0).all()
        e64 = torch.einsum("b...d,b...kd->b...k", qq.double(), kv_got[..., 0, :].double())
        assert s64.dtype == torch.float64
        torch.testing.assert_close(s64, e64, rtol=1e-12, atol=1e-12)
