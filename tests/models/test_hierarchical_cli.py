"""The hierarchical family through the CLI: train a few steps, evaluate, generate."""

import json

import pytest
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus

from retrolm.checkpoint import resolve_checkpoint
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
    meta = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert meta["family"] == "hierarchical"
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "hierarchical model, 1 documents, 99 tokens" in out and "no_retrieval" in out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["modes"]) == ["no_retrieval"] and report["chunks"] == 0
    # windows of any length: no chunk size to round to (the model has none)
    assert main(["eval", str(run), "--text", str(held), "--seq-len", "37", "--stride", "5"]) == 0
    capsys.readouterr()
    gen = ["generate", str(run), "--prompt", "Return the", "--max-new-tokens", "5", "--seed", "0"]
    assert main(gen) == 0
    assert capsys.readouterr().out.startswith("Return the")
    greedy = [*gen[:-2], "--temperature", "0"]
    outs = [main(greedy) == 0 and capsys.readouterr().out for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].startswith("Return the")


def test_errors_are_one_line(setup, capsys, tmp_path):
    root, held, cfg = setup
    run = tmp_path / "run"
    argv = ["train", "--db", str(root / "db"), "--out", str(run), "--model", "hierarchical"]
    assert main([*argv, "--config", str(cfg), "--steps", "1"]) == 0
    capsys.readouterr()
    for bad, match in [
        (["eval", str(run), "--text", str(held), "--seq-len", "65"], "max_seq_len 64"),
        (["eval", str(tmp_path / "nope"), "--text", str(held)], "nope does not exist"),
        (["generate", str(run), "--prompt", ""], "non-empty"),
        ([*argv[:-1], "routing", "--steps", "2"], "holds a 'hierarchical' run, not 'routing'"),
    ]:
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
