"""End to end through the CLI on a real (tiny) database: train, resume, eval, generate, errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from retrolm.checkpoint import resolve_checkpoint
from retrolm.cli import main
from tests.retrieval.conftest import TINY_DB, TINY_RETRO, make_tiny_encoder, write_corpus

SRC = Path(__file__).resolve().parents[1] / "src"

MODEL = TINY_RETRO


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
    assert (resolve_checkpoint(run) / "model.safetensors").is_file()
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
        # query-time index parameters reach the run's database (a flat index has no lists)
        (
            lambda r: ["eval", str(r[1]), "--text", str(r[2]), "--nprobe", "2"],
            "--nprobe 2: the flat index (Flat) has no inverted lists",
        ),
        (
            lambda r: ["generate", str(r[1]), "--prompt", "In", "--ef-search", "8"],
            "--ef-search 8: the flat index (Flat) is not an HNSW graph",
        ),
        (
            lambda r: ["eval", str(r[1]), "--text", str(r[2]), "--no-retrieval", "--nprobe", "2"],
            "--nprobe set(s) how the database is searched, but this command retrieves nothing",
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
    (resolve_checkpoint(broken) / "model.safetensors").write_bytes(b"garbage")
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
    saved = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert saved["model_config"]["copy_head"] is True
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "retrieval_no_copy" in out and "retrieval lowers bits/byte by" in out
    prompt = "Return the JSON object " * 3
    for extra in ([], ["--prefill-dtype", "bf16"]):
        argv = ["generate", str(run), "--prompt", prompt, "--max-new-tokens", "8", *extra]
        assert main(argv) == 0
        assert "retrieved while writing" in capsys.readouterr().out


def _options(parser):
    """(command path, action) for every option of every (sub-)command of ``parser``."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for path, a in _options(sub):
                    yield (name, *path), a
        elif action.option_strings and action.dest != "help":
            yield (), action


def test_every_option_of_every_command_has_a_help_text():
    from retrolm.cli import build_parser

    options = list(_options(build_parser()))
    assert len(options) > 40  # the walk reached the sub-commands' options
    missing = [f"{' '.join(p)} {a.option_strings[-1]}" for p, a in options if not a.help]
    assert missing == []
    train = {a.dest: a for p, a in options if p == ("train",)}
    # the help of the TrainConfig flags is the field's docstring, with the default
    assert "Optimizer steps in total" in train["steps"].help and "1000" in train["steps"].help
    assert train["precision"].choices == ("auto", "fp32", "bf16")


def test_a_preset_for_other_chunk_sizes_names_both_sizes(setup, capsys, tmp_path, monkeypatch):
    from retrolm.models.retro.config import RetroConfig

    root = setup[0]
    # a preset whose length fits its own 12-token chunks, not the database's 16-token ones
    odd = {**MODEL, "chunk_size": 12, "max_seq_len": 36}
    monkeypatch.setitem(RetroConfig.presets, "retro-odd", odd)
    argv = ["train", "--db", str(root / "db"), "--out", str(tmp_path / "r")]
    assert main([*argv, "--preset", "retro-odd", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "preset 'retro-odd' is made for 12-token chunks" in err
    assert "the database has 16-token chunks" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing half-made: not even the folder


def test_generate_says_when_no_chunk_completed(setup, capsys):
    run = setup[1]
    assert main(["generate", str(run), "--prompt", "Return", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing retrieved: the text never completed a 16-token chunk" in out


def test_eval_report_is_strict_json_with_empty_leakage_bins(setup, capsys, tmp_path):
    run, held = setup[1], setup[2]
    out = tmp_path / "report"
    argv = ["eval", str(run), "--text", str(held), "--max-tokens", "200", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"eval.json holds the non-standard constant {name}")

    report = json.loads((out / "eval.json").read_text(), parse_constant=refuse)
    empty = [r for r in report["leakage"] if r["fraction"] == 0.0]
    assert empty, "the test needs an overlap bin with no chunk (alpha = 0 has none here)"
    assert all(r["retrieval"] is None and r["no_retrieval"] is None for r in empty)
    assert "nan" not in table
    row = next(line for line in table.splitlines() if line.startswith(" 0.000"))
    assert row.split()[-2:] == ["-", "-"]


def test_export_of_a_retro_run_records_its_database(setup, capsys, tmp_path):
    import retrolm
    from retrolm.checkpoint import load_model

    root, run = setup[0], setup[1]
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    meta = retrolm.pretrained_config(tmp_path / "out")
    built = json.loads((root / "db" / "manifest.json").read_text())
    assert meta["family"] == "retro" and meta["database"]["chunk_size"] == MODEL["chunk_size"]
    assert meta["database"]["encoder"] == built["encoder"]["name"]
    assert meta["database"]["encoder_sha256"] == built["encoder"]["sha256"]
    assert retrolm.load_tokenizer(tmp_path / "out").hash == built["tokenizer"]["hash"]
    trained, _ = load_model(run)
    loaded = retrolm.RETRO.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(t, loaded[k]) for k, t in trained.state_dict().items())


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "retrolm", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--db DB" in out.stdout  # what `torchrun -m retrolm` runs


@pytest.mark.parametrize("world", ["1", "2"])
def test_the_process_entry_exits_with_main_status_and_flushed_output(tmp_path, world):
    """``python -m retrolm``: main()'s status is the process's; in a process of a torchrun job
    (WORLD_SIZE 2) it leaves by os._exit, skipping the interpreter's teardown (an atexit
    handler does not run), with its output flushed first."""
    import subprocess
    import sys

    code = (
        "import atexit, sys; atexit.register(lambda: print('TEARDOWN', file=sys.stderr)); "
        "sys.argv = ['retrolm', 'eval', sys.argv[1], '--text', sys.argv[1]]; "
        "import runpy; runpy.run_module('retrolm', run_name='__main__')"
    )
    env = {**os.environ, "WORLD_SIZE": world, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "none")], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("retrolm eval: error:") and "does not exist" in out.stderr
    assert ("TEARDOWN" in out.stderr) == (world == "1")


def test_only_rank_zero_prints_the_training_summary(setup, capsys, monkeypatch):
    root, run, _held, cfg = setup
    argv = ["train", "--db", str(root / "db"), "--out", str(run), "--config", str(cfg)]
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it (the run is done: a no-op rerun)
    assert main([*argv, "--steps", "3"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main([*argv, "--steps", "3"]) == 0
    assert "step 3" in capsys.readouterr().out


def test_a_folder_another_process_writes_is_one_line_and_readers_need_no_lock(setup, capsys):
    import signal

    from tests.test_locking import hold

    root, run, held, cfg = setup
    before = resolve_checkpoint(run)
    holders = [hold(run), hold(root / "db")]
    try:
        train = ["train", "--db", str(root / "db"), "--out", str(run), "--config", str(cfg)]
        assert main([*train, "--steps", "4"]) == 2
        err = capsys.readouterr().err
        busy = "is being written by another retrolm process"
        assert err == f"retrolm train: error: run {run} {busy} (pid {holders[0].pid}); " + (
            "wait for it to finish or stop it, or use another folder\n"
        )
        assert main(["db", "build", str(root / "corpus"), str(root / "db")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"database {root / 'db'} {busy} (pid {holders[1].pid})" in err
        # readers of both folders go on while the writers hold them
        assert main(["db", "info", str(root / "db")]) == 0
        assert main(["generate", str(run), "--prompt", "Return", "--max-new-tokens", "2"]) == 0
    finally:
        for h in holders:
            h.send_signal(signal.SIGKILL)
            h.wait()
    assert resolve_checkpoint(run) == before  # the refused train wrote nothing
