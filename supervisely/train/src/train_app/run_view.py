"""The training card as a reporter: each event of the run (``custom_net.reporting``), replayed here, updates
the card's progress bars, charts, predictions gallery and log."""
from __future__ import annotations

import html

from supervisely.app.widgets import Select

from custom_net.reporting import Reporter
from train_app.images import data_url

LOG_LINES = 8


class RunView(Reporter):
    """The widgets of ``step`` (a TrainStep) following ``run`` (its Run)."""

    def __init__(self, step, run):
        super().__init__()
        self.step, self.run = step, run

    def start(self, info: dict) -> None:
        run = self.run
        run.iters_per_epoch = info["iters_per_epoch"]
        run.epoch_bar = self.step.epochs(message="Epochs", total=info["epochs"], initial=info["start_epoch"] - 1)
        processes = f" x {info['world_size']} processes" if info.get("world_size", 1) > 1 else ""
        self._log(f"Training {info['model']} on {info['device']}{processes} ({info['amp']}): "
                  f"{info['train_size']} train / {info['val_size']} val images, output {info['output_dir']}")

    def epoch_start(self, epoch: int) -> None:
        run = self.run
        if run.iter_bar is not None:
            run.iter_bar.close()
        run.iter_bar = self.step.iterations(message=f"Epoch {epoch}: iterations", total=run.iters_per_epoch)

    def train_step(self, epoch, iteration, iterations, loss, lr) -> None:
        self.run.iter_bar.update(iteration - self.run.iter_bar.n)
        x = round(epoch - 1 + iteration / iterations, 4)
        self.step.loss_plot.add_to_series("train", (x, loss))
        self.step.lr_plot.add_to_series("lr", (x, lr))

    def epoch_end(self, epoch: int, record: dict) -> None:
        self.run.epoch_bar.update(1)
        if "val_loss" in record:  # (validation is short next to an epoch: no progress of its own)
            self.step.loss_plot.add_to_series("val", (epoch, record["val_loss"]))
            self.step.metrics_plot.add_to_series("IoU", (epoch, record["mean_fg_iou"]))
            self.step.metrics_plot.add_to_series("Dice", (epoch, record["mean_fg_dice"]))

    def previews(self, epoch: int, split: str, images) -> None:
        previews = self.run.previews
        previews.setdefault(epoch, {})[split] = [(name, data_url(panel)) for name, panel in images]
        self.step.preview_epoch.set([Select.Item(e, f"epoch {e}") for e in sorted(previews)])
        self.step.preview_epoch.set_value(epoch)
        self.step.show_previews(epoch)

    def message(self, level: str, text: str) -> None:
        self._log(f"[{level}] {text}")

    def finish(self, summary: dict) -> None:
        self.run.summary = summary

    def _log(self, line: str) -> None:
        self.run.messages = (self.run.messages + [html.escape(line)])[-LOG_LINES:]  # the Text widget renders HTML
        self.step.log.set("<br>".join(self.run.messages), status="text")
