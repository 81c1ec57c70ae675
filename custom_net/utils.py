"""Training loop pieces: device and precision choice, optimizer, LR schedule, one epoch, checkpoints."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.optim import lr_scheduler

from custom_net.preprocessing import normalize_batch

OPTIMIZERS = ("SGD", "Adam", "AdamW")
LR_SCHEDULES = ("none", "StepLR", "ExponentialLR", "MultiStepLR", "cosine")
AMP_MODES = ("auto", "bf16", "fp16", "off")


class NonFiniteLoss(RuntimeError):
    pass


# Under this loss scale only gradients beyond ~4e9 still overflow fp16: they are inf/NaN themselves, and the
# scaler would go on skipping every step (halving the scale each time) without the run ever failing.
MIN_LOSS_SCALE = 2.0 ** -16


class StopRequested(Exception):
    """The user asked to stop (dashboard Stop, SIGTERM); training ends cleanly."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(gpu_id: str) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'N'. A missing GPU means the CPU, with a warning, never a refusal."""
    text = str(gpu_id).strip().lower()
    if text == "auto":
        text = "cuda:0" if torch.cuda.is_available() else "cpu"
    if text.isdigit():
        text = f"cuda:{text}"
    if text == "cpu":
        return torch.device("cpu")
    if not text.startswith("cuda"):
        raise ValueError(f"--gpu-id must be 'cpu', 'cuda' or 'cuda:N', got {gpu_id!r}")
    if not torch.cuda.is_available():
        warnings.warn(f"--gpu-id {gpu_id}: no CUDA device is available; training on the CPU")
        return torch.device("cpu")
    device = torch.device(text)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--gpu-id {gpu_id}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def resolve_num_workers(setting: int | str, device: torch.device) -> int:
    """``--num-workers auto``: on the CPU the cores are busy training, and loading from the cache is cheap;
    a GPU is kept fed by worker processes that decode and augment ahead of it."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_fast_bf16() -> bool:
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX", "AVX512_AMX"):
        return True
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def cpu_has_vnni() -> bool:
    """int8 dot-product instructions: 8-bit activations cannot saturate the int16 sums of older kernels."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _cpu_flags())


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device`` (None = float32)."""
    if mode not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def parameter_groups(model: torch.nn.Module, lr: float, decoder_lr_factor: float = 1.0) -> list[dict]:
    """The encoder's parameters at ``lr``, the rest (decoder, head) at ``lr * decoder_lr_factor``.
    One group when the factor is 1, so runs and resume states without it keep their layout."""
    params = list(model.parameters())
    if decoder_lr_factor == 1:
        return [{"params": params}]
    encoder = {id(p) for module in model.encoder_modules() for p in module.parameters()}
    groups = [{"params": [p for p in params if id(p) in encoder]},
              {"params": [p for p in params if id(p) not in encoder], "lr": lr * decoder_lr_factor}]
    return [group for group in groups if group["params"]]  # UNet has no encoder: all of it is decoder


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float, nesterov: bool):
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def build_scheduler(args, optimizer, iters_per_epoch: int):
    """Returns (scheduler or None, steps_per_iteration). Epoch schedules step after each epoch's
    optimizer steps; ``cosine`` (linear warmup, then cosine decay to ``min_lr``) steps every iteration."""
    name = args.lr_schedule
    if name == "none":
        return None, False
    if name == "StepLR":
        return lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma_step), False
    if name == "ExponentialLR":
        return lr_scheduler.ExponentialLR(optimizer, gamma=args.gamma_exp), False
    if name == "MultiStepLR":
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(args.milestones), gamma=args.gamma_step), False
    if name == "cosine":
        total = max(1, args.epochs * iters_per_epoch)
        warmup = min(int(round(args.warmup_epochs * iters_per_epoch)), total - 1)
        floor = args.min_lr / args.lr if args.lr else 0.0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return lr_scheduler.LambdaLR(optimizer, factor), True
    raise ValueError(f"unknown --lr-schedule {name!r}; choose from {', '.join(LR_SCHEDULES)}")


def set_bn_momentum(model: torch.nn.Module, spec, iters_per_epoch: int) -> float:
    """Sets (and returns) the running-statistics momentum of every BatchNorm layer.

    'auto' = 1 / iterations per epoch, at least PyTorch's 0.1. With few iterations per epoch the weights
    move far between updates, and at 0.1 the statistics validation uses would average models of several
    epochs ago: on a 5-image project (one iteration per epoch) AlbuNet validated at 0 IoU for 27 of 40
    epochs while its training loss had long converged.
    """
    momentum = max(0.1, 1 / max(1, iters_per_epoch)) if spec == "auto" else float(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return momentum


def current_lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def forward_batch(model, images, masks, device, amp_dtype=None, memory_format=torch.contiguous_format):
    """Move a (uint8 images, index masks) batch to ``device``, normalise there, run the model.
    Returns (logits, int64 masks on the device)."""
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True).long()
    inputs = normalize_batch(images).contiguous(memory_format=memory_format)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(inputs), masks


def train_one_epoch(model, criterion, optimizer, loader, device, *, epoch: int, scheduler=None, scaler=None,
                    amp_dtype=None, memory_format=torch.contiguous_format, on_step=None, on_skip=None,
                    clip_grad_norm: float = 0.0) -> float:
    """One pass over ``loader``; returns the mean training loss.

    ``clip_grad_norm`` > 0 rescales the gradients whose total norm exceeds it before each step.

    ``scheduler`` is stepped after every optimizer step (per-iteration schedules only).
    ``on_step(iteration, loss, lr)`` is called after each step and may raise StopRequested.
    ``on_skip(iteration)``: the fp16 gradient scaler found inf/NaN gradients and skipped that step.
    """
    model.train()
    total, count = 0.0, 0
    for i, (images, masks) in enumerate(loader):
        logits, masks = forward_batch(model, images, masks, device, amp_dtype, memory_format)
        loss = criterion(logits, masks)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at epoch {epoch}, iteration {i + 1}; "
                                "try a lower --lr or --amp off")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients; the scaler still skips inf/NaN ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:  # the scaler backs off only after a skip
                if on_skip is not None:
                    on_skip(i + 1)
                if scaler.get_scale() < MIN_LOSS_SCALE:
                    raise NonFiniteLoss(f"fp16 gradients were still inf/NaN at epoch {epoch}, iteration {i + 1}, "
                                        f"with the loss scale down to {scaler.get_scale():g} (the loss was finite; "
                                        "every such step was skipped); try a lower --lr or --amp bf16 / off")
        else:
            loss.backward()
            # A finite loss can still give inf/NaN gradients; one step with them ruins every weight.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(norm):
                raise NonFiniteLoss(f"gradient became {norm.item()} at epoch {epoch}, iteration {i + 1} "
                                    "(the loss was finite); try a lower --lr or --amp off")
            if clip_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip_grad_norm, norm)
            optimizer.step()
        lr = current_lr(optimizer)
        if scheduler is not None:
            scheduler.step()
        total += value * len(images)
        count += len(images)
        if on_step is not None:
            on_step(i + 1, value, lr)
    return total / max(count, 1)


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


class CheckpointSaver:
    """Plain state dicts as checkpoints/model_NNN.pth (every ``interval`` epochs, ``max_keep`` newest kept,
    -1 = all), model_NNN_best.pth (best ``metric``) and model_NNN_last.pth."""

    def __init__(self, directory: Path, interval: int, max_keep: int, metric: str, save_best: bool, save_last: bool):
        self.directory = Path(directory)
        self.interval, self.max_keep = interval, max_keep
        self.metric, self.save_best, self.save_last = metric, save_best, save_last
        self.higher_is_better = metric != "val_loss"
        self.kept: list[str] = []
        self.best_value: float | None = None
        self.best_path: str | None = None

    def _save(self, model, name: str) -> Path:
        path = self.directory / name
        atomic_torch_save(model.state_dict(), path)
        return path

    def on_epoch_end(self, model, epoch: int, metrics: dict | None) -> None:
        if self.interval > 0 and epoch % self.interval == 0:
            self.kept.append(self._save(model, f"model_{epoch:03d}.pth").name)
            while self.max_keep >= 0 and len(self.kept) > self.max_keep:
                (self.directory / self.kept.pop(0)).unlink(missing_ok=True)
        if self.save_best and metrics is not None and self.metric in metrics:
            value = metrics[self.metric]
            better = (self.best_value is None or
                      (value > self.best_value if self.higher_is_better else value < self.best_value))
            if not math.isnan(value) and better:
                previous = self.best_path
                self.best_path = self._save(model, f"model_{epoch:03d}_best.pth").name
                self.best_value = value
                if previous and previous != self.best_path:
                    (self.directory / previous).unlink(missing_ok=True)

    def on_train_end(self, model, epoch: int) -> Path | None:
        if not self.save_last:
            return None
        last = self._save(model, f"model_{epoch:03d}_last.pth")
        for old in self.directory.glob("model_*_last.pth"):  # after the save: a crash never leaves none
            if old != last:
                old.unlink()
        return last

    def state_dict(self) -> dict:
        return {"kept": list(self.kept), "best_value": self.best_value, "best_path": self.best_path}

    def load_state_dict(self, state: dict) -> None:
        self.kept = list(state["kept"])
        self.best_value, self.best_path = state["best_value"], state["best_path"]
