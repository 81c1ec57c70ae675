"""Supervisely projects as semantic-segmentation training data.

Each item is decoded and rasterised once per run into a memory-mapped cache of images and
class-index masks at the training size; epochs then read and augment the cached arrays. With spatial
augmentations (crops, zooms, rotations) the training items are cached at up to twice that size as well:
the augmenters work on that detail and their output is resized to the training size, as the original app
augmented full-size images before resizing them.

Class ids: the model's classes in order; ``__bg__`` (pixels no selected label covers) is class 0 unless
the class list places it elsewhere (the original app put it last). Overlaps: labels are painted in the
order of the annotation's label list, so a label listed later (drawn on top on the platform) wins.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervisely as sly
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from custom_net import augs
from custom_net.preprocessing import ImageReadError, image_file_size, read_image_rgb, resize_image, resize_mask


BG_CLASS = "__bg__"
BG_COLOR = [0, 0, 0]
AREA_GEOMETRIES = (sly.Bitmap, sly.AlphaMask, sly.Polygon, sly.Rectangle)
ALPHA_THRESHOLD = 127  # AlphaMask pixels more than half opaque belong to the label
MAX_DETAIL_SCALE = 2.0  # spatial augmentations see at most this much more detail than the network
MAX_DETAIL_CACHE_BYTES = 8 * 2**30  # and their cache stays under this


class DataError(ValueError):
    """The project, an item or a class cannot be used for training; the message says which."""


@dataclass(frozen=True)
class Item:
    dataset_name: str
    item_name: str
    image_path: str
    ann_path: str

    @property
    def key(self) -> dict:
        return {"dataset_name": self.dataset_name, "item_name": self.item_name}


def open_project(project_dir: str | os.PathLike) -> sly.Project:
    path = Path(project_dir)
    if not path.is_dir():
        raise DataError(f"project folder {path} does not exist")
    if not (path / "meta.json").is_file():
        raise DataError(f"{path} is not a Supervisely project: meta.json is missing")
    try:
        json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path / 'meta.json'} is not valid JSON: {e}") from None
    try:
        project = sly.Project(str(_sdk_safe_path(path)), sly.OpenMode.READ)
    except Exception as e:  # the SDK raises RuntimeError / KeyError / FileNotFoundError
        _check_datasets_read(path, [])
        raise DataError(f"cannot open project {path}: {e}") from None
    _check_datasets_read(path, project.datasets)
    if project.total_items == 0:
        raise DataError(f"project {path} has no images")
    return project


def _check_datasets_read(path: Path, datasets) -> None:
    """The SDK skips a dataset folder it cannot read (e.g. an image without annotation) with only a
    log warning: training would silently lose its items. Raise the SDK's reason instead."""
    read = {Path(ds.directory).resolve() for ds in datasets}
    for img_dir in sorted(path.rglob("img")):
        ds_dir = img_dir.parent
        if img_dir.is_dir() and ds_dir.resolve() not in read:
            try:
                sly.Dataset(str(ds_dir), sly.OpenMode.READ)
            except Exception as e:
                raise DataError(f"dataset folder {ds_dir} cannot be read: {e}") from None


def _sdk_safe_path(path: Path) -> Path:
    """The SDK misnames datasets when a folder called 'datasets' is above the project
    (it takes that for the nested-dataset folder): open such projects through a symlink."""
    if "datasets" not in path.resolve().parts:
        return path
    link = Path(tempfile.mkdtemp(prefix="unet_project_")) / "project"
    link.symlink_to(path.resolve(), target_is_directory=True)
    return link


def list_items(project: sly.Project) -> list[Item]:
    items = []
    for dataset in project.datasets:
        for name in sorted(dataset.get_items_names()):
            items.append(Item(dataset.name, name, dataset.get_img_path(name), dataset.get_ann_path(name)))
    if not items:
        raise DataError(f"project {project.directory} has no images")
    return items


def has_area(obj_class: sly.ObjClass) -> bool:
    return issubclass(obj_class.geometry_type, AREA_GEOMETRIES) or obj_class.geometry_type is sly.AnyGeometry


def build_model_classes(meta: sly.ProjectMeta, class_names: list[str] | None) -> list[sly.ObjClass]:
    """The model's classes, index = class id: the selected classes (all classes with area when None) with
    ``__bg__`` first, or where ``class_names`` lists it. Every class is a bitmap, as the model predicts
    masks (and as the original app's segmentation project had them: its Serve UNet makes a Bitmap label
    of each)."""
    if class_names is None:
        selected = [c for c in meta.obj_classes if has_area(c) and c.name != BG_CLASS]
    else:
        if len(set(class_names)) != len(class_names):
            raise DataError(f"--classes lists a class twice: {class_names}")
        selected = []
        for name in class_names:
            if name == BG_CLASS:
                continue
            obj_class = meta.obj_classes.get(name)
            if obj_class is None:
                known = ", ".join(c.name for c in meta.obj_classes) or "none"
                raise DataError(f"unknown class {name!r} (--classes); the project has: {known}")
            if not has_area(obj_class):
                raise DataError(
                    f"class {name!r} has shape {obj_class.geometry_type.geometry_name()}, which has no area; "
                    "only bitmap, alpha mask, polygon and rectangle classes can be segmented"
                )
            selected.append(obj_class)
    if not selected:
        raise DataError("no classes with area to train on (bitmap, alpha mask, polygon or rectangle)")
    background = meta.obj_classes.get(BG_CLASS) or sly.ObjClass(BG_CLASS, sly.Bitmap, color=BG_COLOR)
    position = class_names.index(BG_CLASS) if class_names and BG_CLASS in class_names else 0
    selected.insert(position, background)
    return [c if c.geometry_type is sly.Bitmap else c.clone(geometry_type=sly.Bitmap) for c in selected]


def background_index(class_names: list[str]) -> int | None:
    """The class id of ``__bg__`` (None for a class list without it)."""
    return class_names.index(BG_CLASS) if BG_CLASS in class_names else None


def load_annotation(item: Item, meta: sly.ProjectMeta) -> sly.Annotation:
    try:
        data = json.loads(Path(item.ann_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation {item.ann_path}: unreadable JSON ({e})") from None
    for label in data.get("objects", []) if isinstance(data, dict) else []:
        title = label.get("classTitle")
        if title is not None and meta.obj_classes.get(title) is None:
            raise DataError(f"annotation {item.ann_path}: class {title!r} is not in the project's meta.json")
    try:
        return sly.Annotation.from_json(data, meta)
    except Exception as e:
        raise DataError(f"annotation {item.ann_path}: invalid ({type(e).__name__}: {e})") from None


def _paint_clipped(mask: np.ndarray, top: int, left: int, region: np.ndarray, value: int) -> None:
    """mask[top:, left:][region] = value, clipped to the mask (labels may stick out of the image)."""
    height, width = mask.shape
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + region.shape[0], height), min(left + region.shape[1], width)
    if r0 < r1 and c0 < c1:
        mask[r0:r1, c0:c1][region[r0 - top : r1 - top, c0 - left : c1 - left]] = value


def rasterize(ann: sly.Annotation, class_to_index: dict[str, int], skipped: Counter | None = None) -> np.ndarray:
    """Class-index mask (H, W) uint8 of the annotation; pixels of no selected class are ``__bg__``."""
    mask = np.full(ann.img_size, class_to_index.get(BG_CLASS, 0), dtype=np.uint8)
    for label in ann.labels:
        index = class_to_index.get(label.obj_class.name)
        if index is None:
            continue
        geometry = label.geometry
        if isinstance(geometry, sly.AlphaMask):
            _paint_clipped(mask, geometry.origin.row, geometry.origin.col, geometry.data > ALPHA_THRESHOLD, index)
        elif isinstance(geometry, sly.Bitmap):
            _paint_clipped(mask, geometry.origin.row, geometry.origin.col, geometry.data, index)
        elif isinstance(geometry, sly.Rectangle):
            region = np.ones((geometry.height, geometry.width), dtype=bool)
            _paint_clipped(mask, geometry.top, geometry.left, region, index)
        elif isinstance(geometry, sly.Polygon):
            geometry.draw(mask, index)  # cv2.fillPoly clips and handles holes
        elif skipped is not None:
            skipped[f"{label.obj_class.name} ({geometry.geometry_name()})"] += 1
    return mask


def load_item(item: Item, meta: sly.ProjectMeta, class_to_index: dict[str, int], skipped: Counter | None = None):
    """Full-size RGB image and class-index mask of one item, checked against each other."""
    try:
        image = read_image_rgb(item.image_path)
    except ImageReadError as e:  # its message names the file
        raise DataError(f"image {e}") from None
    except OSError as e:
        raise DataError(f"image {item.image_path}: {e}") from None
    ann = load_annotation(item, meta)
    if tuple(ann.img_size) != image.shape[:2]:
        raise DataError(
            f"annotation {item.ann_path} is for a {ann.img_size[1]}x{ann.img_size[0]} image, "
            f"but {item.image_path} is {image.shape[1]}x{image.shape[0]}"
        )
    return image, rasterize(ann, class_to_index, skipped)


def detail_scale(items: list[Item], height: int, width: int) -> float:
    """How much larger than the training size to cache ``items`` for spatial augmentations: as much as the
    typical (median) image has, up to MAX_DETAIL_SCALE and MAX_DETAIL_CACHE_BYTES; 1 = no larger cache.
    Reads only the image headers."""
    ratios = sorted(min(size[0] / height, size[1] / width)
                    for size in (image_file_size(item.image_path) for item in items) if size is not None)
    if not ratios:
        return 1.0
    budget = (MAX_DETAIL_CACHE_BYTES / (len(items) * height * width * 4)) ** 0.5  # image + mask bytes
    scale = min(ratios[len(ratios) // 2], MAX_DETAIL_SCALE, budget)
    return scale if scale >= 1.25 else 1.0  # a little more detail is not worth a second cache


class PreparedData:
    """Images and masks of ``items`` resized to (height, width), decoded once into memory-mapped arrays;
    with ``detail_scale`` > 1 also ``detail_images`` / ``detail_masks``, that much larger, for spatial
    augmentations (else None)."""

    def __init__(self, items: list[Item], meta: sly.ProjectMeta, class_names: list[str],
                 height: int, width: int, cache_dir: str | None = None, num_threads: int | None = None,
                 detail_scale: float = 1.0):
        self.items = list(items)
        self.class_names = list(class_names)
        self.size = (height, width)
        self._tmp = tempfile.TemporaryDirectory(prefix="unet_cache_", dir=cache_dir)
        n = len(self.items)
        self.images = self._allocate("images.npy", (n, height, width, 3))
        self.masks = self._allocate("masks.npy", (n, height, width))
        self.detail_images = self.detail_masks = None
        if detail_scale > 1:
            detail = (round(height * detail_scale), round(width * detail_scale))
            self.detail_images = self._allocate("detail_images.npy", (n, *detail, 3))
            self.detail_masks = self._allocate("detail_masks.npy", (n, *detail))
        self.skipped_geometries: Counter = Counter()
        self.pixel_counts = np.zeros(len(class_names), dtype=np.int64)  # at full resolution
        class_to_index = {name: i for i, name in enumerate(class_names)}

        def prepare(i: int):
            skipped = Counter()
            try:
                image, mask = load_item(self.items[i], meta, class_to_index, skipped)
            except DataError as e:
                return str(e), skipped, None
            self.images[i] = resize_image(image, height, width)
            self.masks[i] = resize_mask(mask, height, width)
            if self.detail_images is not None:
                self.detail_images[i] = resize_image(image, *self.detail_images.shape[1:3])
                self.detail_masks[i] = resize_mask(mask, *self.detail_masks.shape[1:3])
            return None, skipped, np.bincount(mask.ravel(), minlength=len(class_names))

        errors = []
        workers = num_threads or min(8, (os.cpu_count() or 1) + 2)
        with ThreadPoolExecutor(workers) as pool:
            for error, skipped, counts in pool.map(prepare, range(n)):
                self.skipped_geometries.update(skipped)
                if error:
                    errors.append(error)
                else:
                    self.pixel_counts += counts[: len(class_names)]
        if errors:
            self.close()
            shown = "\n  ".join(errors[:20])
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise DataError(f"{len(errors)} item(s) cannot be used:\n  {shown}{more}")

    def _allocate(self, name: str, shape: tuple) -> np.memmap:
        """A memory-mapped array whose disk blocks are reserved now: writing into a sparse map on a full
        disk kills the process with SIGBUS instead of raising."""
        path = os.path.join(self._tmp.name, name)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the map stays sparse
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                del array
                self._tmp.cleanup()
                raise DataError(f"--cache-dir {Path(self._tmp.name).parent}: no room for the decoded-image cache "
                                f"({size / 2**20:.1f} MB): {e.strerror}") from None
            finally:
                os.close(fd)
        return array

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        del self.images, self.masks, self.detail_images, self.detail_masks
        self._tmp.cleanup()


class EpochSampler(Sampler):
    """Yields ``epoch * n + index``: the order (and, via the dataset, the augmentation) of every
    epoch is a function of (seed, epoch) alone, so runs repeat and resume exactly whatever the
    number of workers."""

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        return (self.epoch * self.size + i for i in order)

    def __len__(self) -> int:
        return self.size


class SlySegDataset(Dataset):
    """(image uint8 (H, W, 3), mask uint8 (H, W)) pairs from prepared data, augmented on the fly.

    Masks stay uint8 until they reach the device (``forward_batch``): 8x less to copy than int64.

    Indices come from ``EpochSampler``; plain indices 0..n-1 (epoch 0) work too.
    """

    def __init__(self, data: PreparedData, augs_config: dict | None = None, seed: int = 0):
        self.data = data
        self.augs_config = augs_config
        self.seed = seed
        self._augmenter = None  # built lazily: once per worker process

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.data))
        if self.augs_config is None:
            image, mask = np.asarray(self.data.images[index]), np.asarray(self.data.masks[index])
        else:
            if self._augmenter is None:
                self._augmenter = augs.build_augmenter(self.augs_config)
            sample_seed = (self.seed * 1_000_003 + epoch * 100_003 + index) % (2**31)
            detailed = self.data.detail_images is not None
            image = np.asarray((self.data.detail_images if detailed else self.data.images)[index])
            mask = np.asarray((self.data.detail_masks if detailed else self.data.masks)[index])
            image, mask = augs.augment(self._augmenter, image, mask, sample_seed, self.data.size)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))


def collate_batch(samples):
    """Stack (image, mask) samples with numpy: a plain memcpy, where torch.stack opens a parallel
    region per call that costs tens of milliseconds when the cores are busy with training."""
    images, masks = zip(*samples)
    return (torch.from_numpy(np.stack([i.numpy() for i in images])),
            torch.from_numpy(np.stack([m.numpy() for m in masks])))


def make_loader(dataset: Dataset, batch_size: int, sampler, num_workers: int, device: torch.device) -> DataLoader:
    """The engine's DataLoader. Workers live for the whole run and keep batches queued; pinned memory
    makes copies to the GPU asynchronous."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_batch, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


# ---- splits --------------------------------------------------------------------------

def split_random(items: list[Item], val_percent: float, seed: int) -> tuple[list[Item], list[Item]]:
    if not 0 < val_percent < 100:
        raise DataError(f"--val-percent must be between 0 and 100, got {val_percent}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(items) * val_percent / 100)) if len(items) > 1 else 0
    return _check_split(shuffled[n_val:], shuffled[:n_val], f"random split of {len(items)} item(s) at {val_percent}%")


def split_by_datasets(items: list[Item], train_datasets: list[str], val_datasets: list[str]):
    known = sorted({item.dataset_name for item in items})
    for name in list(train_datasets) + list(val_datasets):
        if name not in known:
            raise DataError(f"unknown dataset {name!r} (--train-datasets/--val-datasets); the project has: {', '.join(known)}")
    train = [i for i in items if i.dataset_name in train_datasets]
    val = [i for i in items if i.dataset_name in val_datasets]
    return _check_split(train, val, "split by datasets")


def split_by_tags(items: list[Item], meta: sly.ProjectMeta, train_tag: str, val_tag: str, untagged: str = "ignore"):
    """The original app's rule (the SDK's ``Project.get_train_val_splits_by_tag``): items tagged ``train_tag``
    train, items tagged ``val_tag`` validate, an item with both tags (or with the one tag, when both names
    are the same) does both; items with neither go to 'train', 'val' or are ignored (``untagged``)."""
    train, val = [], []
    for item in items:
        ann = load_annotation(item, meta)
        names = {tag.name for tag in ann.img_tags}
        if train_tag in names:
            train.append(item)
        if val_tag in names:
            val.append(item)
        if not {train_tag, val_tag} & names:
            {"train": train, "val": val}.get(untagged, []).append(item)
    return _check_split(train, val, f"split by tags {train_tag!r} / {val_tag!r}")


def read_item_list(path: str, flag: str = "split file") -> list[tuple[str, str]]:
    """(dataset_name, item_name) of each entry of a JSON list such as train_set.json (other keys ignored)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        return [(e["dataset_name"], e["item_name"]) for e in entries]
    except FileNotFoundError:
        raise DataError(f"{flag} {path} not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
        raise DataError(f"{flag} {path}: expected a JSON list of {{dataset_name, item_name}} ({e})") from None


def split_from_files(items: list[Item], train_path: str, val_path: str):
    by_key = {(i.dataset_name, i.item_name): i for i in items}

    def read(path: str) -> list[Item]:
        keys = read_item_list(path)
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise DataError(f"split file {path}: {len(missing)} item(s) not in the project, e.g. {missing[0][0]}/{missing[0][1]}")
        return [by_key[k] for k in keys]

    return _check_split(read(train_path), read(val_path), "split from files")


def indices_in_split(items: list[Item], path: str, flag: str, split: str) -> list[int]:
    """Positions in ``items`` (one split) of the entries of the item list ``path``."""
    position = {(i.dataset_name, i.item_name): k for k, i in enumerate(items)}
    keys = read_item_list(path, flag)
    missing = [k for k in keys if k not in position]
    if missing:
        raise DataError(f"{flag} {path}: {len(missing)} item(s) not in the {split} set, e.g. {missing[0][0]}/{missing[0][1]}")
    return sorted({position[k] for k in keys})


def _check_split(train: list[Item], val: list[Item], how: str):
    if not train:
        raise DataError(f"{how}: the training set is empty")
    if not val:
        raise DataError(f"{how}: the validation set is empty")
    return train, val
