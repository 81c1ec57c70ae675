"""ImageNet encoder weights, kept where torchvision keeps them (``<torch hub dir>/checkpoints/``, under
torchvision's file names) and downloaded there as torchvision does: with a progress bar, checked against
the hash prefix in the file name. ``UNET_WEIGHTS_MIRROR`` names another server holding the same files
(e.g. a mirror inside a network without internet access).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

MIRROR_ENV = "UNET_WEIGHTS_MIRROR"
TIMEOUT_S = 30  # per network read: an unreachable host fails the download instead of hanging it


class EncoderWeightsMissing(FileNotFoundError):
    """ImageNet weights were asked for but are neither in the torch cache, nor at the given path, nor could
    they be downloaded; the message says where to put them."""


def official_url(encoder: str) -> str:
    return torchvision.models.get_model_weights(encoder).IMAGENET1K_V1.url


def download_url(encoder: str) -> str:
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    name = official_url(encoder).rsplit("/", 1)[1]
    return f"{mirror.rstrip('/')}/{name}" if mirror else official_url(encoder)


def cached_path(encoder: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / official_url(encoder).rsplit("/", 1)[1]


def ensure_cached(encoder: str, report=None) -> Path:
    """The cached weights file of ``encoder`` (vgg11, vgg16, resnet34), downloaded first if missing;
    EncoderWeightsMissing, naming the file and where to put it, if that fails."""
    path = cached_path(encoder)
    if path.is_file():
        return path
    url = download_url(encoder)
    if report is not None:
        report("info", f"downloading ImageNet weights for the {encoder} encoder from {url} into {path}")
    try:
        _download(url, path)
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
        raise EncoderWeightsMissing(
            f"ImageNet weights for the {encoder} encoder are not in the torch cache and could not be downloaded "
            f"from {url} ({e}). Fetch {official_url(encoder)} on a machine with internet and put it at {path}, "
            f"or pass the file with --encoder-weights FILE, or train from scratch with --encoder-weights none"
        ) from None
    return path


def _download(url: str, path: Path) -> None:
    """``url`` into ``path`` through a temporary file beside it, with a progress bar on stderr; the file
    name's hash prefix (torchvision's ``name-<sha256 prefix>.pth``) must match the content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    expected = re.search(r"-([0-9a-f]{6,})\.", path.name)
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp, \
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, file=sys.stderr) as bar:
            try:
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                tmp.close()
                if expected and not digest.hexdigest().startswith(expected.group(1)):
                    raise ValueError(f"the download's SHA-256 {digest.hexdigest()[:12]}... does not match the "
                                     f"{expected.group(1)} in its name: corrupt or not that file")
                os.replace(tmp.name, path)
            finally:
                Path(tmp.name).unlink(missing_ok=True)


def load_imagenet_weights(module: torch.nn.Module, encoder: str, weights_path: str | os.PathLike | None = None,
                          prefix: str = "") -> None:
    """Load the ImageNet weights of ``encoder`` into ``module`` (from ``weights_path``, else the torch cache,
    downloading them there if needed). With ``prefix``, only the entries under it are loaded (the VGG
    feature layers, without the classifier)."""
    path = Path(weights_path) if weights_path else ensure_cached(encoder)
    if not path.is_file():
        raise EncoderWeightsMissing(f"--encoder-weights: file {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(state)
