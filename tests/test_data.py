"""Data pipeline: rasterisation, the prepared-data cache, image reading, splits, augmentations, sampling."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import cv2
import numpy as np
import pytest
import supervisely as sly
import torch
from PIL import Image
from torch.utils.data import DataLoader

from custom_net import augs
from custom_net import sly_seg_dataset as data
from custom_net.preprocessing import ImageReadError, read_image_rgb, resize_image, resize_mask

# imgaug's JpegCompression goes through a deprecated imageio call: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:imgaug.*", "ignore::DeprecationWarning:imageio.*")

# ---- helpers -------------------------------------------------------------------------------------


def _items_and_meta(project_dir):
    project = data.open_project(project_dir)
    return data.list_items(project), project.meta


def _paint(ann: sly.Annotation, class_to_index: dict[str, int]) -> np.ndarray:
    """Reference painting of bitmap labels, in list order, written independently of ``rasterize``."""
    expected = np.zeros(ann.img_size, np.uint8)
    for label in ann.labels:
        g = label.geometry
        r, c = g.origin.row, g.origin.col
        h, w = g.data.shape
        assert 0 <= r and 0 <= c and r + h <= ann.img_size[0] and c + w <= ann.img_size[1], "label outside image"
        full = np.zeros(ann.img_size, bool)
        full[r:r + h, c:c + w] = g.data
        expected[full] = class_to_index[label.obj_class.name]
    return expected


# ---- opening projects -----------------------------------------------------------------------------


def test_open_project_lists_every_item(tiny_project, tmp_path):
    # Under a folder named "datasets" the SDK would misread the nested dataset: opened through a link.
    copy = shutil.copytree(tiny_project, tmp_path / "datasets" / "project")
    for project_dir in (tiny_project, copy):
        items, _ = _items_and_meta(project_dir)
        counts = Counter(i.dataset_name for i in items)
        assert counts == {"ds_a": 6, "ds_b": 4, "ds_b/ds_nested": 2}, project_dir
        for item in items:
            assert item.image_path.endswith(item.item_name) and item.ann_path.endswith(item.item_name + ".json")


# ---- rasterize: the real lemons export ----------------------------------------------------------


@pytest.mark.parametrize("classes", [["kiwi", "lemon"], ["lemon", "kiwi"]])
def test_rasterize_lemons_pixel_counts(lemons_dir, classes):
    items, meta = _items_and_meta(lemons_dir)
    assert len(items) == 6
    model_classes = data.build_model_classes(meta, classes)
    names = [c.name for c in model_classes]
    assert names == ["__bg__", *classes]  # __bg__ is 0, then --classes order
    class_to_index = {n: i for i, n in enumerate(names)}
    overlapping_items = 0
    for item in items:
        ann = data.load_annotation(item, meta)
        assert ann.img_size == (800, 1067)
        skipped = Counter()
        mask = data.rasterize(ann, class_to_index, skipped)
        assert mask.shape == (800, 1067) and mask.dtype == np.uint8 and not skipped
        counts = np.bincount(mask.ravel(), minlength=3)
        assert len(counts) == 3, f"{item.item_name}: values outside 0..2"

        painted = _paint(ann, class_to_index)
        layered = sum(_paint(sly.Annotation(ann.img_size, [lb]), class_to_index) > 0 for lb in ann.labels)
        if layered.max() <= 1:  # no overlaps: counts are plain sums of the bitmaps
            expected = np.zeros(3, np.int64)
            for label in ann.labels:
                expected[class_to_index[label.obj_class.name]] += int(label.geometry.data.sum())
            expected[0] = mask.size - expected[1:].sum()
        else:  # overlaps: the later label wins
            overlapping_items += 1
            expected = np.bincount(painted.ravel(), minlength=3)
        np.testing.assert_array_equal(counts, expected, err_msg=item.item_name)
        np.testing.assert_array_equal(mask, painted, err_msg=item.item_name)
        for name in classes:  # every lemons image has both fruits
            assert counts[class_to_index[name]] > 1000, (item.item_name, name)
    assert overlapping_items >= 1  # IMG_3861 has overlapping labels: the order rule is exercised


def test_rasterize_lemons_unselected_class_is_background(lemons_dir):
    items, meta = _items_and_meta(lemons_dir)
    ann = data.load_annotation(items[0], meta)
    both = data.rasterize(ann, {"__bg__": 0, "kiwi": 1, "lemon": 2})
    lemon_only = data.rasterize(ann, {"__bg__": 0, "lemon": 1})
    np.testing.assert_array_equal(lemon_only, np.where(both == 2, 1, 0))


# ---- rasterize: hand-made geometries -------------------------------------------------------------

CLASSES = {
    "poly": sly.ObjClass("poly", sly.Polygon),
    "rect": sly.ObjClass("rect", sly.Rectangle),
    "alpha": sly.ObjClass("alpha", sly.AlphaMask),
    "bmp": sly.ObjClass("bmp", sly.Bitmap),
    "pt": sly.ObjClass("pt", sly.Point),
    "line": sly.ObjClass("line", sly.Polyline),
}
INDEX = {"__bg__": 0, "poly": 1, "rect": 2, "alpha": 3, "bmp": 4, "pt": 5, "line": 6}


def _ann(size, *labels):
    return sly.Annotation(size, labels=[sly.Label(g, CLASSES[name]) for name, g in labels])


def test_rasterize_rectangle_inclusive_corners():
    mask = data.rasterize(_ann((10, 12), ("rect", sly.Rectangle(2, 3, 5, 8))), INDEX)
    expected = np.zeros((10, 12), np.uint8)
    expected[2:6, 3:9] = 2  # top/left/bottom/right are all inclusive
    np.testing.assert_array_equal(mask, expected)


def test_rasterize_polygon_with_hole():
    square = [sly.PointLocation(r, c) for r, c in ((1, 1), (1, 10), (10, 10), (10, 1))]
    hole = [sly.PointLocation(r, c) for r, c in ((4, 4), (4, 7), (7, 7), (7, 4))]
    mask = data.rasterize(_ann((12, 12), ("poly", sly.Polygon(square, interior=[hole]))), INDEX)
    assert mask[1, 1] == mask[10, 10] == mask[2, 5] == 1
    assert mask[0, 0] == mask[11, 11] == 0
    assert mask[5, 5] == 0  # the hole is not the class
    assert set(np.unique(mask)) == {0, 1}
    assert (mask == 1).sum() == 10 * 10 - (mask[4:8, 4:8] == 0).sum()


def test_rasterize_alpha_mask_threshold():
    alpha = np.array([[0, 127, 128, 255], [1, 126, 200, 127]], np.uint8)
    mask = data.rasterize(_ann((4, 6), ("alpha", sly.AlphaMask(alpha, origin=sly.PointLocation(1, 2)))), INDEX)
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 2:6][alpha > 127] = 3
    np.testing.assert_array_equal(mask, expected)
    assert (mask == 3).sum() == 3  # 128, 255, 200: 127 itself is not "more than half opaque"


def test_rasterize_bitmap_partly_outside_is_clipped():
    block = np.ones((6, 6), bool)
    labels = [("bmp", sly.Bitmap(block, origin=sly.PointLocation(-2, -3))),  # sticks out top-left
              ("bmp", sly.Bitmap(block, origin=sly.PointLocation(7, 8)))]  # sticks out bottom-right
    mask = data.rasterize(_ann((10, 10), *labels), INDEX)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:4, 0:3] = 4
    expected[7:10, 8:10] = 4
    np.testing.assert_array_equal(mask, expected)
    fully_outside = sly.Bitmap(block, origin=sly.PointLocation(20, 20))
    assert not data.rasterize(_ann((10, 10), ("bmp", fully_outside)), INDEX).any()


def test_rasterize_later_label_wins():
    rect = sly.Rectangle(0, 0, 5, 5)
    bmp = sly.Bitmap(np.ones((4, 4), bool), origin=sly.PointLocation(3, 3))
    first = data.rasterize(_ann((8, 8), ("rect", rect), ("bmp", bmp)), INDEX)
    assert first[4, 4] == 4 and first[0, 0] == 2 and first[6, 6] == 4 and first[7, 7] == 0
    assert (first == 2).sum() == 36 - 9 and (first == 4).sum() == 16
    second = data.rasterize(_ann((8, 8), ("bmp", bmp), ("rect", rect)), INDEX)
    assert second[4, 4] == 2 and (second == 2).sum() == 36 and (second == 4).sum() == 16 - 9


def test_rasterize_skips_and_counts_non_area_geometries():
    labels = [("pt", sly.Point(2, 2)), ("pt", sly.Point(3, 3)),
              ("line", sly.Polyline([sly.PointLocation(0, 0), sly.PointLocation(7, 7)])),
              ("rect", sly.Rectangle(6, 6, 7, 7))]
    skipped = Counter()
    mask = data.rasterize(_ann((8, 8), *labels), INDEX, skipped)
    assert skipped == Counter({"pt (point)": 2, "line (line)": 1})
    assert (mask == 2).sum() == 4 and set(np.unique(mask)) == {0, 2}  # only the rectangle is drawn
    assert data.rasterize(_ann((8, 8), *labels), INDEX).sum() == 8  # no counter: skipped silently


# ---- PreparedData: the cache ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["lemons", "tiny"])
def test_prepared_data_matches_fresh_rasterize(request, tmp_path, source):
    project_dir = request.getfixturevalue("lemons_dir" if source == "lemons" else "tiny_project")
    items, meta = _items_and_meta(project_dir)
    names = [c.name for c in data.build_model_classes(meta, None)]
    index = {n: i for i, n in enumerate(names)}
    height, width = 96, 128  # not square: catches swapped axes
    prepared = data.PreparedData(items, meta, names, height, width, cache_dir=str(tmp_path), num_threads=2)
    try:
        assert prepared.images.shape == (len(items), height, width, 3)
        assert prepared.masks.shape == (len(items), height, width)
        full_counts = np.zeros(len(names), np.int64)
        for i, item in enumerate(items):
            ann = data.load_annotation(item, meta)
            mask = data.rasterize(ann, index)
            full_counts += np.bincount(mask.ravel(), minlength=len(names))
            assert prepared.masks[i].tobytes() == resize_mask(mask, height, width).tobytes(), item.item_name
            image = resize_image(read_image_rgb(item.image_path), height, width)
            assert prepared.images[i].tobytes() == image.tobytes(), item.item_name
        np.testing.assert_array_equal(prepared.pixel_counts, full_counts)
        assert all(full_counts > 0)
        assert len(list(tmp_path.iterdir())) == 1  # the cache lives in cache_dir...
    finally:
        prepared.close()
    assert not list(tmp_path.iterdir())  # ...and close() removes it


def test_prepared_data_reports_every_bad_item_and_cleans_up(tiny_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    (project / "ds_a" / "img" / "img_0001.png").write_bytes(b"")
    (project / "ds_b" / "img" / "img_0000.png").write_bytes(b"\x89PNG garbage")
    items, meta = _items_and_meta(project)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(data.DataError) as info:
        data.PreparedData(items, meta, ["__bg__", "disk"], 64, 64, cache_dir=str(cache))
    message = str(info.value)
    assert message.startswith("2 item(s) cannot be used")
    assert "ds_a/img/img_0001.png: empty file" in message
    assert "ds_b/img/img_0000.png: not a readable image" in message
    assert not list(cache.iterdir())  # no cache left behind by a failed preparation


# ---- image reading --------------------------------------------------------------------------------


def test_read_grey_png(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    image = read_image_rgb(tmp_path / "g.png")
    assert image.shape == (12, 10, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], grey)


def test_read_rgba_png_drops_alpha_keeps_rgb(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 30, 77  # R, G, B, A
    rgba[0, 0] = (1, 2, 3, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image_rgb(tmp_path / "a.png")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[1:, 1:], np.broadcast_to([200, 100, 30], (5, 7, 3)))
    assert image[0, 0].tolist() == [1, 2, 3]  # colour kept even where fully transparent


def test_read_16bit_png(tmp_path):
    grey16 = np.array([[0, 255, 256, 65535]], np.uint16).repeat(3, axis=0)
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    image = read_image_rgb(tmp_path / "g16.png")
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8
    assert image[0, :, 0].tolist() == [0, 0, 1, 255]  # the high byte
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 0xFF00, 0x8000, 0x0100  # R, G, B
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    image = read_image_rgb(tmp_path / "c16.png")
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert image[1, 2].tolist() == [0xFF, 0x80, 0x01]


def test_read_exif_rotated_jpeg(tmp_path):
    stored = np.full((20, 40, 3), 255, np.uint8)  # 40 wide, 20 high as stored
    stored[:8, :8] = (0, 0, 0)  # dark block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = read_image_rgb(tmp_path / "r.jpg")
    assert image.shape == (40, 20, 3)  # displayed: 20 wide, 40 high
    assert image[:8, -8:].mean() < 60  # clockwise: the stored top-left is now top-right
    assert image[:8, :8].mean() > 200 and image[-8:, -8:].mean() > 200


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"GIF89a not really" * 20, "not a readable image")])
def test_read_bad_image_names_path(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image_rgb(path)
    assert str(path) in str(info.value)


# ---- splits ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_items(tiny_project):
    return _items_and_meta(tiny_project)


def _keys(items):
    return [(i.dataset_name, i.item_name) for i in items]


@pytest.mark.parametrize("val_percent, n_val", [(25, 3), (50, 6), (10, 1), (1, 1)])
def test_split_random(tiny_items, val_percent, n_val):
    items, _ = tiny_items
    assert len(items) == 12
    train, val = data.split_random(items, val_percent, seed=7)
    assert (len(train), len(val)) == (12 - n_val, n_val)
    assert not set(_keys(train)) & set(_keys(val))
    assert sorted(_keys(train) + _keys(val)) == sorted(_keys(items))
    again = data.split_random(items, val_percent, seed=7)
    assert (_keys(again[0]), _keys(again[1])) == (_keys(train), _keys(val))  # deterministic per seed
    others = {tuple(_keys(data.split_random(items, val_percent, seed=s)[1])) for s in range(10)}
    assert len(others) > 1  # the seed matters


def test_split_by_datasets(tiny_items):
    items, _ = tiny_items
    train, val = data.split_by_datasets(items, ["ds_a", "ds_b"], ["ds_b/ds_nested"])
    assert {i.dataset_name for i in train} == {"ds_a", "ds_b"} and len(train) == 10
    assert {i.dataset_name for i in val} == {"ds_b/ds_nested"} and len(val) == 2
    with pytest.raises(data.DataError, match=r"unknown dataset 'ds_c'.*ds_a, ds_b, ds_b/ds_nested"):
        data.split_by_datasets(items, ["ds_a"], ["ds_c"])


def _tags_on_disk(item):
    return {t["name"] for t in json.loads(open(item.ann_path, encoding="utf-8").read())["tags"]}


def test_split_by_tags(tiny_items):
    items, meta = tiny_items
    train, val = data.split_by_tags(items, meta, "train", "val")
    assert _keys(train) == _keys([i for i in items if _tags_on_disk(i) == {"train"}])
    assert _keys(val) == _keys([i for i in items if _tags_on_disk(i) == {"val"}])
    assert len(train) + len(val) == 12 and train and val
    swapped = data.split_by_tags(items, meta, "val", "train")
    assert (_keys(swapped[0]), _keys(swapped[1])) == (_keys(val), _keys(train))


def test_split_by_tags_untagged(tiny_project, tmp_path):
    project = shutil.copytree(tiny_project, tmp_path / "project")
    items, meta = _items_and_meta(project)
    ann_path = project / "ds_a" / "ann" / "img_0000.png.json"
    ann = json.loads(ann_path.read_text())
    ann["tags"] = []
    ann_path.write_text(json.dumps(ann))
    untagged = ("ds_a", "img_0000.png")
    ignored = data.split_by_tags(items, meta, "train", "val", "ignore")
    assert untagged not in _keys(ignored[0]) + _keys(ignored[1]) and len(ignored[0] + ignored[1]) == 11
    as_train = data.split_by_tags(items, meta, "train", "val", "train")
    assert untagged in _keys(as_train[0]) and len(as_train[1]) == len(ignored[1])
    as_val = data.split_by_tags(items, meta, "train", "val", "val")
    assert untagged in _keys(as_val[1]) and len(as_val[0]) == len(ignored[0])


def test_split_from_files_round_trip(tiny_items, tmp_path):
    items, _ = tiny_items
    train, val = data.split_random(items, 30, seed=3)
    # The run writes info/train_set.json like this; --split files must read it back as the same split.
    (tmp_path / "train_set.json").write_text(json.dumps([i.key for i in train]))
    (tmp_path / "val_set.json").write_text(json.dumps([i.key for i in val]))
    again = data.split_from_files(items, str(tmp_path / "train_set.json"), str(tmp_path / "val_set.json"))
    assert again == (train, val)
    (tmp_path / "bad.json").write_text(json.dumps([{"dataset_name": "ds_a", "item_name": "nope.png"}]))
    with pytest.raises(data.DataError, match=r"bad.json: 1 item\(s\) not in the project, e.g. ds_a/nope.png"):
        data.split_from_files(items, str(tmp_path / "bad.json"), str(tmp_path / "val_set.json"))
    (tmp_path / "wrong.json").write_text(json.dumps({"train": []}))
    with pytest.raises(data.DataError, match=r"wrong.json: expected a JSON list"):
        data.split_from_files(items, str(tmp_path / "wrong.json"), str(tmp_path / "val_set.json"))


def test_empty_splits_say_which_set(tiny_items, tmp_path):
    items, meta = tiny_items
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    full = tmp_path / "full.json"
    full.write_text(json.dumps([i.key for i in items]))
    cases = [
        (lambda: data.split_random(items[:1], 20, 0), "random split of 1 item(s) at 20%: the validation set"),
        (lambda: data.split_random(items[:2], 99, 0), "random split of 2 item(s) at 99%: the training set"),
        (lambda: data.split_by_datasets(items, [], ["ds_a"]), "split by datasets: the training set"),
        (lambda: data.split_by_tags(items, meta, "train", "nope"), "split by tags 'train' / 'nope': the validation set"),
        (lambda: data.split_by_tags(items, meta, "nope", "val"), "split by tags 'nope' / 'val': the training set"),
        (lambda: data.split_from_files(items, str(empty), str(full)), "split from files: the training set"),
        (lambda: data.split_from_files(items, str(full), str(empty)), "split from files: the validation set"),
    ]
    for call, message in cases:
        with pytest.raises(data.DataError) as info:
            call()
        assert str(info.value) == f"{message} is empty"
    for bad in (0, 100, -5):
        with pytest.raises(data.DataError, match="--val-percent must be between 0 and 100"):
            data.split_random(items, bad, 0)


# ---- augmentations --------------------------------------------------------------------------------


def _sample(size=64):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[8:30, 10:40] = 1
    mask[35:60, 20:50] = 2
    return image, mask


def test_templates_are_the_reference_configs(reference_augs):
    templates = augs.list_templates()
    assert len(reference_augs) == 5
    assert sorted(templates) == sorted(p.stem for p in reference_augs)
    for ref in reference_augs:
        assert json.loads(templates[ref.stem].read_text()) == json.loads(ref.read_text()), ref.name
        assert augs.load_augs_config(ref.stem) == json.loads(ref.read_text())  # by template name too


def test_reference_augs_apply(reference_augs):
    image, mask = _sample()
    classes = set(np.unique(mask).tolist())
    for path in reference_augs:
        config = augs.load_augs_config(path)
        augmenter = augs.build_augmenter(config)
        outputs = []
        for seed in range(20):
            out_image, out_mask = augs.augment(augmenter, image, mask, seed)
            assert out_image.shape == image.shape and out_image.dtype == np.uint8, path.name
            assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8, path.name
            assert set(np.unique(out_mask).tolist()) <= classes, path.name
            outputs.append((out_image.tobytes(), out_mask.tobytes()))
        # The output depends on the seed alone: not on the augmenter's history (a fresh one, seeds in reverse).
        fresh = augs.build_augmenter(config)
        for seed in reversed(range(20)):
            again = augs.augment(fresh, image, mask, seed)
            assert (again[0].tobytes(), again[1].tobytes()) == outputs[seed], f"{path.name}, seed {seed}"
        assert len(set(outputs)) > 1, f"{path.name}: 20 seeds gave identical output"
        assert np.array_equal(image, _sample()[0]) and np.array_equal(mask, _sample()[1])  # inputs untouched


def test_augs_to_python_execs(reference_augs):
    for path in reference_augs:
        config = augs.load_augs_config(path)
        code = augs.augs_to_python(config)
        namespace = {}
        exec(compile(code, str(path), "exec"), namespace)  # imgaug already patched by custom_net.augs
        seq = namespace["seq"]
        assert isinstance(seq, augs.iaa.Sequential), path.name
        assert len(seq) == len(config["pipeline"]), path.name
        built = augs.build_augmenter(config)
        assert [type(a).__name__ for a in seq] == [type(a).__name__ for a in built], path.name
        image, mask = _sample()
        for seed in (11, 12, 13):  # the preview is the same pipeline: same seed, same output
            for got, expected in zip(augs.augment(seq, image, mask, seed), augs.augment(built, image, mask, seed)):
                np.testing.assert_array_equal(got, expected, err_msg=f"{path.name}, seed {seed}")


def test_bad_augs_configs(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(augs.AugsConfigError, match="bad.json is not valid JSON"):
        augs.load_augs_config(bad_json)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"pipeline": [{"category": "flip", "name": "Flipper", "params": {}}]}))
    with pytest.raises(augs.AugsConfigError, match=r"pipeline\[0\] names unknown augmenter iaa.flip.Flipper"):
        augs.load_augs_config(unknown)
    bad_param = tmp_path / "param.json"
    bad_param.write_text(json.dumps({"pipeline": [{"category": "flip", "name": "Fliplr", "params": {"q": 1}}]}))
    with pytest.raises(augs.AugsConfigError, match="param.json: cannot build the pipeline"):
        augs.load_augs_config(bad_param)
    with pytest.raises(augs.AugsConfigError, match=r"missing.json not found \(templates: seg_simple,"):
        augs.load_augs_config(tmp_path / "missing.json")


# ---- SlySegDataset + EpochSampler -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_prepared(tiny_items):
    items, meta = tiny_items
    names = [c.name for c in data.build_model_classes(meta, None)]
    prepared = data.PreparedData(items, meta, names, 64, 64, num_threads=2)
    yield prepared
    prepared.close()


AUGS = "seg_simple_rotate_crop_flipLR_flipUD"


def _epoch_batches(prepared, seed, epoch, augs_config=None, num_workers=0):
    dataset = data.SlySegDataset(prepared, augs_config, seed=seed)
    sampler = data.EpochSampler(len(dataset), seed, shuffle=True)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=num_workers, collate_fn=data.collate_batch)
    return list(sampler), [(images.clone(), masks.clone()) for images, masks in loader]


def test_epoch_sampler_order():
    sampler = data.EpochSampler(10, seed=3, shuffle=True)
    orders = {}
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert sorted(keys) == list(range(epoch * 10, epoch * 10 + 10))  # a permutation, tagged by epoch
        orders[epoch] = [k - epoch * 10 for k in keys]
        again = data.EpochSampler(10, seed=3, shuffle=True)
        again.set_epoch(epoch)
        assert list(again) == keys
    assert len({tuple(o) for o in orders.values()}) == 3  # each epoch its own order
    plain = data.EpochSampler(10, seed=3, shuffle=False)
    plain.set_epoch(2)
    assert list(plain) == list(range(20, 30))


def test_dataset_batches_repeat_per_seed_and_epoch(tiny_prepared):
    config = augs.load_augs_config(AUGS)
    order, batches = _epoch_batches(tiny_prepared, 5, 1, config)
    order_again, batches_again = _epoch_batches(tiny_prepared, 5, 1, config)
    assert order == order_again and len(batches) == 3
    for (i1, m1), (i2, m2) in zip(batches, batches_again):
        assert i1.shape == (4, 64, 64, 3) and i1.dtype == torch.uint8
        assert m1.shape == (4, 64, 64) and m1.dtype == torch.uint8
        assert torch.equal(i1, i2) and torch.equal(m1, m2)
    order_next, batches_next = _epoch_batches(tiny_prepared, 5, 2, config)
    assert [k % 12 for k in order_next] != [k % 12 for k in order]  # another epoch, another order
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, batches_next))


def test_dataset_without_augs_returns_cache(tiny_prepared):
    dataset = data.SlySegDataset(tiny_prepared)
    for key in (0, 7, 12 * 3 + 7):  # any epoch: the same cached sample
        image, mask = dataset[key]
        index = key % 12
        assert torch.equal(image, torch.from_numpy(np.asarray(tiny_prepared.images[index])))
        assert torch.equal(mask, torch.from_numpy(np.asarray(tiny_prepared.masks[index])))


def test_dataset_augmentation_independent_of_workers(tiny_prepared):
    config = augs.load_augs_config(AUGS)
    keys = [12 * 4 + i for i in range(12)]  # epoch 4, in index order

    def load(num_workers):
        dataset = data.SlySegDataset(tiny_prepared, config, seed=2)
        return list(DataLoader(dataset, batch_size=None, sampler=keys, num_workers=num_workers))

    expected, got = load(0), load(2)
    assert len(expected) == len(got) == len(keys)
    assert any(not torch.equal(img, torch.from_numpy(np.asarray(tiny_prepared.images[i])))
               for i, (img, _) in enumerate(expected))  # augmentation did something
    for k, ((img, mask), (exp_img, exp_mask)) in enumerate(zip(got, expected)):
        assert torch.equal(img, exp_img) and torch.equal(mask, exp_mask), f"sample {keys[k]}"
    dataset = data.SlySegDataset(tiny_prepared, config, seed=2)
    for k in (keys[0], keys[5]):  # plain indexing is the same too
        assert all(torch.equal(a, b) for a, b in zip(dataset[k], expected[k - keys[0]]))
    other_epoch = [dataset[12 * 5 + i] for i in range(12)]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(expected, other_epoch))


# ---- spatial augmentations see the detail of the image -----------------------------------------------

def _striped_project(folder, side: int):
    """One side x side image of 4-pixel black and white stripes (a rectangle label), as PNG."""
    project = sly.Project(str(folder), sly.OpenMode.CREATE)
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection([sly.ObjClass("stripe", sly.Rectangle)]))
    project.set_meta(meta)
    image = np.zeros((side, side, 3), np.uint8)
    image[:, (np.arange(side) // 4) % 2 == 0] = 255
    cv2.imwrite(str(folder / "striped.png"), image)
    label = sly.Label(sly.Rectangle(side // 4, side // 4, side - side // 4, side - side // 4), meta.get_obj_class("stripe"))
    project.create_dataset("ds").add_item_file("striped.png", str(folder / "striped.png"), ann=sly.Annotation((side, side), [label]))
    return image


ZOOM_2X = {"pipeline": [{"category": "size", "name": "Crop", "params": {"percent": 0.25, "keep_size": False}}],
           "random_order": False}


def test_a_zoomed_crop_keeps_the_sharpness_of_the_image(tmp_path):
    """The original app cropped the full-size image, then resized: a 2x zoom of 4-pixel stripes at a quarter of
    their size keeps full contrast. Cropping the training-size cache instead upsamples 1-pixel mush."""
    image = _striped_project(tmp_path / "p", 512)
    items, meta = _items_and_meta(tmp_path / "p")
    expected = resize_image(image[128:384, 128:384], 128, 128)  # crop at full size, then resize
    assert augs.is_spatial(ZOOM_2X) and data.detail_scale(items, 128, 128) == 2.0
    results = {}
    for scale in (1.0, data.detail_scale(items, 128, 128)):
        prepared = data.PreparedData(items, meta, ["__bg__", "stripe"], 128, 128, detail_scale=scale)
        try:
            sample, mask = data.SlySegDataset(prepared, ZOOM_2X)[0]
            results[scale] = sample.numpy()
            assert sample.shape == (128, 128, 3) and mask.shape == (128, 128)
            assert (mask.numpy() == 1).all()  # the crop lies inside the label
        finally:
            prepared.close()
    assert np.abs(results[2.0].astype(int) - expected).mean() < 2 and results[2.0].std() > 0.95 * expected.std()
    assert results[1.0].std() < 0.6 * expected.std()  # what augmenting the training-size cache gives


def test_detail_is_only_what_the_images_have(tmp_path):
    _striped_project(tmp_path / "small", 144)
    small, _ = _items_and_meta(tmp_path / "small")
    assert data.detail_scale(small, 128, 128) == 1.0  # 1.125x more detail is not worth a second cache
    _striped_project(tmp_path / "mid", 224)
    mid, _ = _items_and_meta(tmp_path / "mid")
    assert data.detail_scale(mid, 128, 128) == 1.75
    assert not augs.is_spatial(augs.load_augs_config("seg_simple"))
    assert augs.is_spatial(augs.load_augs_config("seg_simple_rotate"))
