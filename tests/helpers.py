"""What several test modules share: paths, the tiny training arguments, a reporter that records events, a
fixed-seed run folder, the serving app in a subprocess, and checks of run folders and masks."""
from __future__ import annotations

import ast
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
import supervisely as sly
import torch
from PIL import Image

from custom_net.model import build_model
from custom_net.reporting import EventSink
from custom_net.run_folder import RunFolder
from custom_net.train import main

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# A training configuration small enough for a few seconds on two CPU cores.
TINY_TRAIN_ARGS = ["--model", "UNet", "--input-height", "64", "--input-width", "64", "--batch-size", "4",
                   "--epochs", "2", "--encoder-weights", "none", "--reporter", "none", "--gpu-id", "cpu"]


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, script: str = "train.py") -> subprocess.CompletedProcess:
    """Run ``python custom_net/<script> ARGS`` as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "custom_net" / script), *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


class RecordingReporter(EventSink):
    """Keeps every event of a run (``custom_net.reporting``); asks for a stop when epoch ``stop_at_epoch`` starts."""

    def __init__(self, stop_at_epoch: int | None = None):
        super().__init__()
        self.events: list[dict] = []
        self.stop_at_epoch = stop_at_epoch

    def emit(self, event: dict) -> None:
        self.events.append(event)
        if event["event"] == "epoch_start" and event["epoch"] == self.stop_at_epoch:
            self.request_stop()

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    @property
    def messages(self) -> list[tuple[str, str]]:
        return [(e["level"], e["text"]) for e in self.named("message")]


# ---- a run folder with a fixed-seed model ---------------------------------------------------------

CLASSES = [("__bg__", sly.Bitmap, [0, 0, 0]), ("lemon", sly.Polygon, [255, 200, 0]), ("kiwi", sly.Bitmap, [40, 160, 40])]


def make_run(root: Path, model_name: str = "UNet", height: int = 64, width: int = 64, seed: int = 0,
             epoch: int = 1) -> Path:
    """A run folder (its best checkpoint, model classes and ui_state) holding a fixed-seed model."""
    folder = RunFolder(root)
    folder.checkpoints.mkdir(parents=True, exist_ok=True)
    folder.info.mkdir(exist_ok=True)
    classes = [sly.ObjClass(name, shape, color).to_json() for name, shape, color in CLASSES]
    folder.model_classes.write_text(json.dumps(classes))
    folder.ui_state.write_text(json.dumps({"selectedModel": model_name, "imgSize": {"width": width, "height": height}}))
    torch.manual_seed(seed)
    model = build_model(model_name, len(CLASSES), "none")
    balance_classes(model, height, width)
    checkpoint = folder.checkpoint(epoch, "best")
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


@torch.no_grad()
def balance_classes(model: torch.nn.Module, height: int, width: int) -> None:
    """Shift the head's biases so that every class wins somewhere: an untrained network otherwise
    predicts one class everywhere, and tests could not tell a right mask from a wrong one."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == len(CLASSES)][-1]
    model.eval()
    sample = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)) * 4 - 2
    logits = model(sample)
    head.bias -= logits.mean(dim=(0, 2, 3))
    head.weight *= 4  # wider margins between classes: fewer near-ties for bf16 to flip
    head.bias *= 4


def lemons_images() -> list[Path]:
    return sorted(shared_path("data", "lemons_test").rglob("*.jpeg"))


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header and one tiny IDAT for an image of absurd declared size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---- training runs: bad input, results ----------------------------------------------------------

BAD_INPUT_ARGS = [*TINY_TRAIN_ARGS, "--epochs", "1"]


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    change(value)
    path.write_text(json.dumps(value), encoding="utf-8")


def fails(tmp_path: Path, argv: list[str], error: type, *names: str) -> str:
    """Run main(argv); expect exactly ``error`` whose message names every one of ``names``."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    reporter = RecordingReporter()
    with pytest.raises(Exception) as info:
        main([*BAD_INPUT_ARGS, *argv, "--output", str(out), "--cache-dir", str(cache)], reporter=reporter)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    assert info.value.__cause__ is None and "Traceback" not in message  # one error, not a chain
    assert not reporter.named("start")  # raised before training started
    assert not out.exists(), "an output folder was left behind"
    assert not list(cache.iterdir()), "a data cache was left behind"
    return message


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in RunFolder(run).metrics_log.read_text().splitlines()]


def checkpoints_of(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p) for p in RunFolder(run).checkpoint_files()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[0]}"


PNG_END = b"IEND\xaeB`\x82"  # the last chunk of every PNG


def assert_every_file_loads(run: Path) -> None:
    """Every file under its final name is whole: checkpoints load, JSON parses, PNGs decode."""
    reference_keys = None
    for path in sorted(p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")):
        name = path.name
        if name.endswith(".pth"):  # a plain state dict, as the Serve app loads it
            state = torch.load(path, weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            assert reference_keys in (None, shapes), f"{path}: another architecture"
            reference_keys = shapes
        elif name.endswith(".pt"):
            state = torch.load(path, weights_only=False)
            assert {"model", "optimizer", "epoch", "history"} <= state.keys(), path
        elif name.endswith(".jsonl"):
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".png"):
            assert path.read_bytes().endswith(PNG_END), f"{path}: truncated"  # decoders forgive a missing end
            with Image.open(path) as image:
                image.load()  # raises when pixel data is cut short
        elif name.endswith(".py"):
            ast.parse(path.read_text(encoding="utf-8"))
        elif name.endswith(".npz"):
            with np.load(path) as saved:  # the int8 runtime's calibration images
                assert saved["images"].dtype == np.uint8, path
        else:
            raise AssertionError(f"unexpected file {path}")


# ---- the serving app in a subprocess --------------------------------------------------------------

STARTUP_TIMEOUT_S = 180
PLATFORM_VARIABLES = {"SERVER_ADDRESS", "API_TOKEN", "TEAM_ID", "TASK_ID", "ENV", "UNET_CHECKPOINT",
                      "modal.state.slyFile", "modal.state.device", "modal.state.runtime"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app as deployed: locally on ``run``, or on the platform as described by ``platform_env``."""

    def __init__(self, run: Path | None, workdir: Path, platform_env: dict | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "server.log"
        env = {k: v for k, v in os.environ.items() if k not in PLATFORM_VARIABLES}
        env.update({"UNET_MODEL_DIR": str(workdir / "models"), "UNET_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
        env.update(platform_env or {"UNET_CHECKPOINT": str(run)})
        for _ in range(3):  # another process may take the free port between the check and uvicorn's bind
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "main:app", "--app-dir", str(REPO / "supervisely" / "serve" / "src"),
                     "--host", "127.0.0.1", "--port", str(self.port)],
                    cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_until_deployed():
                return
            if "address already in use" not in self.log.read_text().lower():
                break
        self.stop()
        pytest.fail(f"the server did not start:\n{self.log.read_text()[-4000:]}")

    def _wait_until_deployed(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if requests.post(f"{self.url}/is_deployed", timeout=5).json().get("deployed"):
                    return True
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def post(self, route: str, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/{route}", timeout=120, **kwargs)

    def infer(self, data: bytes, name: str = "image.png", settings: dict | None = None) -> requests.Response:
        form = {"settings": json.dumps({"settings": settings or {}})}
        return self.post("inference_image", files={"files": (name, data)}, data=form)


def mask_of(ann_json: dict, meta: sly.ProjectMeta) -> np.ndarray:
    """The class-index mask an annotation describes (labels painted onto __bg__)."""
    ann = sly.Annotation.from_json(ann_json, meta)
    mask = np.zeros(ann.img_size, np.uint8)
    for label in ann.labels:
        assert label.obj_class.name != "__bg__"
        label.geometry.draw(mask, meta.obj_classes.keys().index(label.obj_class.name))
    return mask


def assert_agrees(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert (got == expected).mean() >= 0.999  # bf16 kernels may split a near-tie differently between processes
