"""RETRO-fit through the CLI: ``db build --tokenizer BASE`` with a tiny GPT-2 folder's
tokenizer, ``train --retrofit BASE``, then ``eval`` (with and without retrieval) and
``generate`` (cached == uncached); a tokenizer mismatch and a missing base are one line."""

import json
import shutil

import pytest
import torch
from tests.models.retrofit_bases import make_hf_base
from tests.retrieval.conftest import TINY_DB, make_tiny_encoder, write_corpus

from retrolm.checkpoint import resolve_checkpoint
from retrolm.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrofit_cli")
    base = make_hf_base(root / "gpt2", "gpt2")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap"])
    held = write_corpus(root / "held", ["string"])
    enc = make_tiny_encoder(root / "enc")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_DB.items() if k != "vocab_size"]
    build = ["db", "build", str(corpus), str(root / "db"), "--encoder", str(enc), *flags]
    assert main([*build, "--tokenizer", str(base)]) == 0
    train = {"batch_size": 2, "warmup_steps": 1, "eval_every": 2, "precision": "fp32"}
    (root / "cfg.json").write_text(json.dumps({"train": {**train, "plot": False}}))
    run = root / "run"
    args = ["train", "--db", str(root / "db"), "--out", str(run)]
    args += [
        "--config",
        str(root / "cfg.json"),
        "--retrofit",
        str(base),
        "--cca-layers",
        "2,3",
        "--lr",
        "1e-2",
    ]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3"]) == 0  # resumes
    return root, base, run, held


def test_a_retrofit_run_stores_the_new_weights_and_the_base_identity(run_dir):
    from safetensors.torch import load_file

    root, base, run, _ = run_dir
    ckpt = resolve_checkpoint(run)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["family"] == "retrofit" and meta["step"] == 3
    cfg = meta["model_config"]
    assert cfg["base"] == str(base.resolve()) and len(cfg["base_hash"]) == 64
    assert cfg["cca_layers"] == [2, 3]
    weights = load_file(ckpt / "model.safetensors")
    assert weights and not any(k.startswith("base.") for k in weights)


def test_eval_and_generate_a_retrofit_run(run_dir, capsys):
    from retrolm.checkpoint import load_model, open_run_database
    from retrolm.generation import generate

    root, base, run, held = run_dir
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "120"]) == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    modes = report["modes"]
    assert {"retrieval", "no_retrieval"} <= set(modes)
    assert modes["retrieval"]["bits_per_byte"] != modes["no_retrieval"]["bits_per_byte"]
    capsys.readouterr()
    prompt = "Return the JSON"
    argv = ["generate", str(run), "--prompt", prompt, "--max-new-tokens", "10"]
    assert main([*argv, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    model, meta = load_model(run)
    db = open_run_database(meta, resolve_checkpoint(run))
    ids = db.tokenizer.encode(prompt * 3)
    kw = dict(temperature=0, num_neighbours=2)
    cached = generate(model, ids, 10, db, **kw)
    full = generate(model, ids, 10, db, use_cache=False, **kw)
    assert torch.equal(cached.ids, full.ids)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tokenizer_mismatch_and_missing_base_are_one_line(run_dir, capsys, tmp_path):
    root, base, run, held = run_dir
    llama = make_hf_base(tmp_path / "llama", "llama")  # another tokenizer
    train = ["train", "--db", str(root / "db"), "--out", str(tmp_path / "r"), "--steps", "1"]
    _one_line_error(capsys, [*train, "--retrofit", str(llama)], "--tokenizer")
    _one_line_error(capsys, [*train, "--cca-layers", "2"], "go with --retrofit BASE")
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    cfg_path = resolve_checkpoint(moved) / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model_config"]["base"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(meta))
    _one_line_error(capsys, ["eval", str(moved), "--text", str(held)], "does not exist")


@pytest.mark.slow
def test_fsdp_retrofit_under_two_processes_equals_one_process_accumulating(run_dir, tmp_path):
    """``torchrun --nproc_per_node 2 -m retrolm train --retrofit BASE --fsdp``: the frozen
    base is sharded beside the new layers; losses and the new weights equal one process
    accumulating 2 micro-batches, the checkpoint still holds no base tensor, and the base
    folder is untouched."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root, base, _, _ = run_dir
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    argv = ["train", "--db", str(root / "db"), "--config", str(root / "cfg.json")]
    argv += ["--retrofit", str(base), "--cca-layers", "2,3", "--lr", "1e-2", "--steps", "3"]
    argv += ["--batch-size", "4"]
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*launch, "-m", "retrolm", *argv, "--fsdp", "--out", str(tmp_path / "p")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "units sharded over 2 processes" in out.stderr, out.stderr[-3000:]
    assert main([*argv, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0

    def rows(run):  # step, loss, val_loss, lr, grad_norm
        lines = (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]
        return [[float(v or 0) for v in line.split(",")[:5]] for line in lines]

    assert len(rows("p")) == 3
    for a, b in zip(rows("p"), rows("one"), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    a = load_file(resolve_checkpoint(tmp_path / "p") / "model.safetensors")
    b = load_file(resolve_checkpoint(tmp_path / "one") / "model.safetensors")
    assert a.keys() == b.keys() and not any(k.startswith("base.") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before
