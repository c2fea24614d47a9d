"""``retrolm train --model routing`` through the CLI on a tiny database: the same
checkpoints, logs and resume as RETRO, then ``retrolm eval`` and ``retrolm generate``."""

import json
import shutil

import pytest
import torch
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus

from retrolm.checkpoint import resolve_checkpoint
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
    held = write_corpus(root / "held", ["string"])
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
    return root, run, held


def test_routing_trains_and_resumes_through_the_cli(run_dir):
    root, run, _ = run_dir
    assert (resolve_checkpoint(run) / "model.safetensors").is_file()
    meta = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert meta["family"] == "routing"
    assert (run / "metrics.csv").is_file()


def test_eval_scores_a_routing_run_without_retrieval(run_dir, capsys):
    root, run, held = run_dir
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "150"]) == 0
    out = capsys.readouterr().out
    assert "routing model, 1 documents, 149 tokens" in out
    assert "no_retrieval" in out and "retrieval lowers" not in out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["modes"]) == ["no_retrieval"] and report["leakage"] == []
    bpb = report["modes"]["no_retrieval"]["bits_per_byte"]
    assert 0 < bpb < 16  # three steps from random init: near uniform over ~1000 tokens


def test_greedy_generate_is_the_cached_library_result(run_dir, capsys):
    from retrolm.checkpoint import load_model, open_run_database
    from retrolm.generation import generate

    root, run, _ = run_dir
    prompt = "Return the JSON"
    argv = ["generate", str(run), "--prompt", prompt, "--max-new-tokens", "12"]
    assert main([*argv, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and "retrieved while writing" not in out
    model, meta = load_model(run)
    tok = open_run_database(meta, resolve_checkpoint(run)).tokenizer
    ids = tok.encode(prompt)
    cached = generate(model, ids, 12, temperature=0, eos_id=tok.eos_id)
    full = generate(model, ids, 12, temperature=0, eos_id=tok.eos_id, use_cache=False)
    assert torch.equal(cached.ids, full.ids)
    assert out == prompt + tok.decode(cached.new_ids[0].tolist()) + "\n"
    assert main([*argv, "--seed", "1"]) == 0 and capsys.readouterr().out.startswith(prompt)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_input_is_a_one_line_error(run_dir, capsys, tmp_path):
    root, run, held = run_dir
    _one_line_error(
        capsys,
        ["eval", str(run), "--text", str(held), "--seq-len", "1000"],
        "window <= the model's max_seq_len 64",
    )
    (tmp_path / "empty_run").mkdir()
    _one_line_error(
        capsys, ["generate", str(tmp_path / "empty_run"), "--prompt", "x"], "no checkpoint in"
    )
    # the run of another family cannot be resumed as this one
    train = ["train", "--db", str(root / "db"), "--out", str(run), "--model", "hierarchical"]
    _one_line_error(capsys, train, "holds a 'routing' run, not 'hierarchical'")
    # weights of another model under this config.json
    other = tmp_path / "other"
    shutil.copytree(run, other)
    cfg_path = resolve_checkpoint(other) / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model_config"]["dim"] = 48
    cfg_path.write_text(json.dumps(meta))
    _one_line_error(
        capsys, ["eval", str(other), "--text", str(held)], "model.safetensors cannot be loaded"
    )
    meta["family"] = "no-such-family"
    cfg_path.write_text(json.dumps(meta))
    _one_line_error(
        capsys, ["generate", str(other), "--prompt", "x"], "unknown model family 'no-such-family'"
    )
