"""Infini-attention through the CLI from a text folder (no database): train, resume, eval in
the modes memory and no_memory (each document streamed whole), generate past max_seq_len."""

import json

import pytest
import torch
from tests.retrieval.conftest import write_corpus

from retrolm.checkpoint import load_model, resolve_checkpoint
from retrolm.cli import main
from retrolm.generation import generate
from retrolm.models.registry import get_family
from retrolm.retrieval.tokenizer import LMTokenizer

MODEL = dict(dim=16, depth=1, heads=2, dim_head=8, segment_len=8, max_seq_len=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("infini_cli")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap"])
    held = write_corpus(root / "held", ["string"])
    train = dict(batch_size=2, warmup_steps=1, save_every=2, eval_every=2, precision="fp32")
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps({"model_config": MODEL, "train": {**train, "plot": False}}))
    run = root / "run"
    argv = ["train", "--text", str(corpus), "--out", str(run), "--model", "infini"]
    argv += ["--config", str(cfg), "--vocab-size", "300"]
    assert main([*argv, "--steps", "2"]) == 0
    assert main([*argv, "--steps", "3"]) == 0  # resumes
    return root, run, held


def test_registered_as_a_streaming_family():
    fam = get_family("infini")
    assert fam.streaming and not fam.uses_retrieval
    assert fam.make_config(None).segment_len == 16  # infini-tiny


def test_train_eval_generate_through_the_cli(run_dir, capsys):
    root, run, held = run_dir
    meta = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert meta["family"] == "infini" and meta["step"] == 3
    capsys.readouterr()
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "150"]) == 0
    out = capsys.readouterr().out
    assert "infini model, 1 documents, 149 tokens" in out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["modes"]) == ["memory", "no_memory"]
    bpb = [report["modes"][m]["bits_per_byte"] for m in ("memory", "no_memory")]
    assert bpb[0] != bpb[1] and all(0 < b < 16 for b in bpb)
    new = 3 * MODEL["max_seq_len"]  # generation keeps the memory past max_seq_len
    argv = ["generate", str(run), "--prompt", "Return the", "--max-new-tokens", str(new)]
    assert main([*argv, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    model, _ = load_model(run)
    tok = LMTokenizer.from_file(run / "tokenizer.json")
    ids = tok.encode("Return the")
    cached = generate(model, ids, new, temperature=0)
    full = generate(model, ids, new, temperature=0, use_cache=False)
    assert cached.ids.shape[1] == len(ids) + new and torch.equal(cached.ids, full.ids)
    assert out == "Return the" + tok.decode(cached.new_ids[0].tolist()) + "\n"
