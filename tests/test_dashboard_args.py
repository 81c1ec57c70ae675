"""The dashboard's bridge to the engine (custom_net.sly_integration): settings {dest: value} -> argv,
per-option checks with the engine's own types, the device selector's launch plan, the evaluation
summary on the training card. Pure functions, no app."""
from __future__ import annotations

import argparse

import pytest

from custom_net import distributed, train
from custom_net.report import HEADLINE_METRICS, METRIC_LABELS
from custom_net.reporting import Reporter
from custom_net.sly_integration import (Launch, check_setting, describe_evaluation, list_devices, plan_launch,
                                        settings_to_argv, start_training)
from custom_net.config import build_parser, parse_config

ACTIONS = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
# Options that only make sense on their own or need files, and the original app's forms of --classes and
# --output (read into those): covered elsewhere.
SKIP = {"demo", "train_args", "resume", "train_set", "val_set", "classes_path", "checkpoints_dir"}


def _other_value(action):
    if action.choices is not None:
        return next(c for c in action.choices if c != action.default)
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return not action.default
    special = {"project_dir": "/data/my project", "classes": ["kiwi", "lemon"], "train_datasets": ["a", "b c"],
               "val_datasets": ["v"], "input_height": 96, "input_width": 160, "class_weights": [0.5, 2.0],
               "milestones": [2, 4], "gpu_id": "cuda:1", "sly_augs_path": "seg_simple", "encoder_weights": "imagenet",
               "custom_weights": "/w/model 001.pth", "output": "/r/exp 1", "cache_dir": "/tmp/c", "train_tag": "t",
               "val_tag": "v", "jaccard_weight": 0.3, "val_percent": 25.0, "lr": 0.02, "min_lr": 1e-5,
               "num_workers": 2, "bn_momentum": 0.3, "batch_size": 4, "warmup_epochs": 2.5, "decoder_lr_factor": 0.5,
               "custom_weights_classes": "/w/model classes.json", "train_vis_items_path": "/w/train vis.json",
               "val_vis_items_path": "/w/val vis.json"}
    if action.dest in special:
        return special[action.dest]
    assert isinstance(action.default, (int, float)) and not isinstance(action.default, bool), action.dest
    return action.default + 1


def test_every_option_round_trips_through_the_engine_parser():
    settings = {dest: _other_value(action) for dest, action in ACTIONS.items() if dest not in SKIP}
    settings["split"] = "datasets"
    args = parse_config(settings_to_argv(settings)).as_dict()
    for dest, value in settings.items():
        assert args[dest] == value, dest


def test_empty_values_fall_back_to_the_engine_defaults():
    argv = settings_to_argv({"project_dir": "p", "custom_weights": "", "class_weights": None, "train_datasets": [],
                             "channels_last": False, "demo": False})
    assert argv == ["--project-dir", "p", "--no-channels-last"]
    assert parse_config(argv).custom_weights == ""


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
    ("num_workers", "auto", ("auto", None)),
    ("num_workers", "3", (3, None)),
    ("num_workers", "-1", (None, "must be 'auto' or >= 0, got -1")),
    ("preset", "original", ("original", None)),
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


# ---- the device selector -----------------------------------------------------------------------

def test_device_list_is_the_cpu_and_every_gpu_torch_sees():
    import torch

    devices = list_devices()
    assert devices[0] == ("cpu", "CPU")
    assert [value for value, _ in devices[1:]] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert all(label.startswith(f"GPU {i}: ") for i, (_, label) in enumerate(devices[1:]))


@pytest.mark.parametrize("selected, expected", [
    (["cpu"], Launch("cpu")),
    ("cpu", Launch("cpu")),
    (["cuda:1"], Launch("cuda:1")),                 # one GPU: a plain run on it
    (["cuda:0", "cuda:2"], Launch("auto", (0, 2))),  # several: torchrun, process N on the N-th chosen GPU
])
def test_launch_plan(selected, expected):
    assert plan_launch(selected) == expected
    assert expected.distributed == (len(expected.torchrun_gpus) > 1)


@pytest.mark.parametrize("selected, message", [
    ([], "choose the CPU or one or more GPUs"),
    (["cpu", "cuda:0"], "the CPU cannot be combined with GPUs"),
    (["cuda:0", "cuda:0"], "each device can be chosen once"),
    (["cuda:0", "tpu"], "not a GPU: 'tpu'"),
])
def test_launch_plan_refuses_what_makes_no_run(selected, message):
    with pytest.raises(ValueError, match=message):
        plan_launch(selected)


@pytest.mark.parametrize("launch, called", [(Launch("cpu"), "main"), (Launch("auto", (0, 1)), "torchrun")])
def test_start_training_picks_the_launcher(monkeypatch, launch, called):
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, reporter, ui_state: calls.append(("main", argv, reporter, ui_state))
                        or {"status": "finished"})
    monkeypatch.setattr(distributed, "run_torchrun", lambda argv, gpus, reporter, ui_state: calls.append(
        ("torchrun", argv, gpus, reporter, ui_state)) or {"status": "finished"})
    reporter, ui = Reporter(), {"selectedModel": "UNet"}
    assert start_training(["--demo"], launch, reporter, ui) == {"status": "finished"}
    expected = {"main": ("main", ["--demo"], reporter, ui), "torchrun": ("torchrun", ["--demo"], [0, 1], reporter, ui)}
    assert calls == [expected[called]]


# ---- the evaluation on the training card -------------------------------------------------------

RUN = "/runs/exp 1"
HEADLINE = {name: 0.5 for name in HEADLINE_METRICS} | {"mean_fg_boundary_iou": None}


@pytest.mark.parametrize("summary, expected", [
    ({"status": "finished"}, ("info", [], "Evaluation was turned off in step 06.")),
    ({"status": "stopped"}, ("info", [], "Evaluation skipped: the run was stopped before its last epoch.")),
    ({"status": "finished", "eval": None}, ("warning", [], "Evaluation skipped: no best or last checkpoint was saved.")),
    ({"status": "finished", "eval": {"error": "RuntimeError: boom"}},
     ("error", [], "Evaluation failed: RuntimeError: boom. The checkpoints are fine.")),
])
def test_evaluation_absent_skipped_or_failed(summary, expected):
    assert describe_evaluation({"output_dir": RUN, **summary}, RUN) == expected


@pytest.mark.parametrize("location, report", [
    (RUN, f"{RUN}/eval/report.html"),                             # local: the run folder
    ("/unet/42_exp_000/", "/unet/42_exp_000/eval/report.html"),   # platform: the uploaded Team Files folder
])
def test_evaluation_headline_and_report_location(location, report):
    summary = {"status": "finished", "output_dir": RUN,
               "eval": {"headline": HEADLINE, "report": f"{RUN}/eval/report.html"}}
    status, metrics, text = describe_evaluation(summary, location)
    assert status == "success" and text == f"Report: {report}"
    assert metrics[0] == (METRIC_LABELS["mean_fg_iou"], "0.5000")
    assert (METRIC_LABELS["mean_fg_boundary_iou"], "n/a") in metrics and len(metrics) == len(HEADLINE_METRICS)
