"""The train dashboard on a machine that seems to have two GPUs, so that its multi-GPU path runs on a
CPU-only machine: ``uvicorn tests.dashboard_two_gpus:app --app-dir supervisely/train/src``.
Only the device list is faked: the torchrun processes see no CUDA and train on the CPU with gloo."""
from custom_net import sly_integration

sly_integration.list_devices = lambda: [("cpu", "CPU"), ("cuda:0", "GPU 0: test double"), ("cuda:1", "GPU 1: test double")]

from main import app  # noqa: E402  (after the patch: step 06 imports list_devices by name)

__all__ = ["app"]
