import json
import re

import numpy as np
import pytest
import supervisely as sly

from custom_net import demo

EXPECTED = {"ds_a": 12, "ds_b": 8, "ds_b/ds_nested": 4}


@pytest.fixture(scope="module")
def project_path(tmp_path_factory):
    return demo.build_demo_project(tmp_path_factory.mktemp("demo") / "proj")


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_structure_and_meta(project_path):
    project = sly.Project(str(project_path), sly.OpenMode.READ)
    assert {ds.name: len(ds) for ds in project.datasets} == EXPECTED
    assert (project_path / "ds_b" / "datasets" / "ds_nested" / "img" / "img_0000.png").is_file()
    classes = {c.name: c.geometry_type for c in project.meta.obj_classes}
    assert classes == {"disk": sly.Bitmap, "triangle": sly.Polygon, "box": sly.Rectangle}
    assert len({tuple(c.color) for c in project.meta.obj_classes}) == 3
    for tag in ("train", "val"):
        assert project.meta.get_tag_meta(tag).value_type == sly.TagValueType.NONE


def test_annotations_consistent(project_path):
    project = sly.Project(str(project_path), sly.OpenMode.READ)
    area = {name: 0 for name in demo.DEMO_CLASSES}
    for ds in project.datasets:
        tags = set()
        for name in ds:
            img = sly.image.read(ds.get_img_path(name))
            ann = ds.get_ann(name, project.meta)
            assert img.shape == (128, 160, 3) and img.dtype == np.uint8
            assert ann.img_size == img.shape[:2]
            for label in ann.labels:
                assert isinstance(label.geometry, label.obj_class.geometry_type)
                area[label.obj_class.name] += label.area
            (tag,) = [t.name for t in ann.img_tags]
            tags.add(tag)
        assert tags == {"train", "val"}, ds.name  # every default dataset has >= 2 images
    assert all(a > 0 for a in area.values()), area


def test_deterministic(project_path, tmp_path):
    base = _files(project_path)
    same = _files(demo.build_demo_project(tmp_path / "same"))
    assert same == base  # byte-identical images and annotation files
    anns = [k for k in base if k.suffix == ".json" and k.parent.name == "ann"]
    assert len(anns) == sum(EXPECTED.values())
    assert all(json.loads(same[k]) == json.loads(base[k]) for k in anns)
    other = _files(demo.build_demo_project(tmp_path / "other", seed=1))
    assert other.keys() == base.keys() and other != base


def test_custom_counts_and_size(tmp_path):
    path = demo.build_demo_project(tmp_path / "p", images_per_dataset=(2, 1, 3), size=(64, 48))
    project = sly.Project(str(path), sly.OpenMode.READ)
    assert {ds.name: len(ds) for ds in project.datasets} == {"ds_a": 2, "ds_b": 1, "ds_b/ds_nested": 3}
    ds = project.datasets.get("ds_a")
    assert sly.image.read(ds.get_img_path("img_0000.png")).shape == (48, 64, 3)


def test_non_empty_dest_rejected(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        demo.build_demo_project(tmp_path)


def test_cache_builds_once(tmp_path, monkeypatch):
    first = demo.demo_project_dir(tmp_path)
    assert first == tmp_path / "demo_project_v2" and (first / ".complete").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo_project_v2"]  # temp folder cleaned up

    def _boom(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(demo, "build_demo_project", _boom)
    assert demo.demo_project_dir(tmp_path) == first
    monkeypatch.setenv("UNET_CACHE_DIR", str(tmp_path))
    assert demo.demo_project_dir() == first
    assert {ds.name for ds in sly.Project(str(first), sly.OpenMode.READ).datasets} == set(EXPECTED)


def test_cache_replaces_incomplete_leftover(tmp_path):
    leftover = tmp_path / "demo_project_v2"
    leftover.mkdir()
    (leftover / "half.txt").write_text("x")
    path = demo.demo_project_dir(tmp_path)
    assert (path / ".complete").is_file() and not (path / "half.txt").exists()
