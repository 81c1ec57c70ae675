"""Crash safety: real training processes killed with SIGKILL (mid-epoch, during saves) and SIGTERM, then
resumed with ``--resume``; the result must equal an uninterrupted run bitwise.

The training processes are forked from a forkserver that imported the engine once: starting an
interpreter costs about ten seconds on the test machine, a fork milliseconds. They are real separate
processes, so SIGKILL gives no chance to clean up.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from custom_net.reporting import Reporter
from custom_net.train import cli, main
from tests.helpers import TINY_TRAIN_ARGS, assert_every_file_loads, assert_same_weights, checkpoints_of, metrics_of

EPOCHS = 3
# 10 training items, batch 4: 3 iterations per epoch. Augmentations on, so their seeding is checked too.
ARGS = [*TINY_TRAIN_ARGS, "--input-height", "32", "--input-width", "32", "--no-eval", "--epochs", str(EPOCHS),
        "--amp", "off", "--metrics-period", "1", "--checkpoint-interval", "1", "--max-keep-ckpts", "2",
        "--sly-augs-path", "seg_simple_rotate_crop_flipLR_flipUD"]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:imgaug.*", "ignore::DeprecationWarning:imageio.*")]


def _train(argv: list[str], progress: str) -> None:
    """Body of a child process (module level, so the forkserver can import it): the command line's own
    ``cli``, its JSON-lines events going to ``progress`` so that the test knows where training is."""
    sys.stdout = open(progress, "w", buffering=1)
    sys.exit(cli([*argv, "--reporter", "jsonl"]))


@pytest.fixture(scope="module")
def trainer():
    """Starts a training child: ``trainer(argv, progress_path) -> Process``."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["custom_net.train", "matplotlib.pyplot", __name__])  # charts import pyplot late

    def start(argv: list[str], progress: Path):
        process = ctx.Process(target=_train, args=(argv, str(progress)))
        process.start()
        return process

    return start


@pytest.fixture(scope="module")
def reference(tiny_project, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = main(["--project-dir", str(tiny_project), *ARGS, "--output", str(out)], reporter=Reporter())
    assert summary["status"] == "finished"
    return out


def _wait_for(condition, process, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.is_alive(), f"the training process ended (exit code {process.exitcode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _progress(path: Path) -> list[str]:
    """'start', then 'EPOCH ITERATION' per training step and 'EPOCH end' per epoch, so far."""
    seen = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if event["event"] == "train_step":
            seen.append(f"{event['epoch']} {event['iteration']}")
        elif event["event"] == "epoch_end":
            seen.append(f"{event['epoch']} end")
        elif event["event"] == "start":
            seen.append("start")
    return seen


def _kill(process, sig=signal.SIGKILL) -> None:
    os.kill(process.pid, sig)
    process.join(60)
    assert process.exitcode == (-sig if sig == signal.SIGKILL else 0), process.exitcode


def _temp_files(run: Path) -> list[Path]:
    return list(run.rglob(".*.tmp"))


def _saving(run: Path) -> list[Path]:
    """Temporary files of checkpoint saves under way (or cut short)."""
    return list((run / "checkpoints").glob(".*.tmp"))


def _assert_equals_reference(run: Path, reference: Path) -> None:
    assert metrics_of(run) == metrics_of(reference)  # each epoch once, bitwise-equal values
    a, b = checkpoints_of(run), checkpoints_of(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert_same_weights(a[name], b[name])
    assert json.loads((run / "info" / "summary.json").read_text())["status"] == "finished"
    assert not _temp_files(run)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(trainer, reference, tiny_project, tmp_path):
    out, progress = tmp_path / "run", tmp_path / "progress"
    child = trainer(["--project-dir", str(tiny_project), *ARGS, "--output", str(out)], progress)
    _wait_for(lambda: "2 1" in _progress(progress), child, what="epoch 2, iteration 1")
    _kill(child)
    assert "2 end" not in _progress(progress)  # killed inside epoch 2
    assert torch.load(out / "checkpoints" / "resume_state.pt", weights_only=False)["epoch"] == 1
    assert_every_file_loads(out)

    assert main(["--resume", str(out)], reporter=Reporter())["status"] == "finished"
    _assert_equals_reference(out, reference)


def test_sigkill_during_saves_leaves_no_truncated_file(trainer, reference, tiny_project, tmp_path):
    """Killed three times and resumed each time: the moment a checkpoint save is under way, a random moment
    after the first epoch, and a random moment up to 50 ms into a save. Every file under its final name loads
    after every kill."""
    out, progress = tmp_path / "run", tmp_path / "progress"
    seed = random.randrange(2**32)
    print(f"kill moments from random seed {seed}")  # shown when the test fails
    rng = random.Random(seed)
    argv = ["--project-dir", str(tiny_project), *ARGS, "--output", str(out)]
    kills = 0
    for attempt in range(3):
        progress.unlink(missing_ok=True)
        child = trainer(argv if attempt == 0 else ["--resume", str(out)], progress)
        # Training has started (a resume has removed old temporary files) and there is a resume state to go back to.
        _wait_for(lambda: "start" in _progress(progress) and (out / "checkpoints" / "resume_state.pt").exists(),
                  child, what="the first resume state")
        if attempt == 1:
            time.sleep(rng.uniform(0, 1.0))
        else:
            _wait_for(lambda: _saving(out) or not child.is_alive(), child, what="a checkpoint save")
            if attempt == 2:
                time.sleep(rng.uniform(0, 0.05))
        if not child.is_alive():  # finished before the kill landed: nothing more to try
            break
        _kill(child)
        kills += 1
        if attempt == 0:
            assert _saving(out), "the kill did not land inside a save (its temporary file would be left)"
        assert_every_file_loads(out)
    assert kills >= 2, "the run finished before it could be killed"
    assert main(["--resume", str(out)], reporter=Reporter())["status"] == "finished"
    _assert_equals_reference(out, reference)


def test_sigterm_mid_epoch_stops_cleanly_then_resume_equals_uninterrupted(trainer, reference, tiny_project,
                                                                          tmp_path):
    out, progress = tmp_path / "run", tmp_path / "progress"
    child = trainer(["--project-dir", str(tiny_project), *ARGS, "--output", str(out)], progress)
    _wait_for(lambda: "2 1" in _progress(progress), child, what="epoch 2, iteration 1")
    _kill(child, signal.SIGTERM)  # the command line exits with 0: a clean stop

    summary = json.loads((out / "info" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["last_epoch"] == 2
    assert "2 end" not in _progress(progress)  # stopped after the current iteration, not the epoch
    (last,) = (out / "checkpoints").glob("model_*_last.pth")
    assert last.name == "model_002_last.pth" and summary["last_checkpoint"] == str(last)
    epoch_1 = torch.load(out / "checkpoints" / "model_001.pth")
    assert any(not torch.equal(t, epoch_1[k]) for k, t in torch.load(last).items())  # trained on in epoch 2
    assert not _temp_files(out)
    assert_every_file_loads(out)
    assert [r["epoch"] for r in metrics_of(out)] == [1]

    assert main(["--resume", str(out)], reporter=Reporter())["status"] == "finished"
    _assert_equals_reference(out, reference)  # the partial epoch 2 is redone from epoch 1's state
