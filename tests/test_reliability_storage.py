"""Storage faults: a read-only or full output folder, before and during training, and a full cache folder.

Real faults, not mocks: each test mounts a small tmpfs (the tests need root, and skip without it) and
fills it or remounts it read-only while the run is going.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from custom_net import sly_seg_dataset as data
from custom_net.reporting import Reporter
from custom_net.train import cli, main
from custom_net.storage import StorageError
from tests.helpers import TINY_TRAIN_ARGS, assert_every_file_loads

pytestmark = pytest.mark.slow  # starts processes or servers

ARGS = [*TINY_TRAIN_ARGS, "--input-height", "32", "--input-width", "32", "--no-eval", "--epochs", "2",
        "--amp", "off", "--optimizer", "SGD", "--checkpoint-interval", "1", "--max-keep-ckpts", "1"]


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size, *options) -> mount point``; unmounted after the test."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                                 str(point)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _remount(point: Path, option: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{option}", str(point)], check=True, capture_output=True)


class AfterEpoch(Reporter):
    """Calls ``action()`` once, when epoch ``epoch`` has been saved completely."""

    def __init__(self, epoch: int, action):
        super().__init__()
        self.epoch, self.action, self.messages, self.summary = epoch, action, [], None

    def epoch_end(self, epoch, record):
        if epoch == self.epoch:
            self.action()

    def message(self, level, text):
        self.messages.append((level, text))

    def finish(self, summary):
        self.summary = summary


def _assert_epoch_1_intact(out: Path) -> None:
    checkpoints = out / "checkpoints"
    assert {"model_001.pth", "model_001_best.pth", "resume_state.pt", "train_args.json"} <= {
        p.name for p in checkpoints.iterdir()}
    assert torch.load(checkpoints / "resume_state.pt", weights_only=False)["epoch"] == 1
    assert not list(out.rglob(".*.tmp"))  # a failed write removes its temporary file (it holds the space)
    assert_every_file_loads(out)


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the command line, expect exit code 2 and return its one error line."""
    assert cli(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0].removeprefix("error: ")


def test_read_only_output_fails_before_training(tiny_project, tmpfs, capsys):
    read_only = tmpfs("1m", "ro")
    message = _cli_error(capsys, ["--project-dir", str(tiny_project), *ARGS, "--output", str(read_only / "run")])
    assert message == f"--output: cannot write to {read_only} (read-only or no permission)"


def test_too_little_space_fails_before_training(tiny_project, tmpfs, capsys):
    small = tmpfs("100m")
    message = _cli_error(capsys, ["--project-dir", str(tiny_project), *ARGS, "--output", str(small / "run")])
    assert message.startswith(f"--output: {small} has 100 MB free, but this run's checkpoints need about ")
    assert "--max-keep-ckpts" in message
    assert not (small / "run").exists()


def test_output_becomes_read_only_during_training(tiny_project, tmpfs):
    point = tmpfs("400m")
    out = point / "run"
    reporter = AfterEpoch(1, lambda: _remount(point, "ro"))
    with pytest.raises(StorageError) as info:
        main(["--project-dir", str(tiny_project), *ARGS, "--output", str(out)], reporter=reporter)
    # The first write of epoch 2 fails, naming the file; the dashboard hears it too.
    assert str(info.value) == (f"cannot write {out / 'info' / 'metrics.jsonl'}: Read-only file system; the checkpoints "
                               f"saved so far are intact in {out / 'checkpoints'}; once it can be written, "
                               f"continue with --resume {out}")
    assert any(level == "error" and str(out / "checkpoints") in text for level, text in reporter.messages)
    assert reporter.summary["status"] == "failed"  # told, though summary.json cannot be written
    assert not (out / "info" / "summary.json").exists()
    _assert_epoch_1_intact(out)

    _remount(point, "rw")
    assert main(["--resume", str(out)], reporter=Reporter())["status"] == "finished"
    assert_every_file_loads(out)


def test_disk_fills_during_training_then_resume_finishes(tiny_project, tmpfs):
    point = tmpfs("400m")
    out, filler = point / "run", point / "filler"

    def fill_disk():  # something else takes all but 8 MB: too little for the next 31 MB checkpoint
        filler.write_bytes(bytes(shutil.disk_usage(point).free - 8 * 2**20))

    with pytest.raises(StorageError) as info:
        main(["--project-dir", str(tiny_project), *ARGS, "--output", str(out)], reporter=AfterEpoch(1, fill_disk))
    model_002 = out / "checkpoints" / "model_002.pth"
    assert str(info.value).startswith(f"cannot write {model_002}: No space left on device; ")
    _assert_epoch_1_intact(out)
    summary = json.loads((out / "info" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["last_epoch"] == 2

    filler.unlink()  # space freed: the run continues where it stopped
    summary = main(["--resume", str(out)], reporter=Reporter())
    assert summary["status"] == "finished" and summary["last_epoch"] == 2
    lines = (out / "info" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert_every_file_loads(out)


def test_full_cache_folder_is_a_clear_error(tiny_project, tmpfs):
    cache = tmpfs("64k")  # the cache of 12 64x64 items needs 192 KB
    project = data.open_project(tiny_project)
    items = data.list_items(project)
    # Without reserving the blocks first, writing into the sparse memory map would kill this process (SIGBUS).
    with pytest.raises(data.DataError) as info:
        data.PreparedData(items, project.meta, ["__bg__", "disk"], 64, 64, cache_dir=str(cache))
    assert str(info.value).startswith(f"--cache-dir {cache}: no room for the decoded-image cache (")
    assert str(info.value).endswith("No space left on device")
    assert not list(cache.iterdir())
