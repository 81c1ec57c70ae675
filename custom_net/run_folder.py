"""The layout of a run folder: the one place that names its files.

    checkpoints/model_NNN.pth, model_NNN_best.pth, model_NNN_last.pth   plain state dicts
    checkpoints/train_args.json, checkpoints/resume_state.pt
    info/model_classes.json, ui_state.json, {train,val}_set.json, {train,val}_vis_items.json,
    info/augs_config.json, augs_preview.py, metrics.jsonl, summary.json, calibration_images.npz,
    info/charts/, info/previews/{split}_epoch_NNN.png, eval/, open_app.lnk (platform only)

Training writes it, inference, quantization, evaluation, export, the serving app and the dashboard read it:
all through ``RunFolder``. Paths work for local folders and for Team Files paths (``PurePosixPath``).
"""
from __future__ import annotations

import json
from pathlib import Path, PurePath

import supervisely as sly

SPLITS = ("train", "val")


class RunFolder:
    """Paths inside the run folder ``root``."""

    def __init__(self, root: str | PurePath):
        self.root = root if isinstance(root, PurePath) else Path(root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | PurePath) -> "RunFolder":
        """The run folder holding ``<run>/checkpoints/<checkpoint>``."""
        remote = isinstance(checkpoint, PurePath) and not isinstance(checkpoint, Path)  # e.g. a Team Files path
        path = checkpoint if remote else Path(checkpoint).resolve()
        return cls(path.parent.parent)

    # ---- folders
    @property
    def checkpoints(self):
        return self.root / "checkpoints"

    @property
    def info(self):
        return self.root / "info"

    @property
    def charts(self):
        return self.info / "charts"

    @property
    def previews(self):
        return self.info / "previews"

    @property
    def eval(self):
        return self.root / "eval"

    # ---- files
    @property
    def train_args(self):
        return self.checkpoints / "train_args.json"

    @property
    def resume_state(self):  # not *.pth: model_*.pth files must stay plain state dicts
        return self.checkpoints / "resume_state.pt"

    @property
    def model_classes(self):
        return self.info / "model_classes.json"

    @property
    def ui_state(self):
        return self.info / "ui_state.json"

    @property
    def augs_config(self):
        return self.info / "augs_config.json"

    @property
    def augs_preview(self):
        return self.info / "augs_preview.py"

    @property
    def metrics_log(self):
        return self.info / "metrics.jsonl"

    @property
    def summary(self):
        return self.info / "summary.json"

    @property
    def calibration(self):
        return self.info / "calibration_images.npz"

    @property
    def open_app_link(self):  # the dashboard's: its training session on the platform
        return self.root / "open_app.lnk"

    @property
    def experiment_info(self):  # the dashboard's: the platform's Experiments table reads it (ExperimentInfo)
        return self.root / "experiment_info.json"

    @property
    def model_meta(self):  # the dashboard's: the model's classes as a ProjectMeta, for the Experiments table
        return self.root / "model_meta.json"

    @property
    def upload_state(self):  # the dashboard's: the Team Files folder the run uploads to (itself not uploaded)
        return self.root / ".unet_upload.json"

    def split_set(self, split: str):
        return self.info / f"{split}_set.json"

    def vis_items(self, split: str):
        return self.info / f"{split}_vis_items.json"

    def preview(self, split: str, epoch: int):
        return self.previews / f"{split}_epoch_{epoch:03d}.png"

    # ---- checkpoints
    @staticmethod
    def checkpoint_name(epoch: int, kind: str = "") -> str:
        """model_NNN.pth, model_NNN_best.pth (``kind`` "best"), model_NNN_last.pth ("last")."""
        return f"model_{epoch:03d}{'_' + kind if kind else ''}.pth"

    def checkpoint(self, epoch: int, kind: str = ""):
        return self.checkpoints / self.checkpoint_name(epoch, kind)

    def checkpoint_files(self, kind: str | None = None) -> list[Path]:
        """This run's checkpoints of one kind ("best", "last", "" = the periodic ones; None = all), oldest first."""
        return checkpoints_in(self.checkpoints, kind)

    def chosen_checkpoint(self) -> Path:
        """The checkpoint a run folder stands for: the newest best, else the last, else the newest."""
        return _choose(self.checkpoints, self.root)

    @staticmethod
    def onnx_for(checkpoint: Path) -> Path:
        return checkpoint.with_suffix(".onnx")

    def has_started(self) -> bool:
        """A run began here: it saved arguments, a checkpoint or a resume state."""
        return self.train_args.is_file() or self.resume_state.is_file() or bool(self.checkpoint_files())

    # ---- reading info/
    def read_ui_state(self) -> dict:
        ui_state = self._read_json(self.ui_state)
        for key in ("selectedModel", "imgSize"):
            if key not in ui_state:
                raise ValueError(f"{self.ui_state}: missing {key!r}")
        return ui_state

    def read_model_classes(self) -> list[sly.ObjClass]:
        """The model's classes, index = class id, each a bitmap (runs written before that rule kept their
        classes' shapes: the model predicts masks whatever they were labelled with)."""
        classes = map(sly.ObjClass.from_json, self._read_json(self.model_classes))
        return [c if c.geometry_type is sly.Bitmap else c.clone(geometry_type=sly.Bitmap) for c in classes]

    def _read_json(self, path):
        try:
            return json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"the run folder has no {Path(path).relative_to(self.root)} ({path}); a checkpoint "
                                    "must sit in <run>/checkpoints/ beside <run>/info/ as training writes it") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: broken JSON ({e})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.pth`` as given, or for a run folder (or a folder of checkpoints) the one it stands for."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found (no such checkpoint or run folder)")
    return _choose(RunFolder(path).checkpoints if RunFolder(path).checkpoints.is_dir() else path, path)


def _kind(checkpoint: Path) -> str:
    return next((k for k in ("best", "last") if checkpoint.stem.endswith("_" + k)), "")


def checkpoints_in(folder: Path, kind: str | None = None) -> list[Path]:
    found = sorted(Path(folder).glob("model_*.pth"))  # zero-padded epochs sort by name
    return found if kind is None else [p for p in found if _kind(p) == kind]


def _choose(folder: Path, named) -> Path:
    for kind in ("best", "last", ""):
        found = checkpoints_in(folder, kind)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{named}: no checkpoints/model_*.pth in this run folder")
