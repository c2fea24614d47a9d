"""Runs a tiny training job (stand-in model and database) for the subprocess tests.

usage: train_script.py RUN_DIR STEPS [KILL_AT_LOSS_CALL]
env: TRAIN_ACCUM (grad_accum, default 1), TRAIN_DROPOUT (default 0.1)
"""

import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from retrolm.models.registry import FAMILIES, retro_loss  # noqa: E402
from retrolm.train import TrainConfig, train  # noqa: E402
from tests.fakes import FakeDatabase, random_docs, register_tiny  # noqa: E402

logging.basicConfig(level=logging.INFO)
register_tiny()
kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
calls = 0


def loss(model, batch):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return retro_loss(model, batch)


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
)
dropout = float(os.environ.get("TRAIN_DROPOUT", "0.1"))
res = train(db, sys.argv[1], cfg, family="tiny", model_config={"dropout": dropout})
print("FINAL", res.step, res.loss)
