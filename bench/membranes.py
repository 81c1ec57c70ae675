"""A synthetic stand-in for electron-microscopy membrane data: cells whose thin borders are the one class.

    python bench/membranes.py DEST [--count 30] [--size 256]

Thin structures on texture are what the demo's blobs and the lemons are not: a class of a few
percent of the pixels, where losses and inits that let a model settle on background fail.
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


def build(dest: Path, count: int = 30, size: int = 256, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    membrane = sly.ObjClass("membrane", sly.Bitmap, color=[255, 0, 0])
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection([membrane]),
                           tag_metas=sly.TagMetaCollection([sly.TagMeta("train", sly.TagValueType.NONE),
                                                            sly.TagMeta("val", sly.TagValueType.NONE)]))
    project = sly.Project(str(dest), sly.OpenMode.CREATE)
    project.set_meta(meta)
    dataset = project.create_dataset("em")
    for i in range(count):
        image, border = membrane_sample(rng, size)
        tag = sly.Tag(meta.get_tag_meta("train" if i < count * 5 // 6 else "val"))
        ann = sly.Annotation((size, size), [sly.Label(sly.Bitmap(border), membrane)], img_tags=sly.TagCollection([tag]))
        dataset.add_item_np(f"em_{i:03d}.png", image, ann=ann)
    return Path(dest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print(build(Path(args.dest), args.count, args.size))
