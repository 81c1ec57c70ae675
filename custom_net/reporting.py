"""Progress of a training run: reporter hooks, and one event protocol for everything that follows a run.

The trainer calls a ``Reporter``'s hooks and never imports a UI. ``event()`` turns a hook call into an event
(a dict naming the hook under "event"; JSON-able but for the images of ``previews``), ``replay()`` turns
an event back into the same hook call on another reporter. An ``EventSink`` is a reporter that turns every
call into an event: the CLI's JSON lines, the dashboard's queue, ``Broadcast`` and the tests' recorders are
sinks, and the torchrun relay replays the lines rank 0 prints.
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


# The arguments of each hook, as event fields. The dict of start / epoch_end / finish is the event itself
# (epoch_end's record holds its epoch).
EVENT_FIELDS = {"start": None, "epoch_start": ("epoch",),
                "train_step": ("epoch", "iteration", "iterations", "loss", "lr"),
                "val_progress": ("epoch", "done", "total"), "epoch_end": None,
                "previews": ("epoch", "split", "images"), "message": ("level", "text"), "finish": None}


def event(name: str, *args) -> dict:
    """The event of the hook call ``name(*args)``."""
    fields = EVENT_FIELDS[name]
    if fields is None:
        return {"event": name, **args[-1]}
    return {"event": name, **dict(zip(fields, args))}


def replay(event: dict, reporter: Reporter) -> None:
    """Call ``reporter``'s hook for ``event`` as the trainer called the sink's."""
    name = event["event"]
    payload = {k: v for k, v in event.items() if k != "event"}
    fields = EVENT_FIELDS[name]
    if fields is None:
        args = (payload["epoch"], payload) if name == "epoch_end" else (payload,)
    else:
        args = tuple(payload[f] for f in fields)
    getattr(reporter, name)(*args)


class EventSink(Reporter):
    """A reporter that turns each hook call into an event for ``emit``."""

    def emit(self, event: dict) -> None:
        raise NotImplementedError

    def start(self, info): self.emit(event("start", info))
    def epoch_start(self, epoch): self.emit(event("epoch_start", epoch))
    def train_step(self, *args): self.emit(event("train_step", *args))
    def val_progress(self, epoch, done, total): self.emit(event("val_progress", epoch, done, total))
    def epoch_end(self, epoch, record): self.emit(event("epoch_end", epoch, record))
    def previews(self, epoch, split, images): self.emit(event("previews", epoch, split, images))
    def message(self, level, text): self.emit(event("message", level, text))
    def finish(self, summary): self.emit(event("finish", summary))


class Broadcast(EventSink):
    """Every hook goes to each of ``reporters``; a stop asked of any of them (or of this) stops the run."""

    def __init__(self, *reporters: Reporter):
        super().__init__()
        self.reporters = reporters

    def emit(self, event: dict) -> None:
        for reporter in self.reporters:
            replay(event, reporter)

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


class JsonLinesReporter(EventSink):
    """One JSON object per event on ``stream``, for programs that drive the CLI; previews name their items
    (the images are in the run folder)."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stdout

    def emit(self, event: dict) -> None:
        if event["event"] == "previews":
            event = {**{k: v for k, v in event.items() if k != "images"}, "items": [name for name, _ in event["images"]]}
        self.stream.write(json.dumps(event, default=float) + "\n")
        self.stream.flush()
