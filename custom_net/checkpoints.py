"""The checkpoints a run keeps: plain state dicts of the architecture (training norms folded), written atomically."""
from __future__ import annotations

import math
from pathlib import Path

from custom_net.run_folder import RunFolder, checkpoints_in
from custom_net.storage import atomic_torch_save
from custom_net.train_norms import deployable_state_dict


class CheckpointSaver:
    """Plain state dicts as checkpoints/model_NNN.pth (every ``interval`` epochs, ``max_keep`` newest kept,
    -1 = all), model_NNN_best.pth (best ``metric``) and model_NNN_last.pth."""

    def __init__(self, directory: Path, interval: int, max_keep: int, metric: str, save_best: bool, save_last: bool):
        self.directory = Path(directory)
        self.interval, self.max_keep = interval, max_keep
        self.metric, self.save_best, self.save_last = metric, save_best, save_last
        self.higher_is_better = metric != "val_loss"
        self.kept: list[str] = []
        self.best_value: float | None = None
        self.best_path: str | None = None

    def _save(self, model, name: str) -> Path:
        path = self.directory / name
        atomic_torch_save(deployable_state_dict(model), path)
        return path

    def on_epoch_end(self, model, epoch: int, metrics: dict | None) -> None:
        if self.interval > 0 and epoch % self.interval == 0:
            self.kept.append(self._save(model, RunFolder.checkpoint_name(epoch)).name)
            while self.max_keep >= 0 and len(self.kept) > self.max_keep:
                (self.directory / self.kept.pop(0)).unlink(missing_ok=True)
        if self.save_best and metrics is not None and self.metric in metrics:
            value = metrics[self.metric]
            better = (self.best_value is None or
                      (value > self.best_value if self.higher_is_better else value < self.best_value))
            if not math.isnan(value) and better:
                previous = self.best_path
                self.best_path = self._save(model, RunFolder.checkpoint_name(epoch, "best")).name
                self.best_value = value
                if previous and previous != self.best_path:
                    (self.directory / previous).unlink(missing_ok=True)

    def on_train_end(self, model, epoch: int) -> Path | None:
        if not self.save_last:
            return None
        last = self._save(model, RunFolder.checkpoint_name(epoch, "last"))
        for old in checkpoints_in(self.directory, "last"):  # after the save: a crash never leaves none
            if old != last:
                old.unlink()
        return last

    def state_dict(self) -> dict:
        return {"kept": list(self.kept), "best_value": self.best_value, "best_path": self.best_path}

    def load_state_dict(self, state: dict) -> None:
        self.kept = list(state["kept"])
        self.best_value, self.best_path = state["best_value"], state["best_path"]

