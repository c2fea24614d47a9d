"""Save, load, share: ``save_pretrained`` / ``from_pretrained`` give back the same model
(identical logits) for every family; the tokenizer and RETRO's database identity come back;
a folder of another family or a newer format is refused in one line; ``push_to_hub`` (its
HTTP layer mocked: no test touches the network) uploads exactly the folder's files; the
model card's YAML parses; ``retrolm export RUN OUT_DIR`` writes the folder of a trained run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrolm
from retrolm.cli import main
from retrolm.errors import IncompatibleError
from retrolm.model_card import front_matter, model_card
from retrolm.models import pretrained
from retrolm.models.registry import FAMILIES, get_family
from retrolm.retrieval.tokenizer import LMTokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
PRESETS = {"retro": "retro-tiny", "routing": "routing-tiny", "hierarchical": "hier-tiny",
           "delight": "delight-tiny", "memorizing": "memorizing-tiny"}  # fmt: skip
MODEL_FILES = {"model.safetensors", "config.json", "README.md"}
BUILT_IN = sorted(
    name
    for name, fam in FAMILIES.items()
    if isinstance(fam.model_cls, str)
    and fam.model_cls.startswith("retrolm.")
    and name != "retrofit"  # built around a trained base: tests/models/test_retrofit.py
)
"""retrolm's own families (tests register toy ones too) that build from a preset alone."""


def tiny(family: str, seed: int = 0, **overrides):
    fam = get_family(family)
    torch.manual_seed(seed)
    preset = PRESETS.get(family, fam.default_preset)
    return fam.build(fam.make_config(overrides, preset=preset)).eval()


def logits(model, seed: int = 1) -> torch.Tensor:
    """The family's logits on fixed random ids (RETRO: with fixed random neighbours)."""
    fam = get_family(model_family(model))
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n = 32 if fam.uses_retrieval else 16
    ids = torch.randint(0, getattr(cfg, "num_tokens", 256), (2, n), generator=g)
    if not fam.uses_retrieval:
        with torch.no_grad():
            return fam.logits(model, ids)
    m = cfg.chunk_size
    retrieved = torch.randint(0, 256, (2, n // m, 2, 2 * m), generator=g)
    with torch.no_grad():
        return fam.logits(model, ids, retrieved=retrieved)


def model_family(model) -> str:
    return next(f.name for f in FAMILIES.values() if f.serves(model))


def test_every_registered_family_can_be_saved():
    """A family registered without the mixin fails this test (and each is round-tripped
    below, at its tiny preset in PRESETS, else its default one)."""
    assert set(PRESETS) <= set(BUILT_IN)
    for name in BUILT_IN:
        assert issubclass(get_family(name).model_class(), pretrained.PreTrainedMixin), name


# ---- round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", BUILT_IN)
def test_round_trip_gives_identical_logits(family, tmp_path):
    model = tiny(family, seed=0)
    want = logits(model)
    folder = model.save_pretrained(tmp_path / "m")
    assert {p.name for p in folder.iterdir()} == MODEL_FILES  # no temporary left
    torch.manual_seed(123)  # the rebuilt model starts from other weights
    loaded = type(model).from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded), want)
    assert type(retrolm.from_pretrained(folder)) is type(model)
    # so the test can fail: another initialisation gives other logits
    assert not torch.equal(logits(tiny(family, seed=7)), want)


def test_tied_weights_stay_tied(tmp_path):
    model = tiny("routing", tie_embedding=True, weight_tie=True)
    shared = len({id(p) for p in model.parameters()})
    assert shared < len(dict(model.named_parameters(remove_duplicate=False)))
    loaded = retrolm.from_pretrained(model.save_pretrained(tmp_path / "tied"))
    assert len({id(p) for p in loaded.parameters()}) == shared
    assert torch.equal(logits(loaded), logits(model))


def test_a_subclass_loads_as_itself(tmp_path):
    class MyRETRO(retrolm.RETRO):
        pass

    folder = tiny("retro").save_pretrained(tmp_path / "r")
    assert type(MyRETRO.from_pretrained(folder)) is MyRETRO
    with pytest.raises(IncompatibleError, match="holds a 'retro' model, not a 'routing' one"):
        retrolm.RoutingLanguageModel.from_pretrained(folder)


def test_a_bf16_model_comes_back_in_bf16(tmp_path):
    model = tiny("hierarchical").to(torch.bfloat16)
    loaded = retrolm.from_pretrained(model.save_pretrained(tmp_path / "bf16"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(loaded), logits(model))


def test_tokenizer_and_database_identity_come_back(tmp_path):
    tok = LMTokenizer.train(["a few words to learn merges from, and a few more"] * 3, 270)
    identity = {"encoder": "tiny-bert", "encoder_sha256": "ab" * 32, "chunk_size": 4}
    folder = tiny("retro").save_pretrained(
        tmp_path / "m", tokenizer=tok, database=identity, metadata={"steps": 9}
    )
    assert {p.name for p in folder.iterdir()} == MODEL_FILES | {"tokenizer.json"}
    assert retrolm.load_tokenizer(folder).hash == tok.hash
    meta = retrolm.pretrained_config(folder)
    assert meta["database"] == identity and meta["metadata"] == {"steps": 9}
    assert meta["family"] == "retro" and meta["retrolm_format"] == pretrained.FORMAT
    # a tokenizer.json swapped for another is caught by the recorded hash
    LMTokenizer.train(["other text entirely"] * 3, 270).save(folder / "tokenizer.json")
    with pytest.raises(IncompatibleError, match="is not the tokenizer saved with the model"):
        retrolm.load_tokenizer(folder)


# ---- refusals: one line each -----------------------------------------------------------------
def test_a_folder_of_another_family_names_both_families_and_the_class(tmp_path):
    folder = tiny("routing").save_pretrained(tmp_path / "r")
    with pytest.raises(IncompatibleError) as e:
        retrolm.RETRO.from_pretrained(folder)
    assert str(e.value) == (
        f"{folder} holds a 'routing' model, not a 'retro' one: load it with "
        "retrolm.RoutingLanguageModel.from_pretrained (or retrolm.from_pretrained, any family)"
    )


def _edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"retrolm_format": 2},
            r"retrolm_format 2, newer than this retrolm reads \(<= 1\): upgrade",
        ),
        ({"family": "mamba"}, "family 'mamba', which this retrolm does not know.*upgrade"),
        ({"config": {"dim": "wide"}}, "bad model config"),
    ],
)
def test_newer_or_unknown_folders_are_one_line(tmp_path, changes, match):
    folder = tiny("hierarchical").save_pretrained(tmp_path / "h")
    _edit_config(folder, **changes)
    with pytest.raises(IncompatibleError, match=match) as e:
        retrolm.from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_bad_places_are_one_line(tmp_path):
    model = tiny("hierarchical")
    with pytest.raises(FileNotFoundError, match="no folder 'nowhere/at/all'"):
        retrolm.from_pretrained("nowhere/at/all")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"family": "retro", "model_config": {}}')
    with pytest.raises(IncompatibleError, match="training checkpoint.*retrolm export RUN"):
        retrolm.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files in it; save to a new or empty folder"):
        model.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # a folder save_pretrained wrote is replaced whole
    first = model.save_pretrained(tmp_path / "again")
    (tmp_path / ".again.k1ll3d_x.tmp").mkdir()  # left by a killed save: cleaned
    (tmp_path / ".again.v2.k1ll3d_x.tmp").mkdir()  # a save to "again.v2" in progress: kept
    tiny("hierarchical", seed=5).save_pretrained(first)
    assert torch.equal(logits(retrolm.from_pretrained(first)), logits(tiny("hierarchical", 5)))
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [".again.v2.k1ll3d_x.tmp"]


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    with pytest.raises(OSError):
        tiny("hierarchical").save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ---- the Hub, mocked ---------------------------------------------------------------------------
@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub with every network call refused and the two repository calls
    recorded."""
    hf = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import _http

    def no_network(*a, **k):
        raise AssertionError("a test touched the network")

    monkeypatch.setattr(_http, "get_session", no_network)
    calls: dict = {}

    def create_repo(self, repo_id, **kw):
        calls["repo"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        ops = list(operations)
        calls["commit"] = (repo_id, kw)
        calls["files"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in ops}
        return "commit-info"

    monkeypatch.setattr(hf.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hf.HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub_uploads_exactly_the_folder(hub, tmp_path):
    tok = LMTokenizer.train(["words words words and more words"] * 3, 265)
    model = tiny("retro")
    out = model.push_to_hub("someone/tiny-retro", tokenizer=tok, private=True)
    assert out == "commit-info"
    assert hub["repo"] == ("someone/tiny-retro", {"private": True, "exist_ok": True,
                                                  "repo_type": "model"})  # fmt: skip
    assert set(hub["files"]) == MODEL_FILES | {"tokenizer.json"}
    assert b'from_pretrained("someone/tiny-retro")' in hub["files"]["README.md"]
    # the uploaded bytes are a folder that loads back to the same model
    for name, data in hub["files"].items():
        (tmp_path / name).write_bytes(data)
    assert torch.equal(logits(retrolm.RETRO.from_pretrained(tmp_path)), logits(model))
    assert not list(Path(tmp_path).glob(".*"))


def test_from_pretrained_of_a_repo_id_downloads_the_model_files(hub, tmp_path, monkeypatch):
    import huggingface_hub

    model = tiny("routing")
    folder = model.save_pretrained(tmp_path / "cache")
    asked = {}

    def snapshot_download(repo_id, **kw):
        asked.update(kw, repo_id=repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = retrolm.RoutingLanguageModel.from_pretrained("someone/tiny", revision="v1")
    assert torch.equal(logits(loaded), logits(model))
    assert asked["repo_id"] == "someone/tiny" and asked["revision"] == "v1"
    assert set(asked["allow_patterns"]) == set(pretrained.FILES)


def test_huggingface_hub_is_imported_only_for_the_hub(tmp_path):
    """``import retrolm`` and the models import no huggingface_hub; without it, folders
    still save and load, and the Hub is one line naming the extra."""
    script = (
        "import sys, retrolm, retrolm.models.pretrained\n"
        "retrolm.RETRO, retrolm.RoutingLanguageModel, retrolm.HierarchicalTransformer\n"
        "print('huggingface_hub' in sys.modules)\n"
        "sys.modules['huggingface_hub'] = None  # any import of it fails\n"
        "from retrolm.models.registry import get_family\n"
        "fam = get_family('hierarchical')\n"
        "m = fam.build(fam.make_config(preset='hier-tiny'))\n"
        f"retrolm.from_pretrained(m.save_pretrained({str(tmp_path / 'm')!r}))\n"
        "try:\n    m.push_to_hub('a/b')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "False",
        "the Hugging Face Hub needs the optional package huggingface_hub: "
        "pip install 'retrolm[hub]'",
    ]


# ---- the model card ------------------------------------------------------------------------
def test_the_cards_yaml_parses_to_what_was_given():
    yaml = pytest.importorskip("yaml")
    awkward = 'a "quoted": name # not a comment\n\\ é 1e-05 yes'
    modes = {
        "retrieval": {"bits_per_byte": 1.25, "perplexity": 9.5, "tokens": 100},
        "no_retrieval": {"bits_per_byte": 1.5, "perplexity": 12.0, "tokens": 100},
    }
    data = {"kind": "text folder", "name": awkward, "files": 3, "empty": [], "none": None,
            "words": ["yes", "Off", "null", "1e-05", "0x1F", "text-generation", "-"],
            "ratio": 1e-05, "big": 1e20, "huge": 12345678901234}  # fmt: skip
    card = model_card(
        family="retro",
        model_class="RETRO",
        parameters=123456,
        steps=40,
        training_data=data,
        database={"encoder": "tiny-bert", "chunk_size": 4},
        eval_modes=modes,
        eval_table="| mode | bits/byte |\n|---|---:|\n| retrieval | 1.2500 |\n",
        config={"chunk_size": 4},
    )
    head = yaml.safe_load(front_matter(card))
    assert head["library_name"] == "retrolm" and "retro" in head["tags"]
    meta = head["retrolm"]
    assert meta["family"] == "retro" and meta["parameters"] == 123456 and meta["steps"] == 40
    assert meta["training_data"] == data
    assert "library_name: retrolm" in card and "- text-generation" in card  # plain where safe
    assert meta["eval"] == {"retrieval": 1.25, "no_retrieval": 1.5}
    assert "## Evaluation\n\n| mode | bits/byte |\n|---|---:|\n| retrieval | 1.2500 |" in card


# ---- retrolm export ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from tests.retrieval.conftest import write_corpus

    root = tmp_path_factory.mktemp("export")
    corpus = write_corpus(root / "corpus", ["json", "csv"])
    held = write_corpus(root / "held", ["string"])
    model = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "max_seq_len": 32,
             "window_size": 8, "n_local_attn_heads": 1, "causal": True}  # fmt: skip
    train = {"batch_size": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 0,
             "precision": "fp32", "plot": False}  # fmt: skip
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps({"model": "routing", "model_config": model, "train": train}))
    run = root / "run"
    argv = ["train", "--text", str(corpus), "--out", str(run), "--config", str(cfg)]
    assert main([*argv, "--vocab-size", "280", "--steps", "2"]) == 0
    assert main(["eval", str(run), "--text", str(held), "--max-tokens", "60"]) == 0
    return root, run


def test_export_writes_a_folder_that_loads_to_the_run_s_model(text_run, capsys):
    from retrolm.checkpoint import load_model

    yaml = pytest.importorskip("yaml")
    root, run = text_run
    out = root / "shared"
    capsys.readouterr()
    assert main(["export", str(run), str(out), "--name", "me/tiny-routing"]) == 0
    assert "routing model (RoutingLanguageModel, step 2)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == MODEL_FILES | {"tokenizer.json"}
    trained, _ = load_model(run)
    assert torch.equal(logits(retrolm.from_pretrained(out)), logits(trained))
    assert retrolm.load_tokenizer(out).hash == LMTokenizer.from_file(run / "tokenizer.json").hash
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(front_matter(card))["retrolm"]
    assert meta["family"] == "routing" and meta["steps"] == 2
    assert meta["parameters"] == sum(p.numel() for p in trained.parameters())
    assert meta["training_data"]["name"] == "corpus" and meta["training_data"]["files"] == 2
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert meta["eval"]["no_retrieval"] == pytest.approx(
        report["modes"]["no_retrieval"]["bits_per_byte"], abs=1e-6
    )
    assert (
        run / "eval" / "eval.md"
    ).read_text().strip() in card and 'from_pretrained("me/tiny-routing")' in card
    for f in out.iterdir():  # nothing of this machine's paths is shared
        assert str(root) not in f.read_text(errors="replace"), f.name


@pytest.mark.parametrize("case", ["no-run", "not-empty"])
def test_export_bad_input_is_one_line(text_run, capsys, case):
    root, run = text_run
    if case == "no-run":
        argv, match = ["export", str(root / "missing"), str(root / "o1")], "does not exist"
    else:
        (root / "busy").mkdir(exist_ok=True)
        (root / "busy" / "x").write_text("keep")
        argv, match = ["export", str(run), str(root / "busy")], "is not an empty folder"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retrolm export: error: ") and "\n" not in err and match in err, err


def test_export_of_a_retro_run_records_its_database_identity(tmp_path):
    """A RETRO run (written directly: a database build would cost seconds) exports the
    encoder, tokenizer and chunk size of its database, read from the manifest."""
    from retrolm.checkpoint import save_checkpoint
    from retrolm.export import export_run

    tok = LMTokenizer.train(["retrieval chunks of some text"] * 3, 256 + 10)
    db = tmp_path / "db"
    db.mkdir()
    tok.save(db / "tokenizer.json")
    enc = {"name": "tiny-bert", "sha256": "cd" * 32, "pooling": "mean", "max_length": 128,
           "dtype": "fp32", "path": str(tmp_path / "enc")}  # fmt: skip
    manifest = {"complete": True, "chunk_size": 4, "num_chunks": 10, "encoder": enc,
                "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size},
                "inputs": {"files": 1, "bytes": 99, "sha256": "ef" * 32}}  # fmt: skip
    (db / "manifest.json").write_text(json.dumps(manifest))
    model = tiny("retro")
    ident = {"path": str(db), "tokenizer_hash": tok.hash, "chunk_size": 4, "num_chunks": 10}
    meta = {"family": "retro", "model_config": model.config.to_dict(), "step": 7,
            "train_config": {}, "database": ident}  # fmt: skip
    save_checkpoint(tmp_path / "run", model, meta)
    out = export_run(tmp_path / "run", tmp_path / "out")
    saved = retrolm.pretrained_config(out)["database"]
    assert saved["encoder"] == "tiny-bert" and saved["encoder_sha256"] == "cd" * 32
    assert saved["chunk_size"] == 4 and saved["tokenizer_hash"] == tok.hash
    assert torch.equal(logits(retrolm.RETRO.from_pretrained(out)), logits(model))
    assert "## Retrieval database" in (out / "README.md").read_text()
    assert str(tmp_path) not in (out / "config.json").read_text()


def test_export_push_uploads_the_exported_folder(text_run, hub, capsys):
    root, run = text_run
    argv = ["export", str(run), str(root / "pushed"), "--push", "me/tiny", "--private"]
    assert main(argv) == 0
    assert "uploaded to https://huggingface.co/me/tiny" in capsys.readouterr().out
    assert hub["repo"][1]["private"] is True
    assert hub["files"] == {p.name: p.read_bytes() for p in (root / "pushed").iterdir()}
    assert b'from_pretrained("me/tiny")' in hub["files"]["README.md"]
    assert main(["export", str(run), str(root / "np"), "--private"]) == 2
    assert "--private applies to --push" in capsys.readouterr().err


def test_the_cards_eval_table_is_retrolm_eval_s_with_empty_leakage_bins():
    from retrolm.evaluate import EvalResult
    from retrolm.export import eval_markdown

    modes = {m: {"bits_per_byte": b, "perplexity": 9.0, "tokens": 10} for m, b in
             (("retrieval", 1.0), ("no_retrieval", 1.5))}  # fmt: skip
    leakage = [{"alpha": 0.0, "fraction": 0.0, "retrieval": float("nan"),
                "no_retrieval": float("nan")}]  # fmt: skip
    report = json.loads(json.dumps({"modes": modes, "leakage": leakage}).replace("NaN", "null"))
    table = eval_markdown(report)  # eval.json keeps an empty bin's bits/byte as null
    assert table == EvalResult(modes=modes, leakage=leakage).markdown()
    assert "| 0.000 | 0.0% | - | - |" in table
