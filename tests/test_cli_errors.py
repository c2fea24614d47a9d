"""Every bad input is one line: a config value of the wrong type names its file and field;
a full disk during training names the run folder, leaves the last checkpoint whole, and the
rerun resumes; I/O errors that libraries raise under other types are recognised."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from retrolm.cli import describe_os_error, main
from retrolm.config import check_fields, require_positive_ints
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus
from tests.test_cli import MODEL

TRAIN = {
    "batch_size": 2,
    "warmup_steps": 1,
    "eval_every": 0,
    "save_every": 2,
    "precision": "fp32",
    "plot": False,
}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    from retrolm.retrieval import BuildConfig, build_database

    root = tmp_path_factory.mktemp("cli_errors")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap", "heapq"])
    enc = make_tiny_encoder(root / "enc")
    build_database(corpus, root / "db", BuildConfig(encoder=str(enc), **TINY_DB))
    return root / "db"


def write_config(path, **sections: Any):
    path.write_text(json.dumps({"model_config": MODEL, "train": TRAIN, **sections}))
    return path


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "|" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"retrolm {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"train": {**TRAIN, "lr": "3e-4"}},
            "train.lr must be a number, got '3e-4' (str) (write the number without quotes)",
        ),
        ({"train": {**TRAIN, "plot": "no"}}, "train.plot must be true or false, got 'no'"),
        ({"train": {**TRAIN, "steps": 2.5}}, "train.steps must be an integer, got 2.5 (float)"),
        ({"train": {**TRAIN, "steps": True}}, "train.steps must be an integer, got True (bool)"),
        (
            {"train": {**TRAIN, "betas": [0.9]}},
            "train.betas must be a list of 2 values (a number, a number), got [0.9]",
        ),
        ({"train": {**TRAIN, "nope": 1}}, "train: unknown train settings ['nope']"),
        ({"train": [1]}, "train must be a JSON object of field: value, got [1]"),
        (
            {"model_config": {**MODEL, "dec_depth": "2"}},
            "model_config.dec_depth must be an integer, got '2' (str)",
        ),
        (
            {"model_config": {**MODEL, "dec_cross_attn_layers": ["2"]}},
            "model_config.dec_cross_attn_layers must be a list of integers or null",
        ),
    ],
)
def test_a_config_value_of_the_wrong_type_is_one_line_naming_file_and_field(
    db, tmp_path, capsys, sections, message
):
    cfg = write_config(tmp_path / "cfg.json", **sections)
    run = tmp_path / "run"
    assert main(["train", "--db", str(db), "--out", str(run), "--config", str(cfg)]) == 2
    line = one_line_error(capsys, "train")
    assert f"config file {cfg}" in line and message in line, line
    assert not run.exists()  # refused before anything was written


def test_check_fields_follows_the_annotations():
    from retrolm.models.retro.config import RetroConfig
    from retrolm.train import TrainConfig

    check_fields(TrainConfig, {"lr": 1, "seq_len": None, "betas": (0.9, 0.99)}, "t")  # fine
    check_fields(RetroConfig, {"dec_cross_attn_layers": [2, 4], "extra": {"a": 1}}, "r")
    with pytest.raises(ValueError, match=r"t.seq_len must be an integer or null, got '64'"):
        check_fields(TrainConfig, {"seq_len": "64"}, "t")
    with pytest.raises(ValueError, match=r"r.extra must be a JSON object, got \[1\]"):
        check_fields(RetroConfig, {"extra": [1]}, "r")
    with pytest.raises(ValueError, match=r"r.norm must be a string, got 1 \(int\)$"):
        check_fields(RetroConfig, {"norm": 1}, "r")
    # every family's presets pass their own check (no false alarms on real configs)
    from retrolm.models.registry import FAMILIES, config_to_dict

    for fam in FAMILIES.values():
        cls = fam.config_class()
        for name in getattr(cls, "presets", {}):
            check_fields(cls, config_to_dict(cls.from_name(name)), name)


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_require_positive_ints_names_the_field_and_value(value):
    from types import SimpleNamespace

    obj = SimpleNamespace(depth=4, width=value)
    require_positive_ints(obj, ("depth",))  # fine
    with pytest.raises(ValueError, match=rf"^width={value!r} must be a positive int$"):
        require_positive_ints(obj, ("depth", "width"))


def test_config_resolve_keywords_override_a_config():
    from retrolm.models.retro.config import RetroConfig

    base = RetroConfig.from_name("retro-tiny")
    assert RetroConfig.resolve(base, {}) is base
    assert RetroConfig.resolve(base, {"dec_depth": 4}).dec_depth == 4
    assert RetroConfig.resolve(None, {"dec_depth": 5, "dec_cross_attn_layers": (5,)}).dec_depth == 5
    with pytest.raises(ValueError, match="heads=0 must be a positive int"):
        RetroConfig.resolve(base, {"heads": 0})  # the replaced config is checked again
    with pytest.raises(ValueError, match="config must be a RetroConfig, got dict"):
        RetroConfig.resolve({"dec_depth": 2}, {})


def _full_disk_errors():
    from safetensors import SafetensorError

    return {
        "OSError": OSError(errno.ENOSPC, "No space left on device"),
        # what safetensors (Rust) raises when the disk fills while it writes
        "SafetensorError": SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    }


@pytest.mark.parametrize("kind", ["OSError", "SafetensorError"])
def test_a_full_disk_during_training_is_one_line_and_the_rerun_resumes(
    db, tmp_path, capsys, monkeypatch, kind
):
    import safetensors.torch

    from retrolm.checkpoint import load_model

    cfg = write_config(tmp_path / "cfg.json")
    run = tmp_path / "run"
    argv = ["train", "--db", str(db), "--out", str(run), "--config", str(cfg), "--steps", "4"]
    real, saves = safetensors.torch.save_model, []

    def fills_on_second_save(*a, **k):  # the step-2 checkpoint is written, step 4's is not
        saves.append(1)
        if len(saves) == 2:
            raise _full_disk_errors()[kind]
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_model", fills_on_second_save)
    capsys.readouterr()
    assert main(argv) == 2
    line = one_line_error(capsys, "train")
    assert "No space left on device" in line and "free disk space" in line
    assert str(run) in line
    assert len(saves) == 2  # the fault hit the checkpoint write it was meant for
    _, meta = load_model(run)  # the last whole checkpoint is intact
    assert meta["step"] == 2
    assert [p.name for p in run.rglob("*") if p.name.endswith(".tmp")] == []

    monkeypatch.setattr(safetensors.torch, "save_model", real)
    assert main(argv) == 0
    assert "step 4" in capsys.readouterr().out
    _, meta = load_model(run)
    assert meta["step"] == 4


def test_library_io_errors_under_other_types_are_recognised(tmp_path):
    """Real errors, raised by the libraries themselves (a missing folder stands in for any
    failed write): each is read as an OSError with its errno, and described in one line."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    from retrolm.errors import as_os_error

    missing = tmp_path / "no" / "such"
    raised = []
    for write in (
        lambda: save_file({"a": torch.zeros(2)}, str(missing / "w.safetensors")),
        lambda: Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(missing / "t")),
    ):
        with pytest.raises(Exception) as e:
            write()
        raised.append(e.value)
    for e in raised:
        assert not isinstance(e, OSError)
        os_error = as_os_error(e)
        assert os_error is not None and os_error.errno == errno.ENOENT, repr(e)
        text = describe_os_error(os_error, "RUN")
        assert text.startswith("No such file or directory (while writing under RUN)")
    assert as_os_error(RuntimeError("shape mismatch: (2, 3) vs (3, 2)")) is None
    assert as_os_error(ValueError("bad")) is None


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    """A bug is not a user error: the CLI lets it through with its stack trace."""
    import retrolm.cli.generate as generate

    def bug(args):
        raise RuntimeError("shape mismatch: (2, 3) vs (3, 2)")

    monkeypatch.setattr(generate, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["generate", "somewhere", "--prompt", "x"])


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "db", "info", str(tmp_path)])
    assert main(["db", "info", str(tmp_path)]) == 2
    assert "is not a retrieval database" in one_line_error(capsys, "db")
