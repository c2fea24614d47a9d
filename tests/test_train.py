import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrolm.checkpoint import list_checkpoints, load_model, resolve_checkpoint
from retrolm.data import RETRODataset
from retrolm.errors import IncompatibleError
from retrolm.models.registry import get_family
from retrolm.train import TrainConfig, lr_at, param_groups, train
from tests.fakes import FakeDatabase, TinyRetro, random_docs, register_tiny

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
register_tiny()


def small_cfg(**kw):
    base = dict(
        steps=6,
        batch_size=4,
        seq_len=16,
        warmup_steps=2,
        lr=3e-3,
        save_every=3,
        eval_every=3,
        eval_batches=1,
        val_sequences=4,
        precision="fp32",
        plot=False,
    )
    return TrainConfig(**{**base, **kw})


def db():
    return FakeDatabase(random_docs(40, 60, seed=3), chunk_size=4, seq_chunks=2)


def losses(run):
    with open(Path(run) / "metrics.csv") as f:
        return [(r["step"], r["loss"], r["val_loss"]) for r in csv.DictReader(f)]


def test_training_lowers_loss_and_writes_a_checkpoint(tmp_path):
    res = train(db(), tmp_path, small_cfg(steps=30, eval_every=10, plot=True), family="tiny")
    rows = losses(tmp_path)
    assert len(rows) == 30 and res.step == 30
    assert float(rows[-1][1]) < float(rows[0][1]) - 0.5
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = resolve_checkpoint(tmp_path)
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors",
        "config.json",
        "train_state.pt",
    }
    model, meta = load_model(tmp_path)
    assert meta["family"] == "tiny" and meta["step"] == 30 and meta["database"]["chunk_size"] == 4
    # the weights are the trained ones: the validation loss of the saved model, computed
    # here on the held-back sequences (the dataset's last ones), is the one logged at step 30
    ds = RETRODataset(db(), seq_len=16, num_neighbours=2)
    n_val = min(4, len(ds) // 10)
    items = [ds[j] for j in range(len(ds) - n_val, len(ds))]
    seq, ret, present = (torch.stack([it[i] for it in items]) for i in range(3))
    with torch.no_grad():
        val = model.eval()(seq, ret, neighbour_mask=present, return_loss=True)
    assert float(rows[-1][2]) == pytest.approx(float(val), abs=2e-6)  # logged with 6 decimals
    fresh = get_family("tiny").model_cls(model.config)
    with torch.no_grad():
        untrained = fresh.eval()(seq, ret, neighbour_mask=present, return_loss=True)
    assert float(untrained) > float(val) + 0.5  # (so the check can fail)
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["step"] == 30 and state["precision"] == "fp32"


def test_no_retrieval_trains_the_same_decoder_without_neighbours(tmp_path, monkeypatch):
    seen = []
    orig = TinyRetro.forward

    def spy(self, seq, retrieved=None, **kw):
        seen.append(retrieved is None)
        return orig(self, seq, retrieved, **kw)

    monkeypatch.setattr(TinyRetro, "forward", spy)
    train(db(), tmp_path / "a", small_cfg(steps=2, retrieval=False, eval_every=0), family="tiny")
    assert seen and all(seen)
    seen.clear()
    train(db(), tmp_path / "b", small_cfg(steps=2, eval_every=0), family="tiny")
    assert seen and not any(seen)


def test_validation_is_also_logged_with_retrieval_off_and_plotted(tmp_path, monkeypatch):
    """A retrieval run logs val_loss (neighbours read) and val_loss_no_retrieval (none), each
    the loss of the held-back sequences read that way; the option and a run without
    retrieval log only the first."""
    from retrolm.models.retro.family import retro_loss
    from retrolm.train import metrics as metrics_mod

    plotted = []
    monkeypatch.setattr(metrics_mod, "save_figure", lambda fig, path: plotted.append(fig))
    train(db(), tmp_path / "a", small_cfg(steps=3, plot=True), family="tiny")
    with open(tmp_path / "a" / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    model, _ = load_model(tmp_path / "a")
    # the oracle: the last validation sequences' loss, each way, at the saved weights
    from retrolm.data import RETRODataset
    from retrolm.train.batches import collate

    ds = RETRODataset(db(), seq_len=16, num_neighbours=2)
    n_val = min(4, len(ds) // 10)  # small_cfg's val_sequences, at most a tenth
    items = [ds[i] for i in range(len(ds) - n_val, len(ds))]
    with torch.no_grad():
        model.eval()
        on = float(retro_loss(model, collate(items, True)))
        off = float(retro_loss(model, collate(items, False)))
    assert float(row["val_loss"]) == pytest.approx(on, abs=1e-5)
    assert float(row["val_loss_no_retrieval"]) == pytest.approx(off, abs=1e-5)
    assert on != pytest.approx(off, abs=1e-4)
    labels = [line.get_label() for line in plotted[-1].axes[0].lines]
    assert labels == ["train loss", "validation loss", "validation, retrieval off"]
    for run, kw in (("b", dict(val_without_retrieval=False)), ("c", dict(retrieval=False))):
        train(db(), tmp_path / run, small_cfg(steps=3, **kw), family="tiny")
        with open(tmp_path / run / "metrics.csv") as f:
            row = list(csv.DictReader(f))[-1]
        assert row["val_loss"] and not row["val_loss_no_retrieval"]


def test_grad_accumulation_sees_the_same_batch(tmp_path):
    train(db(), tmp_path / "a", small_cfg(steps=1, eval_every=0), family="tiny")
    train(db(), tmp_path / "b", small_cfg(steps=1, eval_every=0, grad_accum=2), family="tiny")
    # same sequences, split in two micro-batches: the mean of the halves' token means is
    # the batch loss up to how pad labels split between the halves
    la, lb = float(losses(tmp_path / "a")[0][1]), float(losses(tmp_path / "b")[0][1])
    assert la == pytest.approx(lb, rel=0.02)


def test_weight_decay_groups_and_schedule():
    model = TinyRetro()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "qkv.weight",
        "ret.weight",
        "ff.0.weight",
        "ff.2.weight",
        "out.weight",
    }
    assert "tok.weight" in {names[id(p)] for p in no_decay["params"]}
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(55, cfg) == pytest.approx(0.55)


def run_script(run: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / "train_script.py"), str(run), *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """train_script.py's 8 steps, never interrupted (checkpoints at steps 3, 6 and 8)."""
    run = tmp_path_factory.mktemp("full") / "run"
    done = run_script(run, "8")
    assert done.returncode == 0, done.stderr
    return run


def assert_same_run(run: Path, full: Path) -> None:
    assert losses(run) == losses(full)
    assert len(losses(full)) == 8
    a, _ = load_model(full)
    b, _ = load_model(run)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "point, nth, resumes_at",
    [  # the n-th time the saves reach the point: saves are at steps 3, 6, 8; KEEP is 2
        pytest.param("files-written", 2, 3, marks=pytest.mark.slow),
        ("folder-renamed", 2, 6),  # step 6 is whole, latest.json still names step 3
        pytest.param("pointer-written", 2, 6, marks=pytest.mark.slow),
        pytest.param("old-moved-aside", 1, 8, marks=pytest.mark.slow),
    ],
)
def test_a_run_killed_inside_a_save_resumes_from_the_newest_whole_checkpoint(
    tmp_path, full_run, point, nth, resumes_at
):
    cut = tmp_path / "cut"
    killed = run_script(cut, "8", env={"TRAIN_KILL_AT": f"{point}:{nth}"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = run_script(cut, "8")
    assert again.returncode == 0, again.stderr[-2000:]
    step_dir = cut / "checkpoints" / f"step-{resumes_at:08d}"
    if resumes_at < 8:
        assert f"resuming {cut} at step {resumes_at} from {step_dir}" in again.stderr
    else:  # killed after the last checkpoint was committed: nothing left to train
        assert "already trained for 8 steps" in again.stderr
    assert_same_run(cut, full_run)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, full_run):
    # killed during step 7 (after the step-6 checkpoint), in the middle of a step: the 9th
    # loss call (steps 1-6, and the validation at step 4 with and without retrieval)
    killed = run_script(tmp_path / "cut", "8", "9")
    assert killed.returncode == -9
    state = torch.load(resolve_checkpoint(tmp_path / "cut") / "train_state.pt", weights_only=True)
    assert state["step"] == 6
    again = run_script(tmp_path / "cut", "8")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert_same_run(tmp_path / "cut", full_run)


def test_a_second_trainer_of_one_run_fails_at_once(tmp_path, full_run):
    """Two processes, one --out: the second fails naming the folder and the holder's pid;
    the first finishes with the rows and weights of a run that was alone."""
    run, go = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, str(HERE / "train_script.py"), str(run), "8"],
        env={**ENV, "TRAIN_PAUSE": str(go)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.time()
        while not Path(f"{go}.ready").exists():  # the first holds the lock and is training
            assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()
            time.sleep(0.01)
        second = run_script(run, "8")
        message = f"run {run} is being written by another retrolm process (pid {first.pid})"
        assert second.returncode != 0 and message in second.stderr
        assert "FINAL" not in second.stdout
    finally:
        go.touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert_same_run(run, full_run)  # one writer: 8 rows, each step once


def test_resume_refuses_other_settings_and_families(tmp_path):
    train(db(), tmp_path, small_cfg(steps=3, eval_every=0), family="tiny")
    with pytest.raises(IncompatibleError, match="trained with lr=0.003, now 0.01"):
        train(db(), tmp_path, small_cfg(steps=6, lr=1e-2), family="tiny")
    with pytest.raises(IncompatibleError, match="holds a 'tiny' run, not 'retro'"):
        train(db(), tmp_path, small_cfg(steps=6), family="retro")
    other = FakeDatabase(random_docs(40, 60, seed=4), chunk_size=4, seq_chunks=2)
    with pytest.raises(IncompatibleError, match="num_chunks"):
        train(other, tmp_path, small_cfg(steps=6), family="tiny")
    # longer training of the same run is allowed and continues from step 3
    assert train(db(), tmp_path, small_cfg(steps=4, eval_every=0), family="tiny").step == 4


def test_resume_refuses_another_model_config(tmp_path):
    model = dict(
        chunk_size=4, max_seq_len=16, dec_dim=16, dec_depth=2, dec_cross_attn_layers=(2,),
        enc_dim=16, enc_depth=1, heads=2, dim_head=8,
    )  # fmt: skip
    cfg = small_cfg(steps=3, eval_every=0)
    train(db(), tmp_path, cfg, family="retro", model_config=model)
    with pytest.raises(IncompatibleError, match="model copy_head=False, now True"):
        train(db(), tmp_path, cfg, family="retro", model_config={**model, "copy_head": True})
    # the same model config, or none at all, resumes the run as it was saved
    more = small_cfg(steps=4, eval_every=0)
    assert train(db(), tmp_path, more, family="retro", model_config=model).step == 4
    assert train(db(), tmp_path, small_cfg(steps=5, eval_every=0), family="retro").step == 5


def test_corrupt_and_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; train one"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_model(tmp_path)
    train(db(), tmp_path, small_cfg(steps=1, eval_every=0), family="tiny")
    w = resolve_checkpoint(tmp_path) / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(IncompatibleError, match="model.safetensors cannot be loaded"):
        load_model(tmp_path)
    (resolve_checkpoint(tmp_path) / "config.json").write_text("{not json")
    with pytest.raises(IncompatibleError, match="config.json is corrupt"):
        load_model(tmp_path)


def test_load_refuses_another_family(tmp_path):
    train(db(), tmp_path, small_cfg(steps=1, eval_every=0), family="tiny")
    with pytest.raises(IncompatibleError, match="holds a 'tiny' model, not 'retro'"):
        load_model(tmp_path, family="retro")


def test_unknown_family_and_bad_config():
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        get_family("nope")
    with pytest.raises(ValueError, match="grad_accum 3"):
        TrainConfig(batch_size=8, grad_accum=3)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_ddp_two_cpu_processes_equal_one_process_accumulating(tmp_path):
    script = str(HERE / "train_script.py")
    env = {**ENV, "TRAIN_DROPOUT": "0.0"}
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            script,
            str(tmp_path / "ddp"),
            "5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), "5"],
        env={**env, "TRAIN_ACCUM": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    # each rank holds half of every batch, as each accumulation step does
    for (s1, l1, _), (s2, l2, _) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "one")):
        assert s1 == s2 and float(l1) == pytest.approx(float(l2), abs=1e-4)
    a, _ = load_model(tmp_path / "ddp")
    b, _ = load_model(tmp_path / "one")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-4)


@pytest.mark.slow
def test_fsdp_run_stopped_and_resumed_equals_one_process_accumulating(tmp_path):
    """FSDP2 over 2 processes: checkpoints gather the shards (a one-process load works), a
    resumed sharded run loads them back into the shards, and every step's loss and the final
    weights equal one process accumulating the two halves."""
    script = str(HERE / "train_script.py")
    env = {**ENV, "TRAIN_DROPOUT": "0.0", "TRAIN_FSDP": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for extra in ({"TRAIN_STOP_AFTER": "3"}, {}):
        fsdp = subprocess.run(
            [*launch, "--nproc_per_node=2", script, str(tmp_path / "fsdp"), "5"],
            env={**env, **extra}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert fsdp.returncode == 0, fsdp.stderr[-3000:]
        assert "units sharded over 2 processes" in fsdp.stderr
    assert "resuming" in fsdp.stderr
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), "5"],
        env={**ENV, "TRAIN_DROPOUT": "0.0", "TRAIN_ACCUM": "2"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    rows = losses(tmp_path / "fsdp")
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    for (s1, l1, v1), (s2, l2, v2) in zip(rows, losses(tmp_path / "one"), strict=True):
        assert s1 == s2 and float(l1) == pytest.approx(float(l2), abs=1e-4)
        assert (v1 == v2 == "") or float(v1) == pytest.approx(float(v2), abs=1e-4)
    # the models compute the same function (compared by their outputs: a gradient that is
    # zero in exact arithmetic, such as the key bias's, is rounding noise that Adam scales
    # up to learning-rate-sized steps differently in each reduction order)
    a, _ = load_model(tmp_path / "fsdp")
    b, _ = load_model(tmp_path / "one")
    seq = torch.randint(2, 40, (3, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(seq), b(seq), atol=1e-4, rtol=1e-4)


def test_a_ddp_job_on_a_run_another_process_holds_fails_on_every_rank(tmp_path):
    """Rank 0 takes the run's lock for the job; when it cannot, every rank stops (none
    waits forever in a collective) and the run folder is left as it was."""
    import signal

    from tests.test_locking import hold

    run = tmp_path / "run"
    holder = hold(run)
    try:
        ddp = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc_per_node=2", str(HERE / "train_script.py"), str(run), "3"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert ddp.returncode != 0
    assert f"run {run} is being written by another retrolm process (pid {holder.pid})" in (
        ddp.stderr
    )
    assert f"run {run} is being written by another process" in ddp.stderr  # rank 1's
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_stop_after_then_continue_equals_one_run(tmp_path):
    train(db(), tmp_path / "full", small_cfg(steps=6, eval_every=0), family="tiny")
    part = train(
        db(), tmp_path / "cut", small_cfg(steps=6, eval_every=0, stop_after=4), family="tiny"
    )
    assert part.step == 4
    train(db(), tmp_path / "cut", small_cfg(steps=6, eval_every=0), family="tiny")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    res = train(db(), tmp_path, small_cfg(steps=50, eval_every=0, max_minutes=1e-6), family="tiny")
    assert res.step == 1
    state = torch.load(resolve_checkpoint(tmp_path) / "train_state.pt", weights_only=True)
    assert state["step"] == 1


def test_copy_head_run_resumes_exactly_and_scales_its_learning_rate(tmp_path):
    """The copy head's optimizer group (lr_scale) survives a stop and resume bit for bit."""
    model_config = dict(
        chunk_size=4, max_seq_len=16, dec_dim=16, dec_depth=2, dec_cross_attn_layers=(2,),
        enc_dim=16, enc_depth=1, heads=2, dim_head=8, copy_head=True,
    )  # fmt: skip
    kw = dict(family="retro", model_config=model_config)
    cfg = dict(steps=6, eval_every=0)
    train(db(), tmp_path / "full", small_cfg(**cfg), **kw)
    train(db(), tmp_path / "cut", small_cfg(**cfg, stop_after=3), **kw)
    train(db(), tmp_path / "cut", small_cfg(**cfg), **kw)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    model, _ = load_model(tmp_path / "full")
    state = torch.load(resolve_checkpoint(tmp_path / "full") / "train_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    scaled = [g for g in groups if g["lr_scale"] != 1.0]
    assert len(scaled) == 1 and len(scaled[0]["params"]) == 3
    base = [g for g in groups if g["lr_scale"] == 1.0][0]
    assert scaled[0]["lr"] == pytest.approx(10 * base["lr"])
    assert model.copy_head is not None


@pytest.mark.parametrize("family", ["routing", "hierarchical"])
def test_a_family_without_a_model_config_trains_its_default_preset(tmp_path, family):
    # the database supplies the vocabulary and pad id; those alone are not a model config
    from retrolm.models.registry import config_to_dict

    fam = get_family(family)
    res = train(db(), tmp_path, small_cfg(steps=1, eval_every=0), family=family)
    assert res.step == 1
    _model, meta = load_model(tmp_path)
    saved = meta["model_config"]
    expected = config_to_dict(fam.make_config(None, fam.default_preset))
    derived = {"num_tokens", "pad_id"}
    assert {k: v for k, v in saved.items() if k not in derived} == {
        k: v for k, v in expected.items() if k not in derived
    }
    assert saved["num_tokens"] == db().tokenizer.vocab_size


def test_retro_without_a_model_config_trains_the_cpu_sized_preset():
    from retrolm.train.loop import _model_config

    cfg = _model_config(
        get_family("retro"), FakeDatabase(random_docs(4, 80), chunk_size=64), None, None
    )
    assert (cfg.dec_dim, cfg.dec_depth, cfg.max_seq_len, cfg.chunk_size) == (256, 6, 512, 64)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    from retrolm.train import Metrics

    header = ",".join(Metrics.COLUMNS)
    rows = [f"{s},{5 - s / 10:.6f},,1.000e-03,0.5,100.0,{s}.00," for s in range(1, 5)]
    before = "\n".join([header, *rows, "1"]) + "\n"  # a kill cut step 10's row after "1"
    (tmp_path / "metrics.csv").write_text(before)

    def disk_full(self, rows):
        self.writerow(rows[0])
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(csv.DictWriter, "writerows", disk_full)
        with pytest.raises(OSError, match="No space left"):
            Metrics(tmp_path, resume_step=2, enabled=True)
    assert (tmp_path / "metrics.csv").read_text() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left
    Metrics(tmp_path, resume_step=4, enabled=True).close()
    # rows up to the checkpoint kept as they were; the cut row dropped
    assert [r[0] for r in losses(tmp_path)] == ["1", "2", "3", "4"]
    assert (tmp_path / "metrics.csv").read_text() == "\n".join([header, *rows]) + "\n"


def test_a_run_of_the_older_checkpoint_layout_resumes_exactly(tmp_path):
    """Runs saved before versioned checkpoints (one RUN/checkpoint/ folder) resume as ever,
    and save in the new layout from then on."""
    train(db(), tmp_path / "full", small_cfg(steps=6, eval_every=0), family="tiny")
    old = tmp_path / "old"
    train(db(), old, small_cfg(steps=6, eval_every=0, stop_after=3), family="tiny")
    (old / "checkpoints" / "step-00000003").rename(old / "checkpoint")
    shutil.rmtree(old / "checkpoints")
    assert resolve_checkpoint(old) == old / "checkpoint"
    assert train(db(), old, small_cfg(steps=6, eval_every=0), family="tiny").step == 6
    assert losses(old) == losses(tmp_path / "full")
    # the old folder is now the older of the KEEP (2) checkpoints; the next save drops it
    assert list_checkpoints(old) == [(3, old / "checkpoint"), (6, resolve_checkpoint(old))]
    assert resolve_checkpoint(old) == old / "checkpoints" / "step-00000006"
