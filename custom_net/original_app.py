"""What users of the original Train UNet app bring with them: its recipe, its dashboard's defaults, and
its ``train_args.json`` (``vars(args)`` of its parser), read as that app ran them.

Facts from the original app's code (supervisely-ecosystem/unet): custom_net/train.py (the parser),
custom_net/utils.py (the loop), supervisely/train/src/ui/step04_augs.py and step06_hyperparameters.py
(the dashboard's initial state).
"""
from __future__ import annotations

import json
from pathlib import Path

from custom_net.run_folder import RunFolder

# What the original always did, where this app has a flag for it.
ORIGINAL_RECIPE = dict(
    loss="jaccard_nll", jaccard_weight=0.5, class_weights=None,
    scheduler_order="before",  # its scheduler.step() came before each epoch: every decay an epoch early
    init="original", clip_grad_norm=0.0, bn_momentum=0.1, decoder_lr_factor=1.0, train_batchnorm="off",
    best_metric="val_loss",  # model_NNN_best.pth: the lowest validation loss so far (strictly lower replaces it)
)

# The dashboard's initial state (step 06, and step 04: augmentations on, template "Only Color"), as flags.
ORIGINAL_DASHBOARD = dict(
    epochs=10, batch_size=8, input_height=256, input_width=256,
    optimizer="Adam", lr=1e-3, momentum=0.9, weight_decay=1e-4, nesterov=False,
    lr_schedule="none",  # lrPolicyEnabled = False: a constant learning rate
    step_size=5, gamma_step=0.1, milestones=[5, 10, 15], gamma_exp=0.9,
    val_interval=1, metrics_period=10, checkpoint_interval=1, save_last=True, save_best=True, max_keep_ckpts=3,
    sly_augs_path="seg_simple", vis_count=1,
    eval=True, speed_test=True,  # "Run Model Benchmark" and "Run Speed Test" on
)

# --preset original: the original app as its dashboard starts.
ORIGINAL_PRESET = {**ORIGINAL_RECIPE, **ORIGINAL_DASHBOARD}

# Its previews: one prediction per vis item every max(1, epochs // 20) epochs (calc_visualization_step).
ORIGINAL_PREVIEWS_PER_RUN = 20

# Keys of its train_args.json (every dest of its parser) and the parser's defaults, for a file written
# before a key existed. Its train_set_path / val_set_path are this app's --train-set / --val-set.
ORIGINAL_PARSER_DEFAULTS = dict(
    model="UNet11", project_dir="", classes_path="", train_set_path="", val_set_path="", sly_augs_path="",
    epochs=5, input_height=256, input_width=256, batch_size=8, jaccard_weight=0.5,
    optimizer="SGD", lr=0.001, momentum=0.9, weight_decay=0.0001, nesterov=False,
    lr_schedule="", step_size=5, gamma_step=0.1, milestones="[5, 10, 15]", gamma_exp=0.9,
    gpu_id="cuda:0", num_workers=0, metrics_period=10, val_interval=1, checkpoint_interval=1,
    save_last=False, save_best=False, checkpoints_dir="", max_keep_ckpts=-1, custom_weights="",
    train_vis_items_path="", val_vis_items_path="", sly=False,
)
RENAMED_KEYS = {"train_set_path": "train_set", "val_set_path": "val_set"}
# Files its dashboard wrote into <run>/info/ and passed by path: found there when the recorded path is gone.
INFO_FILE_KEYS = ("classes_path", "train_set_path", "val_set_path", "sly_augs_path", "train_vis_items_path",
                  "val_vis_items_path")


def is_original_train_args(values: dict) -> bool:
    """A train_args.json written by the original app: only its keys, and the two every version of it wrote."""
    return {"checkpoints_dir", "sly"} <= values.keys() <= ORIGINAL_PARSER_DEFAULTS.keys()


def translate_train_args(values: dict, path: Path) -> tuple[dict, str | None]:
    """An original train_args.json as this app's argument values (the recipe it ran with included), and a
    note on what was taken from elsewhere: recorded paths that are not on this machine (the platform agent's
    folders) are looked up in the run's ``info/`` beside the file's ``checkpoints/``."""
    values = {**ORIGINAL_PARSER_DEFAULTS, **values}
    info = RunFolder.of_checkpoint(path).info  # the file sits in checkpoints/ as a checkpoint does
    moved = []
    for key in INFO_FILE_KEYS:
        recorded = values[key]
        if isinstance(recorded, str) and recorded and not Path(recorded).exists() and (info / Path(recorded).name).is_file():
            values[key] = str(info / Path(recorded).name)
            moved.append(key)
    note = f"recorded paths not on this machine, taken from {info}: {', '.join(moved)}" if moved else None
    for old, new in RENAMED_KEYS.items():
        values[new] = values.pop(old) or None
    for key in ("classes_path", "checkpoints_dir", "train_vis_items_path", "val_vis_items_path"):
        values[key] = values[key] or None
    return {**ORIGINAL_RECIPE, "preset": "original", **values}, note


def read_class_titles(path: str | Path, flag: str) -> list[str]:
    """Class titles, in order, of a model_classes.json (a list of class JSON objects, or of titles)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{flag}: {path} not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: {path} is not a readable JSON file ({e})") from None
    if isinstance(entries, list):
        titles = [e.get("title") if isinstance(e, dict) else e for e in entries]
        if titles and all(isinstance(t, str) and t for t in titles):
            return titles
    raise ValueError(f"{flag}: {path} must hold a list of classes (objects with a \"title\", as model_classes.json)")
