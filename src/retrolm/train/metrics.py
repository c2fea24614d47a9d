"""Training metrics: the CSV log, the loss plot, the progress bar and the step log lines."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from retrolm.utils import atomic_path, save_figure

log = logging.getLogger(__name__)


class Metrics:
    """metrics.csv (+ TensorBoard if installed) on rank 0; rows past ``resume_step`` dropped."""

    # new columns go last: files of older runs keep their order when a run resumes
    COLUMNS = [
        "step",
        "loss",
        "val_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
        "val_loss_no_retrieval",
    ]
    VAL_COLUMNS = ("val_loss", "val_loss_no_retrieval")
    LABELS = {"val_loss": "validation loss", "val_loss_no_retrieval": "validation, retrieval off"}

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            with open(self.path, newline="") as f:
                # rows past the checkpoint are redone; a row cut short by a kill is dropped
                self.rows = [
                    r
                    for r in csv.DictReader(f)
                    if None not in r.values()
                    and r["step"].isdigit()
                    and int(r["step"]) <= resume_step
                ]
        with atomic_path(self.path) as tmp:  # a kill mid-rewrite keeps the old file
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.COLUMNS)
                w.writeheader()
                w.writerows(self.rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v not in (None, ""):
                    self.tb.add_scalar(k, float(v), int(row["step"]))

    def plot(self, path: Path) -> None:
        if not self.enabled or not self.rows:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        steps = [int(r["step"]) for r in self.rows]
        loss = [float(r["loss"]) for r in self.rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, loss, lw=0.8, alpha=0.7, label="train loss")
        for column in self.VAL_COLUMNS:  # validation beside training; retrieval off beside on
            val = [(int(r["step"]), float(r[column])) for r in self.rows if r.get(column)]
            if val:
                ax.plot(*zip(*val), "o-", ms=3, label=self.LABELS[column])
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def report(
    metrics: Metrics, bar: Any, row: dict[str, Any], elapsed: float, steps: int, is_main: bool
) -> None:
    """One step's metrics row, progress bar and (every tenth of the run) log line."""
    step, total, vals, gnorm, tps = row["step"], row["loss"], row["vals"], row["gnorm"], row["tps"]
    val = vals.get("val_loss")
    metrics.add(
        {
            "step": step,
            "loss": f"{total:.6f}",
            **{k: "" if vals.get(k) is None else f"{vals[k]:.6f}" for k in Metrics.VAL_COLUMNS},
            "lr": f"{row['lr']:.3e}",
            "grad_norm": "" if gnorm is None else f"{float(gnorm):.4f}",
            "tokens_per_s": f"{tps:.1f}",
            "elapsed_s": f"{elapsed:.2f}",
        }
    )
    if step % max(1, steps // 10) == 0 and is_main:  # for logs without a tty
        log.info(
            "step %d/%d loss %.4f%s, %.0f tokens/s",
            step,
            steps,
            total,
            "".join(f" {k.replace('_loss', '')} {v:.4f}" for k, v in vals.items()),
            tps,
        )
    bar.update(1)
    bar.set_postfix(loss=f"{total:.3f}", **({"val": f"{val:.3f}"} if val else {}))


def progress_bar(steps: int, step: int, is_main: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=steps,
        initial=step,
        desc="train",
        unit="step",
        disable=None if is_main else True,
        dynamic_ncols=True,
    )
