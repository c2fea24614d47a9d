"""The seed's TrainingWrapper example, over the real pipeline (tiny encoder for speed)."""

import os

import pytest
import torch

import retrolm
from retrolm import RETRO, TrainingWrapper
from tests.retrieval.conftest import make_tiny_encoder, write_corpus


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrapper")
    write_corpus(root / "text_folder", ["json", "csv", "textwrap"])
    return root, make_tiny_encoder(root / "enc")


def make(root, enc, retro):
    return TrainingWrapper(
        retro=retro,
        knn=2,
        chunk_size=16,
        documents_path=root / "text_folder",
        glob="**/*.txt",
        chunks_memmap_path=root / "train.chunks.dat",
        seqs_memmap_path=root / "train.seq.dat",
        doc_ids_memmap_path=root / "train.doc_ids.dat",
        max_chunks=1_000_000,
        max_seqs=100_000,
        knn_extra_neighbors=100,
        max_index_memory_usage="100m",
        current_memory_available="1G",
        encoder=enc,
        vocab_size=600,
    )


def test_seed_training_wrapper_example(folder, monkeypatch):
    root, enc = folder
    torch.manual_seed(0)
    retro = RETRO(
        num_tokens=1000,
        chunk_size=16,
        max_seq_len=64,
        enc_dim=32,
        enc_depth=1,
        dec_dim=32,
        dec_depth=2,
        dec_cross_attn_layers=(2,),
        heads=2,
        dim_head=16,
    )
    wrapper = make(root, enc, retro)
    train_dl = iter(wrapper.get_dataloader(batch_size=2, shuffle=True))
    optim = wrapper.get_optimizer(lr=3e-4, wd=0.01)
    seq, retrieved = next(train_dl)
    assert seq.shape == (2, 65) and retrieved.shape == (2, 4, 2, 32)
    loss = retro(seq, retrieved, return_loss=True)
    loss.backward()
    optim.step()
    optim.zero_grad()
    sampled = wrapper.generate(filter_thres=0.9, temperature=1.0, seed=0)
    assert sampled.shape[0] == 1 and 1 < sampled.shape[1] <= 64
    prompt = torch.randint(0, 500, (1, 20))
    sampled = wrapper.generate(prompt, filter_thres=0.9, temperature=1.0)
    assert torch.equal(sampled[:, :20], prompt) and sampled.shape[1] <= 64
    # reusing the folder reuses the database; REPROCESS=1 rebuilds it
    manifest = wrapper.db_path / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    make(root, enc, retro)
    assert manifest.stat().st_mtime_ns == stamp
    monkeypatch.setenv("REPROCESS", "1")
    make(root, enc, retro)
    assert manifest.stat().st_mtime_ns != stamp


def test_wrapper_rejects_mismatched_chunk_size(folder):
    root, enc = folder
    retro = RETRO(
        num_tokens=1000,
        chunk_size=8,
        max_seq_len=64,
        enc_dim=32,
        enc_depth=1,
        dec_dim=32,
        dec_depth=2,
        dec_cross_attn_layers=(2,),
        heads=2,
        dim_head=16,
    )
    with pytest.raises(ValueError, match="chunk_size 16 differs from the model's chunk_size 8"):
        make(root, enc, retro)


def test_lazy_exports():
    assert callable(retrolm.generate) and retrolm.RETRODataset.__name__ == "RETRODataset"
    assert "TrainingWrapper" in dir(retrolm)
    assert os.environ.get("REPROCESS") != "1"
