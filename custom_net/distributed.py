"""Several GPUs / machines: DistributedDataParallel under torchrun, and the launcher the dashboard uses.

    torchrun --nproc-per-node 4 custom_net/train.py --project-dir DIR --batch-size 8 ...   # 4 GPUs, global batch 32

torchrun starts one process per GPU and sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup`` reads them.
Every rank runs the same ``train.main``: the same split, seed and initial weights; each rank trains on
its share of every epoch's batches (``DistributedEpochSampler``), DDP averages the gradients, the
validation confusion matrix and losses are summed over the ranks, and rank 0 alone writes the artifact
tree and reports progress. Without these variables (or with WORLD_SIZE=1) nothing here changes a run.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from custom_net.config import parse_config
from custom_net.reporting import EVENT_FIELDS, Reporter, replay
from custom_net.run_folder import RunFolder
from custom_net.sly_seg_dataset import EpochSampler
from custom_net.hardware import select_device
from custom_net.storage import atomic_write_json


class DistributedRunError(RuntimeError):
    """A distributed run failed (a rank died, timed out, or a launched run exited with an error)."""


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run; ``world_size == 1`` is a plain single-process run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the artifact tree and reports progress."""
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module, sync_bn: bool):
        """Returns (model, train_model). ``model`` stays the plain module: its state dict has no
        ``module.`` prefix, and evaluation / previews on it run no collectives (ranks evaluate
        different shares). ``train_model`` is the DDP wrapper that averages gradients."""
        if not self.enabled:
            return model, model
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # static_graph: some models own parameters forward() never uses (AlbuNet's encoder.fc, kept so
        # the original checkpoints load); DDP would otherwise wait for their gradients forever.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return model, DistributedDataParallel(model, device_ids=device_ids, static_graph=True)

    def epoch_sampler(self, size: int, seed: int) -> Sampler:
        if not self.enabled:
            return EpochSampler(size, seed, shuffle=True)
        return DistributedEpochSampler(size, seed, True, self.rank, self.world_size)

    def shard_sampler(self, size: int) -> Sampler | None:
        """Validation: rank r takes items r, r + world_size, ... (no padding, so every item is counted
        exactly once in the summed confusion matrix). None = the plain sequential order."""
        return None if not self.enabled else _Shard(size, self.rank, self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks in place (a no-op in a single process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        return self.all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=self.device)).item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one: a stop asked on one rank stops all at the same step
        (a rank that left the loop alone would leave the others waiting in the next all-reduce)."""
        if not self.enabled:
            return flag
        return self.all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int32, device=self.device)).item() > 0


class DistributedEpochSampler(EpochSampler):
    """``EpochSampler`` split over ranks. Every rank computes the same (seed, epoch) order; it is padded
    (by repeating its head) to a multiple of ``world_size`` so all ranks take the same number of steps,
    and rank r takes positions r, r + world_size, ... The union of the ranks' k-th batches of size b is
    then exactly the k-th batch of size ``b * world_size`` of a single-process run, and keys stay
    ``epoch * n + index``, so augmentations are the single-process ones."""

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int, world_size: int):
        super().__init__(size, seed, shuffle)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.num_samples = math.ceil(size / world_size)

    def __iter__(self):
        keys = list(super().__iter__())
        total = self.num_samples * self.world_size
        keys = (keys * math.ceil(total / len(keys)))[:total]
        return iter(keys[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.num_samples


class _Shard(Sampler):
    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def setup(gpu_id: str, timeout_s: float, sync_bn: bool = False) -> DistContext:
    """The context of this process. Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process (cuda:LOCAL_RANK; pick GPUs with CUDA_VISIBLE_DEVICES), or gloo on
    the CPU (``--gpu-id cpu`` or no GPU). ``timeout_s`` bounds every collective, so the ranks stop with
    an error instead of hanging when one of them dies."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if sync_bn:
            warnings.warn("--sync-bn has no effect in a single-process run (start the run with torchrun)")
        return DistContext(device=select_device(gpu_id))
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except KeyError as e:
        raise DistributedRunError(f"WORLD_SIZE={world_size} but {e.args[0]} is not set: start the run with torchrun") from None
    wanted = str(gpu_id).strip().lower()
    use_cuda = wanted != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if wanted not in ("auto", "cuda") and rank == 0:
            warnings.warn(f"--gpu-id {gpu_id} is ignored under torchrun: process N uses the N-th visible GPU "
                          "(choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise DistributedRunError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                                      "start at most that many processes per machine (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        if wanted != "cpu" and rank == 0:
            warnings.warn("no CUDA device is available: the distributed run trains on the CPU (gloo)")
        device = torch.device("cpu")
        if sync_bn:  # SyncBatchNorm raises on CPU tensors in training mode
            raise DistributedRunError("--sync-bn needs CUDA devices: SyncBatchNorm does not run on the CPU")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if use_cuda:
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def failure_message(error: BaseException) -> str | None:
    """A readable message for an error raised while this process is part of a distributed run
    (None outside one): which rank, what failed, and where the cause usually is."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} stopped: {type(error).__name__}: {error}\n"
            "Another process of this distributed run most likely failed or was stopped first: its own output "
            "names the cause. Ranks wait --dist-timeout seconds for each other before giving up.")


# ---- launching a multi-GPU run (the dashboard's GPU selector) -----------------------------------------

def torchrun_command(argv: list[str], gpu_ids: list[int | str]) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that train ``argv`` on these GPUs of this machine: one process per GPU
    through torchrun, rank 0 printing one JSON event per line on stdout (``--reporter jsonl``).
    ``gpu_ids`` are numbered as torch.cuda numbers them in this process; ``--batch-size`` is per GPU."""
    # Ids relative to this process's own CUDA_VISIBLE_DEVICES (e.g. set by the platform) if it has one.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = []
    for gpu in gpu_ids:
        text = str(gpu).strip().lower().removeprefix("cuda:")
        if not text.isdigit() or (visible and int(text) >= len(visible)):
            raise ValueError(f"GPU id must be N or 'cuda:N' of a visible GPU, got {gpu!r}")
        ids.append(visible[int(text)] if visible else text)
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"need one or more distinct GPU ids, got {gpu_ids!r}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(ids)}",
               "--module", "custom_net", *argv, "--reporter", "jsonl"]  # the last --reporter wins
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids), "PYTHONUNBUFFERED": "1"}
    return command, env


def run_torchrun(argv: list[str], gpu_ids: list[int | str], reporter: Reporter, *, ui_state: dict | None = None,
                 cwd: str | None = None, env: dict[str, str] | None = None) -> dict:
    """Train ``argv`` on several GPUs and follow it like ``train.main(argv, reporter, ui_state)``: the same
    reporter hooks are called (previews with the images rank 0 saved), ``reporter.request_stop()`` stops
    the run cleanly, ``ui_state`` becomes info/ui_state.json of a new run, and the summary is returned.
    Raises ArgsError for bad flags before anything starts and DistributedRunError (with the ranks' error
    lines) when the run fails. Blocks: call it from the thread that would have called ``main``."""
    parse_config(argv)
    command, run_env = torchrun_command(argv, gpu_ids)
    run_env.update(env or {})
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=run_env, bufsize=1)
    stderr_tail: deque[str] = deque(maxlen=400)
    rank0_pid: list[int] = []  # set once rank 0 trains (and a SIGTERM stops it cleanly)
    threads = [threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True),
               threading.Thread(target=_forward_stop, args=(proc, reporter, rank0_pid), daemon=True)]
    for thread in threads:
        thread.start()
    summary, output_dir, pid = None, None, None
    try:
        for line in proc.stdout:
            event = _parse_event(line)
            if event is None:
                continue  # third-party output on stdout
            name = event["event"]
            if name == "start":
                output_dir, pid = Path(event["output_dir"]), event["pid"]
                if ui_state is not None and event["start_epoch"] == 1:  # rank 0 wrote its own before "start"
                    atomic_write_json(RunFolder(output_dir).ui_state, ui_state)
            elif name == "epoch_start" and not rank0_pid:
                rank0_pid.append(pid)
            elif name == "finish":
                summary = {k: v for k, v in event.items() if k != "event"}
            elif name == "previews":  # the JSON line names the items; their panels are in the PNG rank 0 saved
                event["images"] = _preview_panels(output_dir, event)
            replay(event, reporter)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # the caller was interrupted: do not leave the ranks running
            proc.terminate()
            proc.wait()
    threads[0].join(timeout=5)
    if returncode != 0 or summary is None:
        errors = [line.rstrip() for line in stderr_tail if line.startswith("error:")]
        detail = "\n".join(dict.fromkeys(errors)) or "".join(list(stderr_tail)[-40:])
        raise DistributedRunError(f"torchrun exited with code {returncode}:\n{detail}")
    return summary


def _forward_stop(proc: subprocess.Popen, reporter: Reporter, rank0_pid: list[int]) -> None:
    """Dashboard Stop -> SIGTERM to rank 0 once it trains (its handler is installed by then); the ranks
    agree on the stop at the next step and rank 0 saves. Not to torchrun: it would forward the signal,
    kill the ranks 30 s later and report a failure. A stop asked earlier waits for training to start."""
    while proc.poll() is None:
        if reporter.should_stop() and rank0_pid:
            os.kill(rank0_pid[0], signal.SIGTERM)
            return
        time.sleep(0.2)


def _parse_event(line: str) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and event.get("event") in EVENT_FIELDS else None


def _preview_panels(output_dir: Path | None, data: dict) -> list[tuple[str, np.ndarray]]:
    """The (item name, RGB panel) pairs of a preview event, cut from the PNG rank 0 saved: the panels
    are stacked vertically, one per item, all of the same height."""
    import cv2

    names = data.pop("items")
    path = RunFolder(output_dir).preview(data["split"], data["epoch"]) if output_dir else None
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if names and path else None
    if image is None:
        return []
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return list(zip(names, np.array_split(image, len(names), axis=0)))
