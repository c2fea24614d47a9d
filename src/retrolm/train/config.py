"""The training run's settings (``TrainConfig``, with a docstring per field: the CLI's
help) and its result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrolm.config import dataclass_from_dict

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one run (``train`` section of --config)."""

    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this number)."""
    batch_size: int = 8
    """Sequences per optimizer step, over all processes and accumulation steps."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int | None = None
    """Training sequence length in tokens (multiple of the chunk size); default max_seq_len."""
    num_neighbours: int = 2
    """Neighbours per chunk fed to the model (the paper trains with 2)."""
    retrieval: bool = True
    """False trains the same decoder without neighbours (the baseline, RETRO[OFF])."""
    lr: float = 3e-4
    """Peak learning rate after warmup."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio (paper: 0.1)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    weight_decay: float = 0.1
    """AdamW decay for weight matrices; norms, biases and embeddings get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    precision: str = "auto"
    """fp32, bf16 (autocast) or auto (time one step each way, keep the faster)."""
    eval_every: int = 100
    """Validation loss every this many steps (0 disables)."""
    eval_batches: int = 4
    """Batches of held-back sequences per validation."""
    val_sequences: int = 16
    """Database sequences held back from training for the validation loss."""
    val_without_retrieval: bool = True
    """A retrieval model also logs its validation loss with retrieval off
    (``val_loss_no_retrieval``), so the gap retrieval makes shows over training."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    num_threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""
    prefetch: int = 2
    """Batches prepared ahead by a background thread (0: load inline)."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state across the processes
    (FSDP2) instead of replicating them (DDP); checkpoints stay loadable by one process."""
    plot: bool = True
    """Write loss.png (needs matplotlib)."""
    stop_after: int | None = None
    """Stop (with a checkpoint) at this step, keeping the schedule of ``steps``."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall time in this process; rerun to go on."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "num_neighbours": self.num_neighbours >= 0,
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "eval_every": self.eval_every >= 0,
            "save_every": self.save_every >= 1,
            "val_sequences": self.val_sequences >= 0,
            "prefetch": self.prefetch >= 0,
            "seq_len": self.seq_len is None or self.seq_len >= 1,
            "stop_after": self.stop_after is None or self.stop_after >= 1,
            "max_minutes": self.max_minutes is None or self.max_minutes > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "TrainConfig") -> TrainConfig:
        """``where``: how messages name the source (e.g. ``config file F: train``)."""
        return dataclass_from_dict(cls, d, where, unknown=f"{where}: unknown train settings")


# fields that may change between a run and its resumption
RESUMABLE_CHANGES = {
    "steps",
    "stop_after",
    "max_minutes",
    "eval_every",
    "save_every",
    "eval_batches",
    "val_without_retrieval",
    "num_threads",
    "prefetch",
    "plot",
}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    tokens_per_s: float | None
    precision: str
    history: list[dict[str, Any]] = field(default_factory=list)
