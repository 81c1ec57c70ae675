"""The dashboard's bridge to the engine (custom_net.sly_integration): settings {dest: value} -> argv,
and per-option checks with the engine's own types. Pure functions, no app."""
from __future__ import annotations

import argparse

import pytest

from custom_net.sly_integration import check_setting, settings_to_argv
from custom_net.train import build_parser, parse_args

ACTIONS = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
# Options that only make sense on their own or need files: covered elsewhere.
SKIP = {"demo", "train_args", "resume", "train_set", "val_set"}


def _other_value(action):
    if action.choices is not None:
        return next(c for c in action.choices if c != action.default)
    if isinstance(action, argparse.BooleanOptionalAction):
        return not action.default
    special = {"project_dir": "/data/my project", "classes": ["kiwi", "lemon"], "train_datasets": ["a", "b c"],
               "val_datasets": ["v"], "input_height": 96, "input_width": 160, "class_weights": [0.5, 2.0],
               "milestones": [2, 4], "gpu_id": "cuda:1", "sly_augs_path": "seg_simple", "encoder_weights": "imagenet",
               "custom_weights": "/w/model 001.pth", "output": "/r/exp 1", "cache_dir": "/tmp/c", "train_tag": "t",
               "val_tag": "v", "jaccard_weight": 0.3, "val_percent": 25.0, "lr": 0.02, "min_lr": 1e-5}
    if action.dest in special:
        return special[action.dest]
    assert isinstance(action.default, (int, float)) and not isinstance(action.default, bool), action.dest
    return action.default + 1


def test_every_option_round_trips_through_the_engine_parser():
    settings = {dest: _other_value(action) for dest, action in ACTIONS.items() if dest not in SKIP}
    settings["split"] = "datasets"
    args = vars(parse_args(settings_to_argv(settings)))
    for dest, value in settings.items():
        assert args[dest] == value, dest


def test_empty_values_fall_back_to_the_engine_defaults():
    argv = settings_to_argv({"project_dir": "p", "custom_weights": "", "class_weights": None, "train_datasets": [],
                             "channels_last": False, "demo": False})
    assert argv == ["--project-dir", "p", "--no-channels-last"]
    assert parse_args(argv).custom_weights == ""


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="not train.py options: epoch"):
        settings_to_argv({"epoch": 3})


@pytest.mark.parametrize("dest, text, expected", [
    ("input_height", "96", (96, None)),
    ("input_height", "100", (None, "must be a multiple of 32 (32, 64, ... 256 ...), got 100")),
    ("epochs", "0", (None, "must be >= 1, got 0")),
    ("lr", "-1", (None, "must be > 0, got -1")),
    ("lr", "1e-3", (0.001, None)),
    ("jaccard_weight", "1.5", (None, "must be between 0 and 1, got 1.5")),
    ("batch_size", "eight", (None, "not a valid number: 'eight'")),
    ("milestones", "3 6", ([3, 6], None)),
    ("milestones", "", (None, "enter at least one value")),
    ("class_weights", "", ([], None)),
    ("optimizer", "Lion", (None, "choose from SGD, Adam, AdamW")),
    ("save_best", False, (False, None)),
    ("gpu_id", " cpu ", ("cpu", None)),
])
def test_check_setting_uses_the_engine_types(dest, text, expected):
    assert check_setting(dest, text) == expected


def test_app_configs():
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    app = json.loads((repo / "supervisely" / "train" / "config.json").read_text())
    assert app["type"] == "app" and app["gpu"] == "preferred"
    assert "main:app --app-dir ./supervisely/train/src" in app["entrypoint"]  # what the tests start
    assert (repo / "supervisely" / "train" / "src" / "main.py").is_file()
    assert app["context_menu"] == {"target": ["images_project"], "context_root": "Neural Networks",
                                   "context_category": "UNet"}
    assert json.loads((repo / "config.json").read_text())["type"] == "collection"
    assert not (repo / "supervisely" / "__init__.py").exists()  # would hide the SDK package
