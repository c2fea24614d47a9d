"""The demo's printed report: every scored row, the gain against the baseline, the plan."""

from retrolm.demo import format_report


def _mode(bpb, ppl):
    return {"bits_per_byte": bpb, "perplexity": ppl}


def report(**results):
    return {
        "plan": {
            "embed_chunks_per_s": 120.0,
            "train_step_s": 0.4,
            "precision": "bf16",
            "budget_s": 900.0,
            "books": ["a", "b"],
            "train_chars": 2_000_000,
            "steps": 1000,
            "batch_size": 8,
            "eval_max_tokens": 40000,
        },
        "database": {"chunks": 1234},
        "results": {
            "baseline_no_retrieval": _mode(1.30, 33.0),
            "retro_retrieval_off": _mode(1.32, 35.0),
            "retro_with_retrieval": _mode(1.16, 24.0),
            "steps": 800,
            "baseline_steps": 800,
            "neighbours": 10,
            "leakage": [],
            **results,
        },
        "retrieval_gain": 1 - 1.16 / 1.30,
        "generation": {"prompt": "In the beginning", "continuation": "God", "sources": []},
        "times_s": {"train_retro": 300.0},
        "wall_s": 650.0,
    }


def test_report_lists_each_mode_and_the_gain():
    text = format_report(report(retro_no_copy_head=_mode(1.319, 34.9)))
    assert "RETRO, CCA only (copy head off)     1.3190" in text
    assert "RETRO, retrieval on                 1.1600" in text
    assert "10.8% lower bits/byte" in text
    assert "800 steps (planned 1000)" in text and "10 neighbours per chunk" in text


def test_report_of_a_run_without_the_copy_head_row():
    text = format_report(report(retro_no_copy_head=None))
    assert "copy head off" not in text
    assert "baseline decoder (no retrieval)     1.3000" in text


def test_a_cached_file_that_cannot_be_read_is_computed_again(tmp_path, caplog):
    from retrolm.demo import _cached_json
    from retrolm.utils import write_json

    path = tmp_path / "eval.json"
    assert _cached_json(path) is None  # nothing saved yet
    write_json(path, {"steps": 800})
    assert _cached_json(path) == {"steps": 800}
    path.write_text('{"steps": 8')  # truncated, e.g. by an older version killed mid-write
    assert _cached_json(path) is None
    path.write_text("[1, 2]")  # valid JSON, but not what the demo saves
    assert _cached_json(path) is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all(str(path) in m for m in warned)


def test_a_work_folder_from_another_version_gets_a_one_line_hint(tmp_path, monkeypatch, capsys):
    """An IncompatibleError from training (e.g. runs saved by another retrolm version) reaches
    the command line as one line that says to use a new --work folder. The stages before
    training are stubbed: this checks the demo's error path, not the pipeline."""
    import retrolm.demo as demo
    import retrolm.retrieval as retrieval
    import retrolm.train as train_mod
    from retrolm.cli import main
    from retrolm.errors import IncompatibleError

    plan = demo.DemoPlan(900.0, 100.0, 0.4, "fp32", ["a"], 1000, 10, 8, 1000)
    monkeypatch.setattr(demo, "extract", lambda corpus, work: tmp_path / "kjv")
    monkeypatch.setattr(demo, "make_plan", lambda *a, **k: plan)
    monkeypatch.setattr(demo, "_split", lambda kjv, work, books: (tmp_path / "t", tmp_path / "h"))
    monkeypatch.setattr(retrieval, "build_database", lambda *a, **k: None)
    monkeypatch.setattr(retrieval.RetrievalDatabase, "open", staticmethod(lambda path: object()))

    def train(*args, **kwargs):
        raise IncompatibleError("runs/retro was trained with model dec_dim=64, now 128")

    monkeypatch.setattr(train_mod, "train", train)
    work = tmp_path / "work"
    assert main(["demo", "--work", str(work), "--corpus", str(tmp_path / "kjv.tar.xz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(for the demo: pass a new --work folder)")
    assert "dec_dim=64, now 128" in err and len(err.splitlines()) == 1
    assert (work / "plan.json").is_file()  # the plan was saved before training started
