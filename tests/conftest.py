"""Shared fixtures: the read-only ../shared data (skipped when absent) and a tiny demo project."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from custom_net.reporting import Reporter

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# Tests never download and never read the user's caches: ImageNet weights come from a closed local port
# (refused at once), unless a test serves them itself.
os.environ.setdefault("UNET_CACHE_DIR", str(REPO / ".pytest_cache" / "unet_cache"))
os.environ["UNET_WEIGHTS_MIRROR"] = "http://127.0.0.1:9"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def lemons_dir() -> Path:
    return shared_path("data", "lemons_annotated")


@pytest.fixture(scope="session")
def reference_augs() -> list[Path]:
    return sorted(shared_path("reference", "augs").glob("*.json"))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A 12-image synthetic project (3 datasets, bitmap / polygon / rectangle classes), 64x48 images."""
    from custom_net.demo import build_demo_project

    return build_demo_project(tmp_path_factory.mktemp("tiny") / "project", images_per_dataset=(6, 4, 2), size=(64, 48))


class MessageReporter(Reporter):
    """Keeps the run's messages as (level, text)."""

    def __init__(self):
        super().__init__()
        self.messages: list[tuple[str, str]] = []

    def message(self, level, text):
        self.messages.append((level, text))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, script: str = "train.py") -> subprocess.CompletedProcess:
    """Run ``python custom_net/<script> ARGS`` as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "custom_net" / script), *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


# A training configuration small enough for a few seconds on two CPU cores.
TINY_TRAIN_ARGS = ["--model", "UNet", "--input-height", "64", "--input-width", "64", "--batch-size", "4",
                   "--epochs", "2", "--encoder-weights", "none", "--reporter", "none", "--gpu-id", "cpu"]
