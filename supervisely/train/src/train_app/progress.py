"""Progress bars of the SDK's Progress widget, driven by (done, total) callbacks."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def counting(widget, **options):
    """Yields a ``progress(done, total)`` callback that drives a bar of ``widget`` (made at the first call).

    The bar is closed on the way out, also when the work fails. An SDK bar left to the garbage collector
    closes itself from whatever thread collects it; on the server's event loop that close waits for the
    loop itself, and the app stops answering."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = widget(total=total, **options)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
