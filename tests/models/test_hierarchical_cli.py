"""The hierarchical family through the CLI: train a few steps, evaluate, generate."""

import json

import pytest
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus

from retrolm.cli import main
from retrolm.models.registry import get_family

MODEL = dict(
    dim=16, depth=1, heads=2, dim_head=8, seq_len=64,
    hierarchies=(1, 2, 4), window_sizes=(8, None, None),
)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from retrolm.retrieval import BuildConfig, build_database

    root = tmp_path_factory.mktemp("hier_cli")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap"])
    held = write_corpus(root / "held", ["string"])
    enc = make_tiny_encoder(root / "enc")
    build_database(corpus, root / "db", BuildConfig(encoder=str(enc), **TINY_DB))
    cfg = root / "cfg.json"
    train = dict(batch_size=2, warmup_steps=1, eval_every=2, save_every=2, precision="fp32")
    cfg.write_text(json.dumps({"model_config": MODEL, "train": {**train, "plot": False}}))
    return root, held, cfg


def test_registered_with_a_scalar_loss():
    fam = get_family("hierarchical")
    cfg = fam.make_config(None)  # default preset
    assert cfg.hierarchies == (1, 2, 8) and not fam.uses_retrieval


def test_train_eval_generate_through_the_cli(setup, capsys):
    root, held, cfg = setup
    run = root / "run"
    argv = ["train", "--db", str(root / "db"), "--out", str(run), "--model", "hierarchical"]
    assert main([*argv, "--config", str(cfg), "--steps", "3"]) == 0
    assert "step 3" in capsys.readouterr().out
    meta = json.loads((run / "checkpoint" / "config.json").read_text())
    assert meta["family"] == "hierarchical"
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "100"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    gen = ["generate", str(run), "--prompt", "Return the", "--max-new-tokens", "5", "--seed", "0"]
    assert main(gen) == 0
    assert capsys.readouterr().out.strip()
