"""The checkpoint protocol: a kill between any two of its steps loses no whole checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import retrolm.checkpoint as ck
from retrolm.utils import atomic_path

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}

# For each fault point: save steps 1 and 2 of a stand-in run in RUN_ROOT/POINT, then fork
# a child that SIGKILLs itself at POINT while it saves step 3 (a real kill, with one import
# of torch for all points). Prints each child's exit signal as JSON.
KILL_DURING_SAVE = """
import json, os, signal, sys
import retrolm.checkpoint as ck
from tests.test_checkpoint import saved_state

root, signals = sys.argv[1], {}
for point in ck.FAULT_POINTS:
    run = os.path.join(root, point)
    for step in (1, 2):
        ck.save_checkpoint(run, *saved_state(step))
    third = saved_state(3)  # made before the fork: the child only writes
    pid = os.fork()
    if pid == 0:
        def kill(at, point=point):
            if at == point:
                os.kill(os.getpid(), signal.SIGKILL)
        ck.FAULT_HOOK = kill
        try:
            ck.save_checkpoint(run, *third)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    signals[point] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
print(json.dumps(signals))
"""


def saved_state(step: int) -> tuple[nn.Module, dict, dict]:
    """What a run saves at ``step``: weights, config and train state, a function of step."""
    torch.manual_seed(step)
    model = nn.Linear(3, 2)
    meta = {"family": "stand-in", "model_config": {}, "step": step}
    return model, meta, {"step": step, "position": 10 * step, "rng": torch.randn(5)}


def assert_holds(ckpt: Path, step: int) -> None:
    """``ckpt`` holds exactly what ``saved_state(step)`` saved."""
    from safetensors.torch import load_model

    model, _, state = saved_state(step)
    loaded = nn.Linear(3, 2)
    load_model(loaded, str(ckpt / ck.WEIGHTS))
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)  # the same bytes, written and read back
    got = ck.load_train_state(ckpt)
    assert got["step"] == step and got["position"] == 10 * step
    assert torch.equal(got["rng"], state["rng"])
    assert ck.read_config(ckpt)["step"] == step


def test_a_save_passes_every_fault_point_in_order(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ck, "FAULT_HOOK", seen.append)
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, *saved_state(step))
    # the third save is the first to delete one (KEEP = 2)
    assert seen[-len(ck.FAULT_POINTS) :] == list(ck.FAULT_POINTS)
    names = sorted(p.name for p in (tmp_path / ck.CHECKPOINTS_DIR).iterdir())
    assert names == [ck.POINTER, "step-00000002", "step-00000003"]
    assert json.loads((tmp_path / ck.CHECKPOINTS_DIR / ck.POINTER).read_text()) == {
        "checkpoint": "step-00000003",
        "step": 3,
    }
    assert_holds(ck.resolve_checkpoint(tmp_path), 3)


def test_a_kill_at_every_step_of_a_save_keeps_the_newest_whole_checkpoint(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    signals = json.loads(done.stdout.splitlines()[-1])
    assert signals == dict.fromkeys(ck.FAULT_POINTS, 9)  # each save killed at its point
    committed = ck.FAULT_POINTS.index("folder-renamed")
    for i, point in enumerate(ck.FAULT_POINTS):
        run = tmp_path / point
        # step 3 once its folder is renamed into place, else step 2: never less
        want = 3 if i >= committed else 2
        ckpt = ck.find_checkpoint(run)
        assert ckpt == run / ck.CHECKPOINTS_DIR / f"step-{want:08d}", point
        assert_holds(ck.resolve_checkpoint(run), want)
        # the next save finishes the job: temporaries gone, KEEP checkpoints, pointer moved
        ck.save_checkpoint(run, *saved_state(4))
        names = sorted(p.name for p in (run / ck.CHECKPOINTS_DIR).iterdir())
        assert names == [ck.POINTER, f"step-{want:08d}", "step-00000004"], point
        assert [p.name for p in run.iterdir()] == [ck.CHECKPOINTS_DIR]
        assert_holds(ck.resolve_checkpoint(run), 4)


def test_a_newer_whole_folder_wins_over_a_stale_pointer(tmp_path, caplog):
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, *saved_state(step))
    pointer = tmp_path / ck.CHECKPOINTS_DIR / ck.POINTER
    pointer.write_text(json.dumps({"checkpoint": "step-00000001", "step": 1}))
    with caplog.at_level("INFO", logger="retrolm.checkpoint"):
        assert ck.find_checkpoint(tmp_path).name == "step-00000002"
    assert "names step-00000001, but" in caplog.text
    pointer.unlink()  # no pointer at all: still the newest whole folder
    assert ck.find_checkpoint(tmp_path).name == "step-00000002"
    # a folder without its weights is not whole, whatever its name
    (tmp_path / ck.CHECKPOINTS_DIR / "step-00000002" / ck.WEIGHTS).unlink()
    assert ck.find_checkpoint(tmp_path).name == "step-00000001"


def test_the_older_single_folder_layout_is_still_read_and_then_replaced(tmp_path):
    ck.save_checkpoint(tmp_path, *saved_state(5))
    legacy = tmp_path / ck.LEGACY_DIR  # RUN/checkpoint/, as runs of earlier versions hold
    (tmp_path / ck.CHECKPOINTS_DIR / "step-00000005").rename(legacy)
    shutil.rmtree(tmp_path / ck.CHECKPOINTS_DIR)
    assert ck.resolve_checkpoint(tmp_path) == legacy
    assert ck.resolve_checkpoint(legacy) == legacy
    assert_holds(legacy, 5)
    for step in (6, 7):
        ck.save_checkpoint(tmp_path, *saved_state(step))
    assert not legacy.exists()  # older than the KEEP newest
    assert ck.run_of(ck.resolve_checkpoint(tmp_path)) == tmp_path


def test_atomic_path_refuses_to_replace_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="cannot replace a directory atomically"):
        with atomic_path(tmp_path / "d"):
            pass
    with atomic_path(tmp_path / "new") as tmp:  # a new directory is fine
        tmp.mkdir()
        (tmp / "f").write_text("x")
    assert (tmp_path / "new" / "f").read_text() == "x"
