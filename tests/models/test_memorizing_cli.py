"""The memorizing family through the CLI: train from a text folder, evaluate (each held-out
document streamed whole, memory on and off), generate past max_seq_len."""

import json

import pytest
from tests.retrieval.conftest import write_corpus

from retrolm.checkpoint import resolve_checkpoint
from retrolm.cli import main
from retrolm.models.registry import get_family

MODEL = dict(
    dim=16, depth=2, heads=2, dim_head=8, memorizing_layers=[2], max_knn_memories=64,
    num_retrieved_memories=4, segment_len=16, max_seq_len=32, xl_max_memories=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("memo_cli")
    corpus = write_corpus(root / "corpus", ["json", "csv"])
    held = write_corpus(root / "held", ["string"])
    cfg = root / "cfg.json"
    train = dict(batch_size=2, warmup_steps=1, eval_every=2, save_every=2, precision="fp32")
    cfg.write_text(json.dumps({"model_config": MODEL, "train": {**train, "plot": False}}))
    return root, corpus, held, cfg


def test_registered_as_streaming():
    fam = get_family("memorizing")
    assert fam.streaming and not fam.uses_retrieval
    assert fam.make_config(None).segment_len == 8  # memorizing-tiny


def test_train_eval_generate_through_the_cli(setup, capsys):
    root, corpus, held, cfg = setup
    run = root / "run"
    argv = ["train", "--text", str(corpus), "--out", str(run), "--model", "memorizing"]
    assert main([*argv, "--config", str(cfg), "--vocab-size", "300", "--steps", "3"]) == 0
    assert "step 3" in capsys.readouterr().out
    meta = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert meta["family"] == "memorizing"
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "memorizing model, 1 documents, 99 tokens" in out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["modes"]) == ["memory", "no_memory"]
    gen = ["generate", str(run), "--prompt", "Return the", "--max-new-tokens", "40"]
    greedy = [*gen, "--temperature", "0"]
    outs = [main(greedy) == 0 and capsys.readouterr().out for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].startswith("Return the")
