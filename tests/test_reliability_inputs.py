"""Hostile training inputs: each damaged or unusual project item is either handled correctly (the cached
image and mask are what the platform shows) or stopped with an error naming the file.

Cases already covered elsewhere (0-byte image, annotation of another size, unknown class, bad JSON) are
listed in RELIABILITY.md with their tests in tests/test_bad_input.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervisely as sly
from PIL import Image

from custom_net import sly_seg_dataset as data
from custom_net.reporting import Reporter
from custom_net.train import main
from tests.helpers import TINY_TRAIN_ARGS, fails

CLASSES = ["__bg__", "disk", "triangle", "box"]
HEIGHT, WIDTH = 48, 64  # the tiny project's image size: no resizing, so pixels compare exactly
ORIENTATION_ROTATE_90_CW = 6  # EXIF: display = stored image turned 90 degrees clockwise
OUTSIDE = (-4, 58, 10)  # bitmap top, left, side: sticks out over the top and right edges


def _rgb(path: Path) -> np.ndarray:
    """Independent reference decoder (PIL, not the engine's OpenCV path)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _rename_item(ds: Path, old: str, new: str) -> None:
    (ds / "img" / old).rename(ds / "img" / new)
    (ds / "ann" / f"{old}.json").rename(ds / "ann" / f"{new}.json")


def _make_hostile(clean: Path, root: Path) -> Path:
    """A copy of ``clean`` in which five items of ds_a are replaced by hostile variants of themselves."""
    project = shutil.copytree(clean, root / "hostile")
    ds = project / "ds_a"
    _rename_item(ds, "img_0000.png", "img_0000.jpg")  # PNG bytes under a .jpg name

    rgb = _rgb(ds / "img" / "img_0001.png")
    cv2.imwrite(str(ds / "img" / "img_0001.png"), (rgb[..., ::-1].astype(np.uint16) * 257))  # 16-bit RGB
    assert cv2.imread(str(ds / "img" / "img_0001.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16

    grey = cv2.cvtColor(_rgb(ds / "img" / "img_0002.png"), cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(ds / "img" / "img_0002.png"), grey)  # single-channel PNG

    # Stored turned 90 degrees counter-clockwise, with the EXIF tag that turns it back: the annotation is
    # for the displayed (upright) image, as on the platform.
    stored = np.rot90(_rgb(ds / "img" / "img_0003.png"), k=1)
    exif = Image.Exif()
    exif[0x0112] = ORIENTATION_ROTATE_90_CW
    Image.fromarray(np.ascontiguousarray(stored)).save(ds / "img" / "img_0003.jpg", exif=exif, quality=100,
                                                    subsampling=0)  # 4:4:4, so pixels stay close
    (ds / "img" / "img_0003.png").unlink()
    (ds / "ann" / "img_0003.png.json").rename(ds / "ann" / "img_0003.jpg.json")

    ann_path = ds / "ann" / "img_0004.png.json"
    ann = json.loads(ann_path.read_text())
    top, left, side = OUTSIDE
    disk = sly.ObjClass("disk", sly.Bitmap)
    ann["objects"].append(sly.Label(sly.Bitmap(np.ones((side, side), bool), origin=sly.PointLocation(top, left)),
                                    disk).to_json())
    ann_path.write_text(json.dumps(ann))
    return project


@pytest.fixture(scope="module")
def hostile_project(tiny_project, tmp_path_factory) -> Path:
    return _make_hostile(tiny_project, tmp_path_factory.mktemp("hostile"))


def _prepared(project_dir: Path, tmp_path: Path) -> dict:
    """{(dataset, item without extension): (image, mask)} decoded by the engine at full size."""
    project = data.open_project(project_dir)
    items = data.list_items(project)
    prepared = data.PreparedData(items, project.meta, CLASSES, HEIGHT, WIDTH, cache_dir=str(tmp_path), num_threads=2)
    try:
        return {(i.dataset_name, Path(i.item_name).stem): (np.array(prepared.images[k]), np.array(prepared.masks[k]))
                for k, i in enumerate(prepared.items)}
    finally:
        prepared.close()


@pytest.fixture(scope="module")
def decoded(tiny_project, hostile_project, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return _prepared(tiny_project, cache), _prepared(hostile_project, cache)


def _item(name: str) -> tuple[str, str]:
    return ("ds_a", name)


def test_png_named_jpg_is_read_by_content(decoded):
    clean, hostile = decoded
    for a, b in zip(clean[_item("img_0000")], hostile[_item("img_0000")]):
        np.testing.assert_array_equal(a, b)


def test_16bit_png_becomes_its_8bit_image(decoded):
    clean, hostile = decoded
    for a, b in zip(clean[_item("img_0001")], hostile[_item("img_0001")]):
        np.testing.assert_array_equal(a, b)


def test_greyscale_png_is_replicated_to_rgb(decoded, tiny_project):
    clean, hostile = decoded
    image, mask = hostile[_item("img_0002")]
    grey = cv2.cvtColor(_rgb(tiny_project / "ds_a" / "img" / "img_0002.png"), cv2.COLOR_RGB2GRAY)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)
    np.testing.assert_array_equal(mask, clean[_item("img_0002")][1])


def test_exif_rotated_jpeg_is_upright_and_matches_its_mask(decoded):
    clean, hostile = decoded
    (image, mask), (clean_image, clean_mask) = hostile[_item("img_0003")], clean[_item("img_0003")]
    assert image.shape == clean_image.shape  # not the stored, turned shape
    np.testing.assert_array_equal(mask, clean_mask)
    error = np.abs(image.astype(int) - clean_image.astype(int)).mean()
    upside_down = np.abs(np.rot90(image, k=2).astype(int) - clean_image.astype(int)).mean()  # a wrong turn
    assert error < 3 < upside_down, (error, upside_down)


def test_exif_rotated_jpeg_with_annotation_of_stored_size_names_both(tmp_path, hostile_project):
    project = shutil.copytree(hostile_project, tmp_path / "project")
    ann = project / "ds_a" / "ann" / "img_0003.jpg.json"
    value = json.loads(ann.read_text())
    value["size"] = {"height": WIDTH, "width": HEIGHT}  # the stored, not the displayed, orientation
    ann.write_text(json.dumps(value))
    fails(tmp_path, ["--project-dir", str(project)], data.DataError, str(ann), f"{HEIGHT}x{WIDTH} image",
          str(project / "ds_a" / "img" / "img_0003.jpg"), f"is {WIDTH}x{HEIGHT}")


def test_bitmap_partly_outside_the_image_is_clipped(decoded):
    clean, hostile = decoded
    top, left, side = OUTSIDE
    expected = clean[_item("img_0004")][1].copy()
    expected[max(top, 0):top + side, left:min(left + side, WIDTH)] = CLASSES.index("disk")  # painted last: on top
    np.testing.assert_array_equal(hostile[_item("img_0004")][1], expected)


def test_duplicate_item_names_across_datasets_stay_distinct(decoded, hostile_project, tmp_path):
    _, hostile = decoded
    assert len(hostile) == 12
    same_name = [hostile[(ds, "img_0000")][0] for ds in ("ds_a", "ds_b", "ds_b/ds_nested")]
    assert not np.array_equal(same_name[1], same_name[2])  # each dataset's own image, not one of them thrice
    # A whole run on the hostile project: trains, and its split files tell the duplicates apart.
    out = tmp_path / "run"
    summary = main(["--project-dir", str(hostile_project), *TINY_TRAIN_ARGS, "--input-height", "32",
                    "--input-width", "32", "--epochs", "1", "--amp", "off", "--no-eval", "--output", str(out)],
                   reporter=Reporter())
    assert summary["status"] == "finished"
    keys = [(e["dataset_name"], e["item_name"])
            for split in ("train_set", "val_set") for e in json.loads((out / "info" / f"{split}.json").read_text())]
    assert len(set(keys)) == 12
    assert {k for k in keys if k[1] == "img_0000.png"} == {("ds_b", "img_0000.png"), ("ds_b/ds_nested", "img_0000.png")}


@pytest.mark.parametrize("which", ["annotation", "meta.json"])
def test_non_utf8_json_names_the_file(tiny_project, tmp_path, which):
    project = shutil.copytree(tiny_project, tmp_path / "project")
    path = project / ("ds_a/ann/img_0001.png.json" if which == "annotation" else "meta.json")
    value = json.loads(path.read_text(encoding="utf-8"))
    value["description"] = "Ölflecken auf Zitronen"  # written as Latin-1 below: not UTF-8
    path.write_bytes(json.dumps(value, ensure_ascii=False).encode("latin-1"))
    reason = "unreadable JSON" if which == "annotation" else "not valid JSON"
    message = fails(tmp_path, ["--project-dir", str(project)], data.DataError, str(path), reason)
    assert "utf-8" in message
