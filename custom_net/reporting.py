"""Progress reporters: how a training run tells the outside world what it is doing.

``train.main`` calls these methods and never imports a UI; the console (tqdm), a JSON-lines
stream and the Supervisely dashboard (``sly_integration``) each implement them.
"""
from __future__ import annotations

import json
import math
import sys
import threading

import numpy as np
from tqdm import tqdm


class Reporter:
    """Base class: every hook is optional. ``train_step`` comes every ``--metrics-period`` iterations
    and after the last one of an epoch; ``should_stop`` is polled after each iteration."""

    def __init__(self):
        self._stop = threading.Event()

    def start(self, info: dict) -> None: ...
    def epoch_start(self, epoch: int) -> None: ...
    def train_step(self, epoch: int, iteration: int, iterations: int, loss: float, lr: float) -> None: ...
    def val_progress(self, epoch: int, done: int, total: int) -> None: ...
    def epoch_end(self, epoch: int, record: dict) -> None: ...
    def previews(self, epoch: int, split: str, images: list[tuple[str, np.ndarray]]) -> None: ...
    def message(self, level: str, text: str) -> None: ...
    def finish(self, summary: dict) -> None: ...

    def request_stop(self) -> None:
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()


class Broadcast(Reporter):
    """Every hook goes to each of ``reporters``; a stop asked of any of them (or of this) stops the run."""

    HOOKS = ("start", "epoch_start", "train_step", "val_progress", "epoch_end", "previews", "message", "finish")

    def __init__(self, *reporters: Reporter):
        super().__init__()
        self.reporters = reporters
        for hook in self.HOOKS:
            setattr(self, hook, self._broadcaster(hook))

    def _broadcaster(self, hook: str):
        def call(*args):
            for reporter in self.reporters:
                getattr(reporter, hook)(*args)
        return call

    def request_stop(self) -> None:
        super().request_stop()
        for reporter in self.reporters:
            reporter.request_stop()

    def should_stop(self) -> bool:
        return super().should_stop() or any(r.should_stop() for r in self.reporters)


def _fmt(value) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


class ConsoleReporter(Reporter):
    """tqdm bars for epochs and iterations, a line of metrics per epoch, a final summary."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self._epochs = self._iters = None

    def start(self, info: dict) -> None:
        self._info = info
        self._epochs = tqdm(total=info["epochs"], initial=info["start_epoch"] - 1, desc="epochs", unit="ep",
                            file=self.stream, dynamic_ncols=True)

    def epoch_start(self, epoch: int) -> None:
        self._iters = tqdm(total=self._info["iters_per_epoch"], desc=f"epoch {epoch}", unit="it", leave=False,
                           file=self.stream, dynamic_ncols=True)

    def train_step(self, epoch, iteration, iterations, loss, lr) -> None:
        self._iters.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self._iters.update(iteration - self._iters.n)

    def epoch_end(self, epoch: int, record: dict) -> None:
        self._iters.close()
        self._epochs.update(1)
        text = f"epoch {epoch}: train_loss {_fmt(record['train_loss'])}  lr {record['lr']:.2e}"
        if "val_loss" in record:
            text += (f"  val_loss {_fmt(record['val_loss'])}  mean_fg_iou {_fmt(record['mean_fg_iou'])}"
                     f"  mean_fg_dice {_fmt(record['mean_fg_dice'])}  pixel_acc {_fmt(record['pixel_accuracy'])}")
        tqdm.write(text, file=self.stream)

    def message(self, level: str, text: str) -> None:
        tqdm.write(f"[{level}] {text}", file=self.stream)

    def finish(self, summary: dict) -> None:
        if self._iters is not None:
            self._iters.close()
        if self._epochs is not None:
            self._epochs.close()
        lines = [f"Training {summary['status']} after epoch {summary['last_epoch']} of {summary['epochs']}."]
        if summary.get("best"):
            best = summary["best"]
            lines.append(f"Best {best['metric']} {_fmt(best['value'])} at epoch {best['epoch']}: {best['checkpoint']}")
        lines.append(f"Artifacts: {summary['output_dir']}")
        print("\n".join(lines), file=self.stream)


class JsonLinesReporter(Reporter):
    """One JSON object per event on ``stream``, for programs that drive the CLI."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stdout

    def _emit(self, event: str, **data) -> None:
        self.stream.write(json.dumps({"event": event, **data}, default=float) + "\n")
        self.stream.flush()

    def start(self, info):
        self._emit("start", **info)

    def epoch_start(self, epoch):
        self._emit("epoch_start", epoch=epoch)

    def val_progress(self, epoch, done, total):
        self._emit("val_progress", epoch=epoch, done=done, total=total)

    def train_step(self, epoch, iteration, iterations, loss, lr):
        self._emit("train_step", epoch=epoch, iteration=iteration, iterations=iterations, loss=loss, lr=lr)

    def epoch_end(self, epoch, record):
        self._emit("epoch_end", **record)

    def previews(self, epoch, split, images):
        self._emit("previews", epoch=epoch, split=split, items=[name for name, _ in images])

    def message(self, level, text):
        self._emit("message", level=level, text=text)

    def finish(self, summary):
        self._emit("finish", **summary)
