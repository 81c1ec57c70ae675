"""Writing run artifacts so that a kill, a full disk or a read-only folder never leaves a truncated file."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch


class StorageError(OSError):
    """An artifact could not be written (disk full, read-only folder ...); the message names the file."""


class _WriteRecorder:
    """File wrapper that keeps the OSError of a failed write: torch.save reports a full disk only as
    'unexpected pos' and loses the reason."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary name, fsync, then rename: a kill or crash at any moment never
    leaves a truncated file under ``path``. A failed write removes the temporary file (it would hold
    the disk space) and raises StorageError naming ``path``; an earlier file at ``path`` stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        error = StorageError(f"cannot write {path}: {e.strerror or e}")
        error.errno = e.errno
        raise error from None


def atomic_torch_save(obj, path: Path) -> None:
    def write(file):
        recorder = _WriteRecorder(file)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))

