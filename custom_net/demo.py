"""Synthetic Supervisely demo project for tests, smoke runs and offline demos.

The project is small and quick to generate, but deliberately not trivial: objects
of three classes (one per geometry type the app must rasterize: bitmap, polygon,
rectangle) sit on a textured, noisy background that also holds distractor strokes
and rings painted in the same colours as the objects. So colour is a strong cue
but not a perfect one, and a model has to use shape too. It also exercises the
loader on a nested dataset and on images without any objects.

Layout (all images PNG, ``size`` = (width, height)):

    ds_a/            images_per_dataset[0] items
    ds_b/            images_per_dataset[1] items
    ds_b/ds_nested/  images_per_dataset[2] items (SDK name "ds_b/ds_nested")

Every item carries exactly one image tag, ``train`` or ``val``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import cv2
import numpy as np
import supervisely as sly

DEMO_CLASSES = ("disk", "triangle", "box")
_GEOMETRY = {"disk": sly.Bitmap, "triangle": sly.Polygon, "box": sly.Rectangle}
_COLORS = {"disk": (220, 60, 60), "triangle": (60, 200, 80), "box": (60, 90, 220)}
# (dataset name, path relative to the project); nested datasets live in "<parent>/datasets/<child>".
_DATASETS = (("ds_a", "ds_a"), ("ds_b", "ds_b"), ("ds_b/ds_nested", "ds_b/datasets/ds_nested"))
_CACHE_NAME = "demo_project_v2"  # bump the suffix whenever the generated data changes
_MARKER = ".complete"
# The cached demo used by `train.py --demo`: enough items for a model to learn in a few CPU minutes.
DEMO_IMAGES_PER_DATASET = (40, 24, 16)


def _meta() -> sly.ProjectMeta:
    classes = [sly.ObjClass(n, _GEOMETRY[n], color=list(_COLORS[n])) for n in DEMO_CLASSES]
    # Explicit colours: the SDK picks random ones otherwise, breaking byte-identical rebuilds.
    tags = [
        sly.TagMeta("train", sly.TagValueType.NONE, color=[255, 200, 0]),
        sly.TagMeta("val", sly.TagValueType.NONE, color=[0, 200, 255]),
    ]
    return sly.ProjectMeta(obj_classes=sly.ObjClassCollection(classes), tag_metas=sly.TagMetaCollection(tags))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        chan = np.full((h, w), rng.uniform(70, 170), np.float32)
        for _ in range(3):  # low-frequency sinusoids give smooth, varied shading
            fy, fx = rng.uniform(-2.5, 2.5, 2) / np.array([h, w])
            chan += rng.uniform(10, 35) * np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
        img[..., c] = chan
    # Distractors in object colours but with other shapes (strokes, rings, thin ellipses).
    side = min(h, w)
    for _ in range(rng.integers(2, 6)):
        color = np.array(_COLORS[DEMO_CLASSES[rng.integers(3)]], np.float32) + rng.normal(0, 15, 3)
        color = tuple(float(v) for v in color)
        p0 = (int(rng.integers(w)), int(rng.integers(h)))
        kind = rng.integers(3)
        if kind == 0:
            p1 = (int(rng.integers(w)), int(rng.integers(h)))
            cv2.line(img, p0, p1, color, int(rng.integers(2, 5)))
        elif kind == 1:
            cv2.circle(img, p0, int(rng.uniform(0.06, 0.15) * side), color, int(rng.integers(2, 4)))
        else:
            axes = (int(rng.uniform(0.1, 0.25) * side), int(rng.integers(2, 4)))
            cv2.ellipse(img, p0, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    return img + rng.normal(0, 10, img.shape).astype(np.float32)


def _random_geometry(rng: np.random.Generator, cls: str, h: int, w: int):
    side = min(h, w)
    if cls == "box":
        bh, bw = (rng.uniform(0.12, 0.4, 2) * side).astype(int)
        top, left = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        return sly.Rectangle(top, left, top + bh - 1, left + bw - 1)
    r = rng.uniform(0.08, 0.2) * side
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    if cls == "disk":
        yy, xx = np.mgrid[0:h, 0:w]
        return sly.Bitmap((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)  # Bitmap crops the full-size mask itself
    angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
    radii = r * rng.uniform(0.85, 1.15, 3)
    rows = np.clip(np.round(cy + radii * np.sin(angles)), 0, h - 1).astype(int)
    cols = np.clip(np.round(cx + radii * np.cos(angles)), 0, w - 1).astype(int)
    return sly.Polygon(exterior=[sly.PointLocation(int(y), int(x)) for y, x in zip(rows, cols)])


def _make_item(rng: np.random.Generator, meta: sly.ProjectMeta, h: int, w: int, tag: str):
    img = _background(rng, h, w)
    labels = []
    n_objects = rng.choice(5, p=[0.1, 0.3, 0.25, 0.2, 0.15])  # ~10% of images are empty
    for _ in range(n_objects):
        cls = DEMO_CLASSES[rng.integers(3)]
        geom = _random_geometry(rng, cls, h, w)
        # Paint exactly what the SDK rasterizes, so pixels and annotation always agree.
        canvas = np.zeros((h, w), np.uint8)
        geom.draw(canvas, 1)
        mask = canvas.astype(bool)
        # Base colour + per-object shift + linear shading + pixel noise: strong but imperfect cue.
        color = np.array(_COLORS[cls], np.float32) + rng.normal(0, 12, 3)
        yy, xx = np.nonzero(mask)
        shade = rng.uniform(-0.4, 0.4, 2) @ np.stack([yy - yy.mean(), xx - xx.mean()])
        img[mask] = color + shade[:, None] + rng.normal(0, 14, (len(yy), 3))
        labels.append(sly.Label(geom, meta.get_obj_class(cls)))
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    ann = sly.Annotation((h, w), labels=labels, img_tags=sly.TagCollection([sly.Tag(meta.get_tag_meta(tag))]))
    return img, ann


def _split_tags(rng: np.random.Generator, n: int) -> list:
    is_val = rng.random(n) < 0.25
    if n >= 2 and len(set(is_val.tolist())) == 1:
        is_val[rng.integers(n)] = not is_val[0]  # flip one item so both splits exist
    return ["val" if v else "train" for v in is_val]


def build_demo_project(dest_dir, *, seed=0, images_per_dataset=(12, 8, 4), size=(160, 128)) -> pathlib.Path:
    """Write the synthetic demo project into ``dest_dir`` and return its path.

    ``dest_dir`` must not exist or be an empty directory (ValueError otherwise).
    ``images_per_dataset`` gives the item counts of ds_a, ds_b, ds_b/ds_nested;
    ``size`` is (width, height). Output is fully determined by ``seed``.

    Objects may overlap. The label list is in painting order, so when labels are
    rasterized in list order a later label overwrites earlier ones, matching the
    image (an earlier label can be partly or even fully hidden).
    """
    dest = pathlib.Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"Destination {str(dest)!r} exists and is not an empty directory")
    if len(images_per_dataset) != len(_DATASETS) or min(images_per_dataset) < 0:
        raise ValueError(f"images_per_dataset must be {len(_DATASETS)} non-negative counts")
    w, h = size
    meta = _meta()
    project = sly.Project(str(dest), sly.OpenMode.CREATE)
    project.set_meta(meta)
    for ds_idx, ((name, rel_path), count) in enumerate(zip(_DATASETS, images_per_dataset)):
        # A per-dataset stream keeps one dataset unchanged when another's count changes.
        rng = np.random.default_rng([seed, ds_idx])
        dataset = project.create_dataset(name, ds_path=rel_path)
        for i, tag in enumerate(_split_tags(rng, count)):
            img, ann = _make_item(rng, meta, h, w, tag)
            dataset.add_item_np(f"img_{i:04d}.png", img, ann=ann)
    return dest


def demo_project_dir(cache_root=None) -> pathlib.Path:
    """Return the cached demo project, building it on first use.

    ``cache_root`` defaults to ``$UNET_CACHE_DIR`` or ``~/.cache/unet_app``. The
    project is built in a temporary sibling and renamed into place with its marker
    already inside, so the final path is either absent or complete, and
    concurrent callers can race safely.
    """
    root = pathlib.Path(cache_root or os.environ.get("UNET_CACHE_DIR") or "~/.cache/unet_app").expanduser()
    final = root / _CACHE_NAME
    if (final / _MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.tmp-", dir=root))
    try:
        build_demo_project(tmp, images_per_dataset=DEMO_IMAGES_PER_DATASET)
        (tmp / _MARKER).write_text("ok\n")
        for _ in range(2):
            try:
                os.rename(tmp, final)  # atomic; fails if final is a non-empty dir
                return final
            except OSError:
                if (final / _MARKER).is_file():
                    return final  # another process won the race: use theirs
                # Leftover without marker (not made by this code): clear it and retry once.
                shutil.rmtree(final, ignore_errors=True)
        raise RuntimeError(f"Could not move demo project into {str(final)!r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
