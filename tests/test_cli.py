"""End to end through the CLI on a real (tiny) database: train, resume, eval, generate, errors."""

import json

import pytest

from retrolm.cli import main
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus

MODEL = {
    "chunk_size": 16,
    "max_seq_len": 64,
    "dec_dim": 32,
    "dec_depth": 2,
    "dec_cross_attn_layers": [2],
    "enc_dim": 32,
    "enc_depth": 1,
    "heads": 2,
    "dim_head": 16,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from retrolm.retrieval import BuildConfig, build_database

    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap", "heapq", "bisect"])
    held = write_corpus(root / "held", ["string", "shlex"])
    enc = make_tiny_encoder(root / "enc")
    build_database(corpus, root / "db", BuildConfig(encoder=str(enc), **TINY_DB))
    cfg = root / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "model_config": MODEL,
                "train": {
                    "batch_size": 2,
                    "warmup_steps": 1,
                    "eval_every": 2,
                    "save_every": 2,
                    "precision": "fp32",
                    "plot": False,
                },
            }
        )
    )
    run = root / "run"
    assert (
        main(
            [
                "train",
                "--db",
                str(root / "db"),
                "--out",
                str(run),
                "--config",
                str(cfg),
                "--steps",
                "3",
            ]
        )
        == 0
    )
    return root, run, held, cfg


def test_train_eval_generate(setup, capsys):
    root, run, held, cfg = setup
    assert (run / "checkpoint" / "model.safetensors").is_file()
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "retrieval lowers bits/byte by" in out and "leakage" in out
    assert (run / "eval" / "eval.json").is_file()
    assert (
        main(
            [
                "generate",
                str(run),
                "--prompt",
                "Return the JSON object " * 3,
                "--max-new-tokens",
                "8",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "retrieved while writing" in out and ".txt:" in out
    argv = ["generate", str(run), "--prompt", "Return the JSON object " * 3, "--seed", "0"]
    assert main([*argv, "--max-new-tokens", "8", "--prefill-dtype", "bf16"]) == 0
    assert "retrieved while writing" in capsys.readouterr().out
    # rerunning the finished command is a no-op that reports the step
    assert (
        main(
            [
                "train",
                "--db",
                str(root / "db"),
                "--out",
                str(run),
                "--config",
                str(cfg),
                "--steps",
                "3",
            ]
        )
        == 0
    )
    assert "step 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (lambda r: ["generate", str(r[1]), "--prompt", "word " * 200], "max_seq_len is 64"),
        (lambda r: ["eval", str(r[1]), "--text", str(r[0] / "nothing")], "nothing does not exist"),
        (lambda r: ["eval", str(r[0] / "norun"), "--text", str(r[2])], "norun does not exist"),
        (
            lambda r: [
                "train",
                "--db",
                str(r[0] / "db"),
                "--out",
                str(r[1]),
                "--config",
                str(r[3]),
                "--steps",
                "4",
                "--lr",
                "0.1",
            ],
            "trained with lr=0.0003, now 0.1",
        ),
        (
            lambda r: [
                "train",
                "--db",
                str(r[0] / "db"),
                "--out",
                str(r[1]),
                "--config",
                str(r[3]),
                "--model",
                "nope",
            ],
            "unknown model family 'nope'",
        ),
    ],
)
def test_user_errors_are_one_line(setup, capsys, argv, match):
    assert main(argv(setup)) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_held_out_folder_and_corrupt_checkpoint(setup, capsys, tmp_path):
    root, run, held, cfg = setup
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(run), "--text", str(tmp_path / "empty")]) == 2
    assert "has no non-empty file matching" in capsys.readouterr().err
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    assert main(["generate", str(broken), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors cannot be loaded" in err and "Traceback" not in err


def test_copy_head_run_trains_evaluates_and_generates(setup, capsys, tmp_path):
    root, _run, held, _cfg = setup
    cfg = tmp_path / "copy.json"
    model = {**MODEL, "copy_head": True}
    cfg.write_text(json.dumps({"model_config": model, "train": {"batch_size": 2, "plot": False}}))
    run = tmp_path / "run"
    db = str(root / "db")
    assert main(["train", "--db", db, "--out", str(run), "--config", str(cfg), "--steps", "2"]) == 0
    saved = json.loads((run / "checkpoint" / "config.json").read_text())
    assert saved["model_config"]["copy_head"] is True
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "retrieval_no_copy" in out and "retrieval lowers bits/byte by" in out
    prompt = "Return the JSON object " * 3
    for extra in ([], ["--prefill-dtype", "bf16"]):
        argv = ["generate", str(run), "--prompt", prompt, "--max-new-tokens", "8", *extra]
        assert main(argv) == 0
        assert "retrieved while writing" in capsys.readouterr().out
