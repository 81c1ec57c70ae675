"""Synthetic stand-ins for electron-microscopy membrane data: cells whose thin borders are the one class.

    python bench/membranes.py DEST [--count 30] [--size 256] [--hard]

Thin structures on texture are what the demo's blobs and the lemons are not: a class of a tenth of the
pixels, where losses and inits that let a model settle on background fail. The plain set (straight Voronoi
borders of one width, cells of clearly different shades) proved much easier than a real EM set (issue #23);
--hard is closer to one: curved borders of varying width whose contrast fades in places, cells of close
shades, granular texture, unlabelled dark organelles, vesicles and membrane-like strands, blur and noise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import supervisely as sly


def membrane_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    seeds = rng.uniform(0, size, (int(rng.integers(12, 30)), 2))
    yy, xx = np.mgrid[0:size, 0:size]
    distances = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    cells = distances.argmin(-1)
    border = np.zeros((size, size), bool)
    border[:-1] |= cells[:-1] != cells[1:]
    border[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    border = cv2.dilate(border.astype(np.uint8), np.ones((2, 2), np.uint8)).astype(bool)
    shade = rng.uniform(120, 200, len(seeds))[cells]
    texture = cv2.GaussianBlur(rng.normal(0, 25, (size, size)), (0, 0), 1.5)
    image = shade + texture
    image[border] -= rng.uniform(50, 90)
    image += rng.normal(0, 12, (size, size))
    grey = np.clip(image, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), border


def _smooth_field(rng: np.random.Generator, size: int, scale: float, low: float, high: float) -> np.ndarray:
    """Low-frequency noise rescaled to [low, high]."""
    field = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), scale)
    return low + (high - low) * (field - field.min()) / (np.ptp(field) + 1e-9)


def hard_membrane_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    seeds = rng.uniform(0, size, (int(rng.integers(25, 60)), 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy += _smooth_field(rng, size, 12, -16, 16)  # warped coordinates: curved borders
    xx += _smooth_field(rng, size, 12, -16, 16)
    distances = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
    nearest = np.partition(distances, 1, axis=-1)
    gap = nearest[..., 1] - nearest[..., 0]  # about twice the distance to the nearest border
    half_width = _smooth_field(rng, size, 20, 0.6, 2.2)
    membrane = gap < 2 * half_width
    cells = distances.argmin(-1)
    image = (rng.uniform(135, 175, len(seeds))[cells] + _smooth_field(rng, size, 60, -25, 25)
             + cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), rng.uniform(0.8, 2.0)) * rng.uniform(10, 25))
    contrast = _smooth_field(rng, size, 25, 0.15, 1.0) * rng.uniform(50, 90)  # fades to almost nothing in places
    image -= contrast * np.clip(1 - gap / (2 * half_width + 1.5), 0, 1)
    _draw_distractors(rng, image)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.6, 1.6)) + rng.normal(0, rng.uniform(6, 16), (size, size))
    grey = np.clip(image * rng.uniform(0.7, 1.0) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), membrane


def _draw_distractors(rng: np.random.Generator, image: np.ndarray) -> None:
    """Dark structures that are not membranes: outlined organelles, vesicles and short curved strands."""
    size = image.shape[0]

    def darken(draw, low, high):
        mask = np.zeros(image.shape, np.uint8)
        draw(mask)
        image[mask > 0] -= rng.uniform(low, high)

    for _ in range(int(rng.integers(15, 40))):
        centre, axes = tuple(int(v) for v in rng.uniform(0, size, 2)), (int(rng.uniform(5, 18)), int(rng.uniform(3, 8)))
        angle, outline = rng.uniform(0, 180), int(rng.integers(1, 3))
        darken(lambda m: cv2.ellipse(m, centre, axes, angle, 0, 360, 1, -1), 15, 40)
        darken(lambda m: cv2.ellipse(m, centre, axes, angle, 0, 360, 1, outline), 30, 70)
    for _ in range(int(rng.integers(20, 60))):
        centre, radius = tuple(int(v) for v in rng.uniform(0, size, 2)), int(rng.integers(2, 5))
        darken(lambda m: cv2.circle(m, centre, radius, 1, 1), 30, 60)
    for _ in range(int(rng.integers(10, 30))):
        angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.5, int(rng.integers(3, 8))))
        points = rng.uniform(0, size, 2) + np.cumsum(6 * np.stack([np.cos(angles), np.sin(angles)], 1), 0)
        width = int(rng.integers(1, 3))
        darken(lambda m: cv2.polylines(m, [np.int32(points)], False, 1, width), 25, 60)


def build(dest: Path, count: int = 30, size: int = 256, seed: int = 0, hard: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    membrane = sly.ObjClass("membrane", sly.Bitmap, color=[255, 0, 0])
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection([membrane]),
                           tag_metas=sly.TagMetaCollection([sly.TagMeta("train", sly.TagValueType.NONE),
                                                            sly.TagMeta("val", sly.TagValueType.NONE)]))
    project = sly.Project(str(dest), sly.OpenMode.CREATE)
    project.set_meta(meta)
    dataset = project.create_dataset("em")
    for i in range(count):
        image, border = (hard_membrane_sample if hard else membrane_sample)(rng, size)
        tag = sly.Tag(meta.get_tag_meta("train" if i < count * 5 // 6 else "val"))
        ann = sly.Annotation((size, size), [sly.Label(sly.Bitmap(border), membrane)], img_tags=sly.TagCollection([tag]))
        dataset.add_item_np(f"em_{i:03d}.png", image, ann=ann)
    return Path(dest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hard", action="store_true", help="the harder set (see above)")
    args = parser.parse_args()
    print(build(Path(args.dest), args.count, args.size, hard=args.hard))
