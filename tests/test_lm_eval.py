"""The lm-evaluation-harness adapter on a tiny RETRO run and a local JSON task, offline:
rolling log-likelihood equals ``retrolm.evaluate`` on the same text, retrieval changes it,
and loglikelihood / generate_until agree with each other."""

import json
import math

import pytest

pytest.importorskip(
    "lm_eval",
    reason="lm-eval is an optional extra: pip install --no-deps lm-eval==0.4.13 and the "
    "'lmeval' extra of pyproject.toml",
)
pytest.importorskip("datasets", reason="lm-eval's tasks load their data with datasets")

from retrolm.checkpoint import load_model, open_run_data, resolve_checkpoint  # noqa: E402
from retrolm.evaluate import EvalConfig, evaluate  # noqa: E402
from tests.retrieval.conftest import (  # noqa: E402
    TINY_DB,
    TINY_RETRO,
    make_tiny_encoder,
    module_text,
    write_corpus,
)

MODEL = TINY_RETRO
TASK = "retrolm_local_ppl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from retrolm.cli import main
    from retrolm.retrieval import BuildConfig, build_database

    root = tmp_path_factory.mktemp("lmeval")
    corpus = write_corpus(root / "corpus", ["json", "csv", "textwrap"])
    build_database(
        corpus, root / "db", BuildConfig(encoder=str(make_tiny_encoder(root / "enc")), **TINY_DB)
    )
    train = {"batch_size": 2, "warmup_steps": 1, "precision": "fp32", "plot": False}
    (root / "cfg.json").write_text(json.dumps({"model_config": MODEL, "train": train}))
    argv = ["train", "--db", str(root / "db"), "--out", str(root / "run")]
    assert main([*argv, "--config", str(root / "cfg.json"), "--steps", "2"]) == 0
    # held-out documents: as .txt files for retrolm eval, as JSON lines for the task
    texts = [module_text(name)[:700].strip() for name in ("string", "shlex")]
    (root / "held").mkdir()
    for i, text in enumerate(texts):
        (root / "held" / f"{i}.txt").write_text(text, encoding="utf-8")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {json.dumps(str(data))}}}\n"
        f"  cache_dir: {json.dumps(str(root / 'hf_cache'))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return root, texts


def _harness_nll(root, texts, retrieval: str) -> float:
    """Total NLL (nats) of the task's documents through ``lm_eval.simple_evaluate``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import retrolm.lm_eval_adapter  # noqa: F401  (registers the "retrolm" model)

    out = simple_evaluate(
        model="retrolm",
        model_args=f"run={root / 'run'},retrieval={retrieval}",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(root / "tasks")),
        log_samples=False,
    )
    bpb = out["results"][TASK]["bits_per_byte,none"]
    # lm-eval's bits/byte: -sum(loglikelihood) / sum(UTF-8 bytes of each document) / ln 2
    return bpb * math.log(2) * sum(len(t.encode("utf-8")) for t in texts)


def test_rolling_equals_retrolm_eval(setup, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    root, texts = setup
    model, meta = load_model(root / "run")
    db, tok = open_run_data(meta, resolve_checkpoint(root / "run"))
    res = evaluate(model, root / "held", db, tokenizer=tok, config=EvalConfig(batch_size=4))
    on, off = _harness_nll(root, texts, "on"), _harness_nll(root, texts, "off")
    for mode, got in (("retrieval", on), ("no_retrieval", off)):
        want = res.modes[mode]["nll_per_token"] * res.modes[mode]["tokens"]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), mode
    assert abs(on - off) > 1e-3  # the neighbours change the score


def test_loglikelihood_and_generate_until_agree(setup):
    import torch
    from lm_eval.api.instance import Instance

    from retrolm.generation import generate
    from retrolm.lm_eval_adapter import RetroLMEval

    root, texts = setup
    lm = RetroLMEval(run=str(root / "run"), retrieval="on")

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    # chain rule: log p(x1 x2 | c) = log p(x1 | c) + log p(x2 | c x1) (split at spaces)
    words = texts[0][:120].split(" ")
    c, x1, x2 = " ".join(words[:4]), " " + " ".join(words[4:8]), " " + " ".join(words[8:])
    (whole, _), (first, _), (second, _) = lm.loglikelihood(
        [req("loglikelihood", a) for a in ((c, x1 + x2), (c, x1), (c + x1, x2))]
    )
    assert whole == pytest.approx(first + second, rel=1e-5) and whole < 0
    # generate_until is greedy decoding with the database (its tokens are each the argmax
    # of the windowed, retrieving scorer) cut at the first stop string
    ctx = lm.tok.encode(c)
    (full,) = lm.generate_until([req("generate_until", (c, {"max_gen_toks": 12}))])
    res = generate(lm.model, torch.tensor(ctx), 12, lm.db, temperature=0.0, eos_id=1)
    new = res.new_ids[0].tolist()
    assert full == lm.tok.decode(new) and full
    _nll, greedy = lm._nll(ctx + new)
    assert greedy[len(ctx) :].all()
    stop = full[len(full) // 2 :][:2]
    (cut,) = lm.generate_until([req("generate_until", (c, {"max_gen_toks": 12, "until": [stop]}))])
    assert stop not in cut and full.startswith(cut)
    with pytest.raises(ValueError, match="retrieval='maybe'"):
        RetroLMEval(run=str(root / "run"), retrieval="maybe")
