"""The dashboard's side of a training run.

The train dashboard runs ``custom_net.train.main(argv, reporter=DashboardReporter())`` in a
worker thread. The engine never touches widgets: it posts events here, and the app's UI loop
calls ``drain()`` and updates progress bars, charts and the predictions gallery from them.
The dashboard's Stop button calls ``request_stop()``; the engine then saves the last checkpoint
and returns.
"""
from __future__ import annotations

import queue

import numpy as np

from custom_net.reporting import Reporter


class DashboardReporter(Reporter):
    """Thread-safe event queue between the engine (producer) and the dashboard (consumer).

    Events are ``(name, payload)`` with names: start, epoch_start, train_step, val_progress,
    epoch_end, previews, message, finish. Payloads are plain dicts; previews carry RGB arrays.
    """

    def __init__(self):
        super().__init__()
        self._events: queue.Queue = queue.Queue()

    def _post(self, name: str, **payload) -> None:
        self._events.put((name, payload))

    def start(self, info: dict) -> None:
        self._post("start", **info)

    def epoch_start(self, epoch: int) -> None:
        self._post("epoch_start", epoch=epoch)

    def train_step(self, epoch, iteration, iterations, loss, lr) -> None:
        self._post("train_step", epoch=epoch, iteration=iteration, iterations=iterations, loss=loss, lr=lr)

    def val_progress(self, epoch, done, total) -> None:
        self._post("val_progress", epoch=epoch, done=done, total=total)

    def epoch_end(self, epoch: int, record: dict) -> None:
        self._post("epoch_end", **record)

    def previews(self, epoch: int, split: str, images: list[tuple[str, np.ndarray]]) -> None:
        self._post("previews", epoch=epoch, split=split, images=images)

    def message(self, level: str, text: str) -> None:
        self._post("message", level=level, text=text)

    def finish(self, summary: dict) -> None:
        self._post("finish", **summary)

    def drain(self) -> list[tuple[str, dict]]:
        """All events posted since the last call, oldest first; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events
