"""Training: ``loop.py`` the loop (resume, DDP, evaluation, checkpoints), ``config.py`` its
settings, ``optim.py`` parameter groups and schedule, ``precision.py`` fp32/bf16 and the
``auto`` choice, ``batches.py`` the data order, ``metrics.py`` the log."""

from retrolm.train.batches import BatchOrder, batches, collate
from retrolm.train.config import PRECISIONS, RESUMABLE_CHANGES, TrainConfig, TrainResult
from retrolm.train.loop import train
from retrolm.train.metrics import Metrics
from retrolm.train.optim import lr_at, param_groups
from retrolm.train.precision import autocast, choose_precision, time_precisions

__all__ = [
    "PRECISIONS",
    "RESUMABLE_CHANGES",
    "BatchOrder",
    "Metrics",
    "TrainConfig",
    "TrainResult",
    "autocast",
    "batches",
    "choose_precision",
    "collate",
    "lr_at",
    "param_groups",
    "time_precisions",
    "train",
]
