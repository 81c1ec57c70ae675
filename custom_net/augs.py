"""Supervisely / ImgAug Studio augmentation configs: load, validate, build, apply.

This is the one module through which the project touches imgaug. imgaug 0.4.0 still uses
``np.bool`` and ``np.complex`` (removed in numpy 1.24) in a few augmenters, so the two
aliases are restored here, before imgaug is imported.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

if "bool" not in np.__dict__:
    np.bool = np.bool_
if "complex" not in np.__dict__:
    np.complex = np.complex128

import imgaug  # noqa: E402  (needs the aliases above)
import imgaug.augmenters as iaa  # noqa: E402
from supervisely.aug import imgaug_utils  # noqa: E402

from custom_net.preprocessing import resize_image, resize_mask  # noqa: E402

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "supervisely" / "train" / "augs"


class AugsConfigError(ValueError):
    """An augmentation config file is unreadable or describes an unknown augmenter."""


def list_templates() -> dict[str, Path]:
    """Shipped augmentation templates by name (file stem)."""
    return {p.stem: p for p in sorted(TEMPLATES_DIR.glob("*.json"))}


def load_augs_config(path: str | Path) -> dict:
    """Read and validate a config; ``path`` may also be the name of a shipped template."""
    templates = list_templates()
    path = templates.get(str(path), Path(path))
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AugsConfigError(
            f"augmentation config {path} not found (templates: {', '.join(templates) or 'none'})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AugsConfigError(f"augmentation config {path} is not valid JSON: {e}") from None
    validate_augs_config(config, source=str(path))
    return config


def validate_augs_config(config, source: str = "augmentation config") -> None:
    if not isinstance(config, dict) or not isinstance(config.get("pipeline"), list):
        raise AugsConfigError(f'{source}: expected an object with a "pipeline" list')
    for i, step in enumerate(config["pipeline"]):
        if not isinstance(step, dict) or not {"category", "name", "params"} <= step.keys():
            raise AugsConfigError(f"{source}: pipeline[{i}] needs category, name and params")
        category = getattr(iaa, str(step["category"]), None)
        if category is None or not callable(getattr(category, str(step["name"]), None)):
            raise AugsConfigError(f"{source}: pipeline[{i}] names unknown augmenter iaa.{step['category']}.{step['name']}")
    try:
        build_augmenter(config)
    except Exception as e:  # imgaug rejects bad parameter values only when building
        raise AugsConfigError(f"{source}: cannot build the pipeline: {e}") from None


def build_augmenter(config: dict) -> iaa.Augmenter:
    # The SDK rewrites params in place (lists -> tuples): give it a copy.
    config = copy.deepcopy(config)
    return imgaug_utils.build_pipeline(config["pipeline"], random_order=config.get("random_order", False))


def is_spatial(config: dict) -> bool:
    """Whether the pipeline moves pixels other than by flipping (crops, pads, zooms, rotations, warps):
    those augmenters need more detail than the training size to give what the original app's gave."""
    return any(step["category"] in ("geometric", "size") for step in config["pipeline"])


def augs_to_python(config: dict) -> str:
    """The pipeline as imgaug Python code (info/augs_preview.py)."""
    lines = [imgaug_utils.aug_to_python(step) for step in config["pipeline"]]
    body = ",\n".join(f"    {line}" for line in lines)
    return (
        "import imgaug.augmenters as iaa\n\n"
        f"seq = iaa.Sequential([\n{body}\n], random_order={bool(config.get('random_order', False))})\n"
    )


def augment(augmenter: iaa.Augmenter, image: np.ndarray, mask: np.ndarray, seed: int,
            size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augment image and class-index mask together; the result depends only on ``seed``.

    The output is resized to ``size`` (height, width; default: the input's), nearest-neighbour for the
    mask: so augmenters may change the size (crop without keep_size), and may work on a larger image.
    """
    _seed(augmenter, seed)
    out_image, out_mask = imgaug_utils.apply_to_image_and_mask(augmenter, image, mask)
    height, width = size or mask.shape
    out_mask = out_mask.astype(np.uint8)
    return resize_image(out_image, height, width), resize_mask(out_mask, height, width)


def _seed(augmenter: iaa.Augmenter, seed: int) -> None:
    """Give every augmenter of the pipeline its own generator, derived from ``seed`` alone.

    Set directly rather than through ``augmenter.seed_``, which costs a millisecond a sample and misses a
    child list that is an augmenter of its own (the Sequential inside MultiplyAndAddToBrightness, in every
    shipped template, would draw its random_order from a generator that carries over between calls).
    """
    members, stack, seen = [], [augmenter], set()
    while stack:
        aug = stack.pop()
        if id(aug) in seen:
            continue
        seen.add(id(aug))
        members.append(aug)
        for children in aug.get_children_lists():
            if isinstance(children, iaa.Augmenter) and children is not aug:
                stack.append(children)
            else:
                stack.extend(children)
    for aug, state in zip(members, np.random.SeedSequence(seed).generate_state(len(members), np.uint64)):
        aug.random_state = imgaug.random.RNG(int(state))
