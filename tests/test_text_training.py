"""Families without retrieval train from a text folder (``retrolm train --text DIR``): no
database, no encoder, no faiss; the run keeps its tokenizer, and ``eval`` / ``generate``
work on it with no database anywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrolm.checkpoint import load_model, resolve_checkpoint
from retrolm.cli import main
from retrolm.data import TextData, TextDataset
from retrolm.errors import IncompatibleError
from retrolm.retrieval.tokenizer import EOS_ID, PAD_ID, LMTokenizer
from retrolm.train import TrainConfig, train
from tests.fakes import FakeDatabase, random_docs
from tests.retrieval.conftest import write_corpus

SRC = Path(__file__).resolve().parents[1] / "src"
ROUTING = {
    "dim": 32, "depth": 2, "heads": 4, "dim_head": 8, "max_seq_len": 64, "window_size": 8,
    "n_local_attn_heads": 2, "causal": True,
}  # fmt: skip
HIER = dict(
    dim=16, depth=1, heads=2, dim_head=8, seq_len=64,
    hierarchies=(1, 2, 4), window_sizes=(8, None, None),
)  # fmt: skip
TRAIN = {"batch_size": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 2}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_runs")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap"])
    held = write_corpus(root / "held", ["string"])
    return root, corpus, held


def _config(root: Path, family: str, model: dict) -> Path:
    cfg = root / f"{family}.json"
    train_cfg = {**TRAIN, "precision": "fp32", "plot": False}
    cfg.write_text(json.dumps({"model": family, "model_config": model, "train": train_cfg}))
    return cfg


# ---- the dataset -----------------------------------------------------------------------
def test_text_windows_never_cross_a_document_end(tmp_path):
    docs = {"a.txt": "one two three four five six seven eight nine ten " * 7, "b.txt": "hi"}
    docs["c/d.txt"] = "the quick brown fox jumps over the lazy dog. " * 5
    for name, text in docs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "empty.txt").write_text("  \n")  # skipped, as by a database build
    tok = LMTokenizer.train(docs.values(), vocab_size=300)
    n = 8
    ds = TextDataset(tmp_path, tok, seq_len=n)
    # the oracle: each document's tokens and its <eos>, cut every n tokens, each window
    # with the next token of its own document (pad after the end); documents in path order
    expected, owners = [], []
    for d, name in enumerate(sorted(docs)):
        ids = tok.encode(docs[name]) + [EOS_ID]
        for start in range(0, len(ids), n):
            window = ids[start : start + n + 1]
            expected.append(window + [PAD_ID] * (n + 1 - len(window)))
            owners.append(d)
    got = torch.stack([ds[i][0] for i in range(len(ds))])
    assert got.shape == (len(expected), n + 1) and got.dtype == torch.int64
    assert got.tolist() == expected
    assert ds.doc_ids.tolist() == owners
    assert ds.report.documents == 3 and ds.report.skipped_empty == 1
    # so the property can fail: a long document spans windows whose +1 token is real text,
    # and the short one ends inside its only window
    assert owners.count(0) > 2 and owners.count(1) == 1
    assert int(got[0, n]) == expected[1][0] != PAD_ID


# ---- the command line, with faiss and transformers unimportable ------------------------
SCRIPT = """
import sys
sys.modules["faiss"] = None  # any import of them fails
sys.modules["transformers"] = None
from retrolm.cli import main
args = sys.argv[1:]
run, corpus, held, cfg = args
train = ["train", "--text", corpus, "--out", run, "--config", cfg, "--vocab-size", "300"]
assert main([*train, "--steps", "2"]) == 0
assert main([*train, "--steps", "3"]) == 0  # resumes
assert main(["eval", run, "--text", held, "--max-tokens", "150"]) == 0
prompt = ["generate", run, "--prompt", "Return the", "--max-new-tokens", "6"]
assert main([*prompt, "--temperature", "0"]) == 0
heavy = ("faiss", "transformers")  # (blocked above: an import would have failed)
print("LOADED", sorted(m for m, v in sys.modules.items() if v is not None and m in heavy))
"""


def test_routing_trains_evaluates_and_generates_from_text_without_a_database(texts):
    root, corpus, held = texts
    run = root / "routing_run"
    cfg = _config(root, "routing", ROUTING)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run), str(corpus), str(held), str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout
    assert "resuming" in out.stderr and "step 3" in out.stdout
    assert "routing model, 1 documents, 149 tokens" in out.stdout
    assert "Return the" in out.stdout
    # the run holds a tokenizer and checkpoints, no database (no index, no embeddings)
    assert {p.name for p in run.iterdir()} == {
        ".lock",
        "checkpoints",
        "metrics.csv",
        "tokenizer.json",
        "eval",
    }
    assert not [p for p in run.rglob("*") if "faiss" in p.name or "embedding" in p.name]
    meta = json.loads((resolve_checkpoint(run) / "config.json").read_text())
    assert meta["family"] == "routing" and meta["step"] == 3 and "database" not in meta
    tok = LMTokenizer.from_file(run / "tokenizer.json")
    assert tok.vocab_size == 300
    assert meta["text"]["path"] == str(corpus.resolve()) and meta["text"]["files"] == 3
    assert meta["text"]["tokenizer_hash"] == tok.hash


def test_hierarchical_trains_with_a_given_tokenizer(texts, capsys):
    root, corpus, held = texts
    given = root / "given.json"
    LMTokenizer.train(["a small text to learn a few merges from"] * 4, vocab_size=280).save(given)
    run = root / "hier_run"
    cfg = _config(root, "hierarchical", HIER)
    argv = ["train", "--text", str(corpus), "--out", str(run), "--config", str(cfg)]
    assert main([*argv, "--tokenizer", str(given), "--steps", "2"]) == 0
    assert "step 2" in capsys.readouterr().out
    tok = LMTokenizer.from_file(given)
    assert LMTokenizer.from_file(run / "tokenizer.json").hash == tok.hash
    model, meta = load_model(run)
    assert meta["text"]["tokenizer_hash"] == tok.hash and "database" not in meta
    assert model.config.num_tokens >= tok.vocab_size
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "100"]) == 0
    assert "hierarchical model, 1 documents, 99 tokens" in capsys.readouterr().out
    gen = ["generate", str(run), "--prompt", "a small", "--max-new-tokens", "4", "--seed", "0"]
    assert main(gen) == 0 and capsys.readouterr().out.startswith("a small")
    # resuming with another tokenizer (or vocabulary) is refused
    other = root / "other.json"
    LMTokenizer.train(["different text entirely"] * 4, vocab_size=270).save(other)
    _one_line_error(capsys, [*argv, "--tokenizer", str(other)], "drop --tokenizer to resume")
    _one_line_error(capsys, [*argv, "--vocab-size", "500"], "--vocab-size 500; drop it")
    # a text run has no database to pass
    _one_line_error(capsys, ["eval", str(run), "--text", str(held), "--db", str(root)], "drop --db")
    # a database flag on a text run: refused by kind
    with pytest.raises(IncompatibleError, match="trained from the text folder"):
        db = FakeDatabase(random_docs(40, 60, seed=3), chunk_size=4, seq_chunks=2)
        train(db, run, TrainConfig(**TRAIN), family="hierarchical")


# ---- resume ----------------------------------------------------------------------------
def _run(run: Path, corpus: Path, **kw):
    cfg = TrainConfig(
        **{"steps": 4, "seq_len": 32, "precision": "fp32", "plot": False, **TRAIN, **kw}
    )
    data = TextData(corpus, vocab_size=300)
    return train(data, run, cfg, family="routing", model_config=ROUTING)


def test_resume_from_text_equals_uninterrupted(texts, tmp_path):
    root, corpus, _ = texts
    assert _run(tmp_path / "whole", corpus).step == 4
    first = _run(tmp_path / "cut", corpus, stop_after=2)
    assert first.step == 2
    again = _run(tmp_path / "cut", corpus)
    assert again.step == 4
    rows = [(tmp_path / r / "metrics.csv").read_text().splitlines() for r in ("whole", "cut")]
    strip = [[",".join(line.split(",")[:5]) for line in rs] for rs in rows]  # no timings
    assert strip[0] == strip[1] and len(strip[0]) == 5
    a, _ = load_model(tmp_path / "whole")
    b, _ = load_model(tmp_path / "cut")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # the text changed under the run: refused, naming what differs
    (corpus / "docs" / "json.txt").write_text("changed\n")
    try:
        with pytest.raises(IncompatibleError, match="files added, removed or changed"):
            _run(tmp_path / "cut", corpus, steps=6)
    finally:
        write_corpus(corpus, ["json", "csv", "textwrap"])


# ---- bad combinations --------------------------------------------------------------------
def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--text", "{corpus}", "--model", "retro"], "not a text folder: build one"),
        (["--text", "{corpus}", "--db", "{corpus}"], "or --text DIR"),
        ([], "pass --db DB (a retrieval database) or --text DIR"),
        (["--db", "{corpus}", "--vocab-size", "300"], "--vocab-size: only with --text"),
        (["--text", "{corpus}", "--tokenizer", "t.json", "--vocab-size", "300"], "not both"),
        (["--text", "{root}/missing", "--model", "routing"], "does not exist"),
    ],
)
def test_bad_combinations_are_one_line(texts, capsys, extra, match):
    root, corpus, _ = texts
    extra = [e.format(root=root, corpus=corpus) for e in extra]
    _one_line_error(capsys, ["train", "--out", str(root / "never"), *extra], match)
    assert not (root / "never").exists()


def test_text_data_module_needs_no_faiss():
    code = (
        "import sys; sys.modules['faiss'] = None; sys.modules['transformers'] = None; "
        "import retrolm.data, retrolm.retrieval.chunking, retrolm.retrieval.tokenizer, "
        "retrolm.retrieval.inputs; from retrolm.cli.main import build_parser; "
        "build_parser(); print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- data parallel -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_text_training_under_two_processes_equals_one_process_accumulating(texts, tmp_path, engine):
    """``torchrun --nproc_per_node 2 -m retrolm train --text [--fsdp]``: each rank reads its
    half of every batch from the same windows (and the same tokenizer); losses and weights
    equal one process accumulating 2 micro-batches, replicated (DDP) or sharded (FSDP2, the
    checkpoint gathered). (Hierarchical: the Routing Transformer's k-means initialises from
    each process's first batch, so it differs there by design.)"""
    root, corpus, _ = texts
    tok = root / "ddp_tok.json"
    LMTokenizer.train(["a small text to learn a few merges from"] * 4, vocab_size=280).save(tok)
    cfg = _config(root, "hierarchical", HIER)
    argv = ["train", "--text", str(corpus), "--tokenizer", str(tok), "--config", str(cfg)]
    argv += ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    flags = ["--fsdp"] if engine == "fsdp" else []
    argv2 = [*launch, "--nproc_per_node=2", "-m", "retrolm", *argv, *flags]
    ddp = subprocess.run(
        [*argv2, "--out", str(tmp_path / "p")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    sharded = "units sharded over 2 processes" in ddp.stderr
    assert sharded == (engine == "fsdp"), ddp.stderr[-3000:]
    assert main([*argv, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0

    def rows(run):  # step, loss, val_loss, lr, grad_norm (no timings)
        lines = (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]
        return [[float(v or 0) for v in line.split(",")[:5]] for line in lines]

    assert len(rows("p")) == 3
    for a, b in zip(rows("p"), rows("one"), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    a, _ = load_model(tmp_path / "p")
    b, _ = load_model(tmp_path / "one")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
