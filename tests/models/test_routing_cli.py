"""``retrolm train --model routing`` through the CLI on a tiny database: the same
checkpoints, logs and resume as RETRO."""

import json

import pytest
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus

from retrolm.cli import main

MODEL = {
    "dim": 32,
    "depth": 2,
    "heads": 4,
    "dim_head": 8,
    "max_seq_len": 64,
    "window_size": 8,
    "n_local_attn_heads": 2,
    "causal": True,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from retrolm.retrieval import BuildConfig, build_database

    root = tmp_path_factory.mktemp("routing_cli")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap"])
    enc = make_tiny_encoder(root / "enc")
    build_database(corpus, root / "db", BuildConfig(encoder=str(enc), **TINY_DB))
    cfg = root / "cfg.json"
    train = {
        "batch_size": 2,
        "warmup_steps": 1,
        "save_every": 2,
        "eval_every": 2,
        "precision": "fp32",
        "plot": False,
    }
    cfg.write_text(json.dumps({"model": "routing", "model_config": MODEL, "train": train}))
    run = root / "run"
    args = ["train", "--db", str(root / "db"), "--out", str(run), "--config", str(cfg)]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3"]) == 0  # resumes
    return root, run


def test_routing_trains_and_resumes_through_the_cli(run_dir):
    root, run = run_dir
    assert (run / "checkpoint" / "model.safetensors").is_file()
    meta = json.loads((run / "checkpoint" / "config.json").read_text())
    assert meta["family"] == "routing"
    assert (run / "metrics.csv").is_file()
