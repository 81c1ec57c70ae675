"""``train.py --sly``: a run started as a Supervisely task reports to it, as the original app's did."""
from __future__ import annotations

import os

import supervisely as sly

from custom_net.reporting import Reporter


class TaskLogReporter(Reporter):
    """``train.py --sly`` in a platform task: epoch and iteration progress as the SDK's progress events,
    and the metrics and messages as structured log lines (as the original app logged its metrics), which
    the platform shows on the task's page. They are JSON lines on the SDK logger's stream (stderr)."""

    def __init__(self):
        super().__init__()
        self._epochs = self._iters = None

    def start(self, info: dict) -> None:
        self._epochs = sly.Progress("Training: epochs", info["epochs"])  # reports 0 of N
        if info["start_epoch"] > 1:  # resumed
            self._epochs.set_current_value(info["start_epoch"] - 1)
        self._iterations = info["iters_per_epoch"]

    def epoch_start(self, epoch: int) -> None:
        self._iters = sly.Progress(f"Epoch {epoch}: iterations", self._iterations)

    def train_step(self, epoch, iteration, iterations, loss, lr) -> None:
        self._iters.set_current_value(iteration)
        sly.logger.info("Train metrics", extra={"epoch": epoch, "iter": iteration, "lr": lr, "loss": loss})

    def epoch_end(self, epoch: int, record: dict) -> None:
        self._epochs.set_current_value(epoch)
        if "val_loss" in record:
            keys = ("val_loss", "mean_fg_iou", "mean_fg_dice", "pixel_accuracy")
            sly.logger.info("Val metrics", extra={"epoch": epoch, **{k: record[k] for k in keys}})

    def message(self, level: str, text: str) -> None:
        getattr(sly.logger, "warning" if level == "warning" else "error" if level == "error" else "info")(text)

    def finish(self, summary: dict) -> None:
        best = summary.get("best") or {}
        sly.logger.info(f"Training {summary['status']}", extra={
            "last_epoch": summary["last_epoch"], "output_dir": summary["output_dir"],
            "best_checkpoint": best.get("checkpoint"), "best_" + best.get("metric", "metric"): best.get("value")})


def in_platform_task() -> bool:
    """TASK_ID, SERVER_ADDRESS and API_TOKEN are set: the platform started this process as a task."""
    return all(os.environ.get(key) for key in ("TASK_ID", "SERVER_ADDRESS", "API_TOKEN"))
