"""Distributed training on the CPU with gloo: torchrun with 2 processes against a single-process run.

The runs use pure cross-entropy (``--jaccard-weight 0``): each rank's loss is a mean over equally many
pixels, so DDP's averaged gradient is the gradient of the global batch and a 2 x 2 run must track a
1 x 4 run up to float rounding. (The soft Dice term is computed per rank's batch, so it would differ.)
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_net import distributed
from custom_net.distributed import DistributedEpochSampler, DistributedRunError, run_torchrun, torchrun_command
from custom_net.model import build_model
from custom_net.reporting import Reporter
from custom_net.sly_seg_dataset import EpochSampler
from custom_net.config import ArgsError
from custom_net.train import main
from custom_net.visualize import preview_panel
from tests.helpers import free_port, metrics_of, RecordingReporter

pytestmark = pytest.mark.slow  # starts processes or servers

EPOCHS = 2
# Without BatchNorm (--train-batchnorm off): each process normalises its own share of the batch, so only a
# BatchNorm-free model can match a single process's run number for number.
ARGS = ["--model", "UNet", "--train-batchnorm", "off", "--input-height", "64", "--input-width", "64",
        "--epochs", str(EPOCHS), "--encoder-weights", "none", "--gpu-id", "cpu", "--amp", "off",
        "--jaccard-weight", "0",
        "--sly-augs-path", "seg_simple_rotate_crop_flipLR", "--vis-count", "2", "--dist-timeout", "30",
        "--num-workers", "0", "--reporter", "none"]
UI_STATE = {"selectedModel": "UNet", "imgSize": {"width": 64, "height": 64}, "gpusId": [0, 1]}  # the dashboard's
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two ranks on a shared 2-core machine


@pytest.fixture(scope="module")
def single_run(tiny_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    main(["--project-dir", str(tiny_project), *ARGS, "--batch-size", "4", "--output", str(out)], reporter=Reporter())
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_project, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    recorder = RecordingReporter()
    summary = run_torchrun(["--project-dir", str(tiny_project), *ARGS, "--batch-size", "2", "--output", str(out)],
                           [0, 1], recorder, ui_state=UI_STATE, env=ONE_THREAD)
    return out, recorder, summary


# ---- sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, world_size, batch", [(10, 2, 2), (7, 3, 2), (2, 4, 1)])
def test_rank_batches_make_up_the_single_process_batches(size, world_size, batch):
    single = EpochSampler(size, seed=5, shuffle=True)
    ranks = [DistributedEpochSampler(size, 5, True, r, world_size) for r in range(world_size)]
    first_orders = {}
    for epoch in (1, 2):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        orders = [list(s) for s in ranks]
        assert len({len(o) for o in orders}) == 1 and all(len(o) == len(s) for o, s in zip(orders, ranks))
        global_order = list(single)
        padded = (global_order * world_size)[: len(orders[0]) * world_size]
        for start in range(0, len(orders[0]), batch):
            union = [key for order in orders for key in order[start:start + batch]]
            expected = padded[start * world_size:(start + batch) * world_size]
            assert sorted(union) == sorted(expected)
        assert set(sum(orders, [])) == set(global_order)  # every item, keys epoch * n + index
        first_orders[epoch] = [key % size for key in orders[0]]
    if size == 10:
        assert first_orders[1] != first_orders[2]  # reshuffled every epoch


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="rank 2"):
        DistributedEpochSampler(10, 0, True, 2, 2)


def test_single_process_context_changes_nothing():
    ctx = distributed.setup("cpu", 10)
    model = torch.nn.Linear(2, 2)
    assert not ctx.enabled and ctx.is_main
    assert ctx.prepare_model(model, False) == (model, model)
    assert type(ctx.epoch_sampler(5, 0)) is EpochSampler and ctx.shard_sampler(5) is None
    assert ctx.mean(2.5) == 2.5 and ctx.any(True) and not ctx.any(False)


def test_setup_errors_name_the_cause(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DistributedRunError, match="RANK is not set: start the run with torchrun"):
        distributed.setup("cpu", 10)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedRunError, match="--sync-bn needs CUDA"):
        distributed.setup("cpu", 10, sync_bn=True)


# ---- the launcher -----------------------------------------------------------------------------------

def test_torchrun_command(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    command, env = torchrun_command(["--project-dir", "p", "--batch-size", "8"], ["cuda:2", 3])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--module",
                           "custom_net", "--project-dir", "p", "--batch-size", "8", "--reporter", "jsonl"]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    for bad in ([], ["x"], [1, 1]):
        with pytest.raises(ValueError):
            torchrun_command([], bad)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # the launcher's own GPUs: ids are relative to them
    assert torchrun_command([], [0, 2])[1]["CUDA_VISIBLE_DEVICES"] == "4,7"
    with pytest.raises(ValueError, match="visible"):
        torchrun_command([], [3])


def test_launcher_rejects_bad_flags_before_starting():
    with pytest.raises(ArgsError, match="--epochs"):
        run_torchrun(["--demo", "--epochs", "0"], [0, 1], Reporter())


def test_launcher_reports_a_failed_run(tmp_path):
    with pytest.raises(DistributedRunError, match="error: project folder .* does not exist"):
        run_torchrun(["--project-dir", str(tmp_path / "missing"), *ARGS], [0, 1], Reporter(), env=ONE_THREAD)


# ---- a 2-process run --------------------------------------------------------------------------------

def test_ddp_matches_single_process_run(single_run, ddp_run):
    ddp, single = metrics_of(ddp_run[0]), metrics_of(single_run)
    assert [r["epoch"] for r in ddp] == list(range(1, EPOCHS + 1))
    for a, b in zip(ddp, single):
        for key in ("train_loss", "val_loss", "pixel_accuracy", "mean_iou", "mean_dice", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["epoch"], key)
        assert a["iou"] == pytest.approx(b["iou"], rel=1e-4, abs=1e-5, nan_ok=True)


def test_ddp_writes_one_artifact_tree(ddp_run):
    out, _, summary = ddp_run
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no out_000 from another rank
    assert summary["status"] == "finished" and summary["output_dir"] == str(out)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for name in ("checkpoints/train_args.json", "checkpoints/resume_state.pt", f"checkpoints/model_{EPOCHS:03d}_last.pth",
                 "info/model_classes.json", "info/ui_state.json", "info/train_set.json", "info/val_set.json",
                 "info/summary.json", "info/charts/loss.png", f"info/previews/val_epoch_{EPOCHS:03d}.png"):
        assert name in names
    assert not [n for n in names if "/." in n or n.startswith(".")]  # no temporary files left
    assert len(metrics_of(out)) == EPOCHS  # one line per epoch: one writer
    plain = build_model("UNet", 4)
    for path in (out / "checkpoints").glob("model_*.pth"):
        state = torch.load(path, weights_only=True)
        assert not [k for k in state if k.startswith("module.")]
        plain.load_state_dict(state)  # strict


def test_ddp_run_is_followed_like_an_in_process_run(ddp_run):
    out, recorder, summary = ddp_run
    (start,) = recorder.named("start")
    assert start["world_size"] == 2 and start["iters_per_epoch"] == 3  # 10 items: 5 per rank, batches 2 2 1
    assert [e["epoch"] for e in recorder.named("epoch_start")] == list(range(1, EPOCHS + 1))
    assert recorder.named("train_step") and recorder.named("val_progress")
    assert [e["epoch"] for e in recorder.named("epoch_end")] == list(range(1, EPOCHS + 1))
    last = recorder.named("previews")[-1]
    epoch, split, panels = last["epoch"], last["split"], last["images"]
    assert (epoch, split) == (EPOCHS, "val") and len(panels) == 2
    blank = np.zeros((64, 64), np.uint8)
    shape = preview_panel(np.zeros((64, 64, 3), np.uint8), blank, blank, [[0, 0, 0]]).shape  # image | truth | prediction
    assert all(isinstance(name, str) and image.shape == shape and image.dtype == np.uint8 for name, image in panels)
    assert recorder.named("finish") == [{"event": "finish", **summary}]
    assert json.loads((out / "info" / "summary.json").read_text()) == summary
    assert json.loads((out / "info" / "ui_state.json").read_text()) == UI_STATE


def test_resume_and_stop_under_torchrun(ddp_run, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(ddp_run[0], run)
    before = metrics_of(run)
    recorder = RecordingReporter(stop_at_epoch=EPOCHS + 2)
    summary = run_torchrun(["--resume", str(run), "--epochs", str(EPOCHS + 3), "--reporter", "none"], [0, 1],
                           recorder, env=ONE_THREAD)
    # Both ranks stopped at the same step (else rank 0 would wait --dist-timeout and fail).
    assert summary["status"] == "stopped" and summary["last_epoch"] == EPOCHS + 2
    after = metrics_of(run)
    assert after[:EPOCHS] == before and [r["epoch"] for r in after] == list(range(1, EPOCHS + 2))
    assert recorder.named("start")[0]["start_epoch"] == EPOCHS + 1
    assert (run / "checkpoints" / f"model_{EPOCHS + 2:03d}_last.pth").is_file()


# ---- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_dead_rank_stops_the_others_with_an_error(tiny_project, tmp_path, fault):
    """Ranks started by hand, as on two machines (torchrun would also kill the survivors on one machine):
    rank 1 dies (SIGKILL) or hangs (SIGSTOP) mid-training; rank 0 must fail with a clear error within
    --dist-timeout instead of waiting forever."""
    port = free_port()
    argv = [sys.executable, "-m", "custom_net", "--project-dir", str(tiny_project), *ARGS, "--batch-size", "1",
            "--epochs", "50", "--metrics-period", "1", "--dist-timeout", "10", "--reporter", "jsonl",
            "--output", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **ONE_THREAD, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rank0, rank1 = procs
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in rank0.stdout], daemon=True).start()
        deadline = time.monotonic() + 120
        while '"train_step"' not in lines.get(timeout=max(1, deadline - time.monotonic())):
            pass
        rank1.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        returncode = rank0.wait(timeout=90)
        waited = time.monotonic() - started
        stderr = rank0.stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert returncode == 1, stderr[-2000:]
    assert "error: rank 0 of 2 stopped" in stderr and "Another process of this distributed run" in stderr
    assert waited < 60
