import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from retrolm.data import RETRODataset, select_neighbours
from tests.fakes import FakeDatabase, random_docs


def test_filter_never_lets_a_document_of_the_sequence_through():
    # short documents, long sequences: every sequence packs several documents
    db = FakeDatabase(random_docs(12, 14, seed=1), chunk_size=4, num_candidates=8, seq_chunks=3)
    ds = RETRODataset(db, seq_len=16, num_neighbours=2)
    seen_filtered = multi_doc = 0
    for i in range(len(ds)):
        chunk_ids = [c for c in ds.chunk_ids(i) if c < db.num_chunks]
        docs = set(db.doc_ids[chunk_ids].tolist())
        multi_doc += len(docs) >= 2
        nbr = ds.neighbour_ids(i)
        for row, c in zip(nbr, chunk_ids):
            cands = [x for x in db.neighbours[c].tolist() if x >= 0]
            survivors = [x for x in cands if db.doc_ids[x] not in docs]
            # exactly the first k survivors, in distance order, then -1
            expect = (survivors + [-1, -1])[:2]
            assert row.tolist() == expect
            seen_filtered += len(cands) - len(survivors)
        seq, retrieved, mask = ds[i]
        assert seq.shape == (17,) and retrieved.shape == (4, 2, 8) and mask.shape == (4, 2)
        assert torch.equal(mask, torch.from_numpy(nbr >= 0))
    assert multi_doc > 0 and seen_filtered > 0  # the filter had work to do, so the test can fail


def test_sequence_tokens_and_plus_one():
    db = FakeDatabase(random_docs(4, 30), chunk_size=4, seq_chunks=2)
    ds = RETRODataset(db, seq_len=8, num_neighbours=1)
    seq, _, _ = ds[1]
    s = int(db.seq_starts[1])
    assert seq[:4].tolist() == db.chunks[s, :4].tolist()
    assert seq[4:8].tolist() == db.chunks[s + 1, :4].tolist()
    assert int(seq[8]) == int(db.chunks[s + 1, 4])


def test_select_neighbours_pads_missing():
    ids = select_neighbours(np.array([[5, -1, 7]]), np.array([[0, 0, 1]]), np.array([1]), 3)
    assert ids.tolist() == [[5, -1, -1]]


@pytest.mark.parametrize("bad", [0, 6, 7])
def test_seq_len_must_be_chunk_multiple(bad):
    db = FakeDatabase(random_docs(2), chunk_size=4)
    with pytest.raises(ValueError, match="multiple of chunk_size 4"):
        RETRODataset(db, seq_len=bad)


def test_too_many_neighbours():
    db = FakeDatabase(random_docs(3), chunk_size=4, num_candidates=3)
    with pytest.raises(ValueError, match="stores 3 candidates"):
        RETRODataset(db, seq_len=8, num_neighbours=4)


def _save_memmap(path, array):
    f = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    f[:] = array
    del f


def test_seed_memmap_example_runs_and_never_grows_files(tmp_path):
    # the seed README example, verbatim apart from the folder
    NUM_CHUNKS, CHUNK_SIZE, NUM_SEQS, NUM_NEIGHBORS = 1000, 64, 100, 2
    os.chdir(tmp_path)
    chunks = np.random.randint(0, 8192, size=(NUM_CHUNKS, CHUNK_SIZE + 1))
    _save_memmap("./train.chunks.dat", np.int32(chunks))
    knn = np.random.randint(0, 1000, size=(NUM_CHUNKS, NUM_NEIGHBORS))
    _save_memmap("./train.chunks.knn.dat", np.int32(knn))
    _save_memmap("./train.seq.dat", np.int32(np.random.randint(0, 128, size=(NUM_SEQS,))))
    sizes = {p: os.path.getsize(p) for p in os.listdir(".")}
    train_ds = RETRODataset(
        num_sequences=NUM_SEQS,
        num_chunks=NUM_CHUNKS,
        num_neighbors=NUM_NEIGHBORS,
        chunk_size=CHUNK_SIZE,
        seq_len=2048,
        chunk_memmap_path="./train.chunks.dat",
        chunk_nn_memmap_path="./train.chunks.knn.dat",
        seq_memmap_path="./train.seq.dat",
    )
    train_dl = iter(DataLoader(train_ds, batch_size=2))
    seq, retrieved = next(train_dl)
    assert seq.shape == (2, 2049) and retrieved.shape == (2, 32, 2, 128)
    # a sequence starting at the last chunk runs 31 chunks past the end: padded
    train_ds.seq_starts = np.array([NUM_CHUNKS - 1])
    seq, retrieved = train_ds[0]
    assert (seq[64:] == 0).all()
    assert {p: os.path.getsize(p) for p in os.listdir(".")} == sizes
    assert not train_ds.db.chunks.flags.writeable


def test_seed_memmap_too_small(tmp_path):
    p = tmp_path / "c.dat"
    _save_memmap(p, np.zeros((10, 65), dtype=np.int32))
    _save_memmap(tmp_path / "k.dat", np.zeros((10, 2), dtype=np.int32))
    _save_memmap(tmp_path / "s.dat", np.zeros((3,), dtype=np.int32))
    with pytest.raises(ValueError, match="c.dat holds 2600 bytes"):
        RETRODataset(
            num_sequences=3,
            num_chunks=20,
            num_neighbors=2,
            chunk_size=64,
            seq_len=128,
            chunk_memmap_path=p,
            chunk_nn_memmap_path=tmp_path / "k.dat",
            seq_memmap_path=tmp_path / "s.dat",
        )
