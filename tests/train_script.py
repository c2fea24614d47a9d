"""Runs a tiny training job (stand-in model and database) for the subprocess tests.

usage: train_script.py RUN_DIR STEPS [KILL_AT_LOSS_CALL]
env: TRAIN_ACCUM (grad_accum, default 1), TRAIN_DROPOUT (default 0.1), TRAIN_FSDP=1 (fsdp),
     TRAIN_STOP_AFTER=N (stop_after),
     TRAIN_KILL_AT=POINT:N (SIGKILL at the N-th time a save reaches fault point POINT),
     TRAIN_PAUSE=PATH (at the first step: create PATH.ready, then wait until PATH exists)
"""

import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

import retrolm.checkpoint  # noqa: E402
from retrolm.models.registry import FAMILIES  # noqa: E402
from retrolm.models.retro.family import retro_loss  # noqa: E402
from retrolm.train import TrainConfig, train  # noqa: E402
from tests.fakes import FakeDatabase, random_docs, register_tiny  # noqa: E402

logging.basicConfig(level=logging.INFO)
register_tiny()
kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
calls = 0


pause = os.environ.get("TRAIN_PAUSE")


def loss(model, batch):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if pause and calls == 1:  # holding the run's lock: let the test try to take it
        Path(pause + ".ready").touch()
        t0 = time.time()
        while not Path(pause).exists() and time.time() - t0 < 120:
            time.sleep(0.01)
    return retro_loss(model, batch)


if os.environ.get("TRAIN_KILL_AT"):
    point, nth = os.environ["TRAIN_KILL_AT"].split(":")
    reached = []

    def kill_at_fault(at: str) -> None:
        reached.append(at)
        if reached.count(point) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    retrolm.checkpoint.FAULT_HOOK = kill_at_fault


FAMILIES["tiny"] = FAMILIES["tiny"].__class__(**{**FAMILIES["tiny"].__dict__, "loss": loss})
db = FakeDatabase(random_docs(40, 60, seed=3), chunk_size=4, seq_chunks=2)
cfg = TrainConfig(
    steps=int(sys.argv[2]),
    batch_size=4,
    seq_len=16,
    warmup_steps=2,
    lr=3e-3,
    save_every=3,
    eval_every=4,
    eval_batches=1,
    val_sequences=4,
    precision="fp32",
    num_threads=1,
    plot=False,
    grad_accum=int(os.environ.get("TRAIN_ACCUM", "1")),
    fsdp=bool(os.environ.get("TRAIN_FSDP")),
    stop_after=int(os.environ["TRAIN_STOP_AFTER"]) if os.environ.get("TRAIN_STOP_AFTER") else None,
)
dropout = float(os.environ.get("TRAIN_DROPOUT", "0.1"))
res = train(db, sys.argv[1], cfg, family="tiny", model_config={"dropout": dropout})
print("FINAL", res.step, res.loss)
