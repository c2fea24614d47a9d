"""The delight family through the CLI, from a text folder: train (logging the per-block
table), evaluate, generate; both block kinds."""

import json
import logging

import pytest
from tests.retrieval.conftest import write_corpus

from retrolm.checkpoint import load_model, resolve_checkpoint
from retrolm.cli import main
from retrolm.models.delight import DeLighTLM
from retrolm.models.registry import get_family

TRAIN = {"batch_size": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 0,
         "precision": "fp32", "plot": False}  # fmt: skip
MODELS = {
    "delight": {"dim": 16, "min_depth": 2, "max_depth": 3, "max_seq_len": 64,
                "emb_map_dim": 8, "dropout": 0.0, "attn_dropout": 0.0},
    "openelm": {"block": "openelm", "dim": 16, "num_blocks": 2, "head_dim": 4,
                "ffn_dim_divisor": 8, "max_seq_len": 64},
}  # fmt: skip


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("delight_cli")
    return (
        root,
        write_corpus(root / "corpus", ["json", "csv"]),
        write_corpus(root / "held", ["string"]),
    )


def test_registered_with_the_tiny_preset():
    fam = get_family("delight")
    cfg = fam.make_config(None)
    assert cfg.dim == 32 and cfg.emb_map_dim == 16 and not fam.uses_retrieval
    assert fam.model_class() is DeLighTLM


@pytest.mark.parametrize("kind", list(MODELS))
def test_train_eval_generate_through_the_cli(texts, kind, capsys, caplog):
    root, corpus, held = texts
    cfg = root / f"{kind}.json"
    cfg.write_text(json.dumps({"model": "delight", "model_config": MODELS[kind], "train": TRAIN}))
    run = root / f"run-{kind}"
    argv = ["train", "--text", str(corpus), "--out", str(run), "--config", str(cfg)]
    with caplog.at_level(logging.INFO, logger="retrolm.train.loop"):
        assert main([*argv, "--vocab-size", "300", "--steps", "2"]) == 0
    assert "step 2" in capsys.readouterr().out
    table = next(r.getMessage() for r in caplog.records if "MACs per token" in r.getMessage())
    assert "block 1" in table and "total" in table
    meta = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert meta["family"] == "delight" and meta["model_config"]["dim"] == 16
    model, _ = load_model(run)
    assert isinstance(model, DeLighTLM) and model.config.block == kind
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "100"]) == 0
    assert "delight model, 1 documents, 99 tokens" in capsys.readouterr().out
    gen = ["generate", str(run), "--prompt", "Return the", "--max-new-tokens", "6",
           "--temperature", "0"]  # fmt: skip
    outs = [main(gen) == 0 and capsys.readouterr().out for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].startswith("Return the")
