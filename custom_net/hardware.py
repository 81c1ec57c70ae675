"""Facts about the machine a run or a prediction uses: the device, its precision modes, the CPU's
instruction sets, how to wait for queued GPU work, and how to name all of these in reports."""
from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")


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
    return {flag for line in _cpuinfo().splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


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


def dtype_name(dtype: torch.dtype | None) -> str:
    """'bfloat16', 'float16' ...; None (no autocast) is float32."""
    return str(dtype or torch.float32).replace("torch.", "")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (a no-op on the CPU): timings must not end before it does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} thread(s)"
