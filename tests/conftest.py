"""Shared fixtures: the read-only ../shared data (skipped when absent) and a tiny demo project."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, shared_path

# Tests never download and never read the user's caches: ImageNet weights come from a closed local port
# (refused at once), unless a test serves them itself.
os.environ.setdefault("UNET_CACHE_DIR", str(REPO / ".pytest_cache" / "unet_cache"))
os.environ["UNET_WEIGHTS_MIRROR"] = "http://127.0.0.1:9"


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
