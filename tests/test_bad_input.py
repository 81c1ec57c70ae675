"""Bad input: one clear exception naming the file, item or flag, raised before training, and no output folder.

Every case runs ``train.main`` on a damaged copy of the tiny project, with ``--output tmp_path/out``
and ``--cache-dir tmp_path/cache``; neither may hold anything afterwards.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from custom_net.augs import AugsConfigError
from custom_net.sly_seg_dataset import DataError
from custom_net.config import ArgsError
from custom_net.model import model_list
from custom_net.train import main
from custom_net.trainer import resolve_batch_size
from custom_net.optim import LR_SCHEDULES, OPTIMIZERS
from tests.helpers import BAD_INPUT_ARGS as ARGS, RecordingReporter, edit_json, fails, run_cli


@pytest.fixture
def project(tiny_project, tmp_path) -> Path:
    """A private copy of the tiny project, free to damage."""
    return shutil.copytree(tiny_project, tmp_path / "project")


# ---- the project ------------------------------------------------------------------------------------


def test_missing_project_folder(tmp_path):
    missing = tmp_path / "nowhere"
    assert fails(tmp_path, ["--project-dir", str(missing)], DataError, str(missing)).endswith("does not exist")


def test_folder_is_not_a_project(project, tmp_path):
    (project / "meta.json").unlink()
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(project), "not a Supervisely project",
          "meta.json is missing")


def test_meta_json_invalid(project, tmp_path):
    (project / "meta.json").write_text('{"classes": [', encoding="utf-8")
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(project / "meta.json"), "not valid JSON")


def test_empty_project(tiny_project, tmp_path):
    empty = tmp_path / "empty"
    (empty / "ds" / "img").mkdir(parents=True)
    (empty / "ds" / "ann").mkdir()
    shutil.copy(tiny_project / "meta.json", empty / "meta.json")
    fails(tmp_path, ["--project-dir", str(empty)], DataError, str(empty), "empty")


# ---- classes --------------------------------------------------------------------------------------------


def test_unknown_class_lists_known_classes(project, tmp_path):
    message = fails(tmp_path, ["--project-dir", str(project), "--classes", "disk", "zebra"], DataError,
                    "'zebra'", "--classes")
    assert message.endswith("the project has: disk, triangle, box")


def test_class_without_area(project, tmp_path):
    edit_json(project / "meta.json",
               lambda meta: meta["classes"].append({"title": "spot", "shape": "point", "color": "#00FF00"}))
    fails(tmp_path, ["--project-dir", str(project), "--classes", "disk", "spot"], DataError,
          "'spot'", "shape point", "no area")


def test_class_without_labels(project, tmp_path):
    edit_json(project / "meta.json",
               lambda meta: meta["classes"].append({"title": "ghost", "shape": "bitmap", "color": "#00FF00"}))
    message = fails(tmp_path, ["--project-dir", str(project), "--classes", "disk", "ghost"], DataError,
                    "'ghost'", "no labelled pixels")
    assert "'disk'" not in message  # only the class at fault is named


# ---- items ------------------------------------------------------------------------------------------------

ITEM = Path("ds_a", "img", "img_0001.png")
ANN = Path("ds_a", "ann", "img_0001.png.json")


@pytest.mark.parametrize("content, reason", [(b"\x89PNG\r\n" + b"garbage" * 50, "not a readable image"),
                                             (b"", "empty file")])
def test_bad_image_file(project, tmp_path, content, reason):
    (project / ITEM).write_bytes(content)
    message = fails(tmp_path, ["--project-dir", str(project)], DataError, f"{project / ITEM}: {reason}")
    assert message.startswith("1 item(s) cannot be used")
    assert message.count(str(project / ITEM)) == 1  # named once, not repeated


def test_annotation_missing(project, tmp_path):
    (project / ANN).unlink()
    # The SDK alone would drop the whole dataset ds_a with a log warning and train on the rest.
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(project / "ds_a"), "'img_0001.png'",
          "does not have a corresponding annotation file")


def test_annotation_missing_in_nested_dataset(project, tmp_path):
    nested = project / "ds_b" / "datasets" / "ds_nested"
    (nested / "ann" / "img_0000.png.json").unlink()
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(nested), "'img_0000.png'")


def test_annotation_size_differs_from_image(project, tmp_path):
    edit_json(project / ANN, lambda ann: ann.update(size={"height": 40, "width": 64}))
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(project / ANN), "64x40",
          str(project / ITEM), "64x48")


def test_annotation_invalid_json(project, tmp_path):
    (project / ANN).write_text('{"size": ', encoding="utf-8")
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(project / ANN), "unreadable JSON")


def test_annotation_class_not_in_meta(project, tmp_path):
    def rename_first_label(ann):
        ann["objects"][0]["classTitle"] = "alien"

    ann = json.loads((project / ANN).read_text())
    assert ann["objects"], "the test item needs a label"
    edit_json(project / ANN, rename_first_label)
    fails(tmp_path, ["--project-dir", str(project)], DataError, str(project / ANN), "'alien'",
          "not in the project's meta.json")


# ---- flags ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, choices", [("--model", list(model_list)), ("--optimizer", list(OPTIMIZERS)),
                                           ("--lr-schedule", list(LR_SCHEDULES))])
def test_unknown_choice_lists_valid_ones(tiny_project, tmp_path, flag, choices):
    message = fails(tmp_path, ["--project-dir", str(tiny_project), flag, "Bogus"], ArgsError, flag, "'Bogus'")
    for choice in choices:
        assert repr(choice) in message


def test_input_size_not_multiple_of_32(tiny_project, tmp_path):
    fails(tmp_path, ["--project-dir", str(tiny_project), "--input-height", "100"], ArgsError,
          "--input-height", "multiple of 32", "100")


def test_zero_epochs(tiny_project, tmp_path):
    fails(tmp_path, ["--project-dir", str(tiny_project), "--epochs", "0"], ArgsError, "--epochs", ">= 1")


def test_train_args_bad_json(tiny_project, tmp_path):
    bad = tmp_path / "train_args.json"
    bad.write_text('{"epochs": 1,', encoding="utf-8")
    fails(tmp_path, ["--project-dir", str(tiny_project), "--train-args", str(bad)], ArgsError,
          "--train-args", str(bad), "not valid JSON")


def test_train_args_unknown_key(tiny_project, tmp_path):
    bad = tmp_path / "train_args.json"
    bad.write_text(json.dumps({"epochs": 1, "colour": "red"}), encoding="utf-8")
    fails(tmp_path, ["--project-dir", str(tiny_project), "--train-args", str(bad)], ArgsError,
          "--train-args", str(bad), "unknown argument(s): colour")


def test_augs_config_bad_json(tiny_project, tmp_path):
    bad = tmp_path / "augs.json"
    bad.write_text('{"pipeline": [', encoding="utf-8")
    fails(tmp_path, ["--project-dir", str(tiny_project), "--sly-augs-path", str(bad)], AugsConfigError,
          str(bad), "not valid JSON")


def test_augs_config_unknown_augmenter(tiny_project, tmp_path):
    bad = tmp_path / "augs.json"
    bad.write_text(json.dumps({"pipeline": [{"category": "flip", "name": "Flipper", "params": {}}]}))
    fails(tmp_path, ["--project-dir", str(tiny_project), "--sly-augs-path", str(bad)], AugsConfigError,
          str(bad), "pipeline[0]", "iaa.flip.Flipper")


def test_augs_config_missing(tiny_project, tmp_path):
    missing = tmp_path / "no_augs.json"
    message = fails(tmp_path, ["--project-dir", str(tiny_project), "--sly-augs-path", str(missing)],
                    AugsConfigError, str(missing), "not found")
    assert "seg_simple_rotate_crop_flipLR_flipUD" in message  # lists the shipped templates


def test_split_unknown_dataset(tiny_project, tmp_path):
    message = fails(tmp_path, ["--project-dir", str(tiny_project), "--split", "datasets", "--train-datasets", "ds_a",
                               "--val-datasets", "ds_zzz"], DataError, "'ds_zzz'", "--val-datasets")
    assert message.endswith("the project has: ds_a, ds_b, ds_b/ds_nested")


def test_split_files_missing(tiny_project, tmp_path):
    train_set = tmp_path / "train_set.json"
    train_set.write_text(json.dumps([{"dataset_name": "ds_a", "item_name": "img_0000.png"}]))
    missing = tmp_path / "val_set.json"
    fails(tmp_path, ["--project-dir", str(tiny_project), "--split", "files", "--train-set", str(train_set),
                     "--val-set", str(missing)], DataError, f"split file {missing} not found")


@pytest.mark.parametrize("kind", ["text", "list", "tensor", "checkpoint_dict"])
def test_custom_weights_not_a_state_dict(tiny_project, tmp_path, kind):
    weights = tmp_path / "model.pth"
    if kind == "text":
        weights.write_text("these are not weights")
    elif kind == "list":
        torch.save([1, 2, 3], weights)
    elif kind == "tensor":
        torch.save(torch.zeros(3), weights)
    else:  # a dict around a state dict (e.g. a resume state), not the state dict itself
        torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, weights)
    message = fails(tmp_path, ["--project-dir", str(tiny_project), "--custom-weights", str(weights)], ArgsError,
                    "--custom-weights", str(weights), "is not a PyTorch state dict")
    assert "weights_only" not in message  # torch's advice to unpickle arbitrary code is not for users


# ---- not an error ------------------------------------------------------------------------------------


def test_imagenet_weights_offline_train_from_scratch_with_auto(tiny_project, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # empty; the download is refused
    reporter = RecordingReporter()
    summary = main([*ARGS, "--project-dir", str(tiny_project), "--model", "LinkNet34", "--encoder-weights", "auto",
                    "--no-eval", "--output", str(tmp_path / "out")], reporter=reporter)
    assert summary["status"] == "finished"
    warnings = [text for level, text in reporter.messages if level == "warning" and "could not be downloaded" in text]
    assert len(warnings) == 1 and "Training LinkNet34 from scratch" in warnings[0]
    assert str(tmp_path / "hub" / "checkpoints" / "resnet34-") in warnings[0]
    recorded = json.loads((tmp_path / "out" / "checkpoints" / "train_args.json").read_text())
    assert recorded["encoder_weights"] == "none"


def test_batch_larger_than_train_set_warns_and_trains(tiny_project, tmp_path):
    reporter = RecordingReporter()
    out = tmp_path / "out"
    summary = main([*ARGS, "--project-dir", str(tiny_project), "--batch-size", "16", "--output", str(out)],
                   reporter=reporter)
    assert summary["status"] == "finished" and summary["last_epoch"] == 1
    warnings = [text for level, text in reporter.messages if level == "warning" and "--batch-size" in text]
    assert len(warnings) == 1, reporter.messages
    n_train = len(json.loads((out / "info" / "train_set.json").read_text()))
    assert n_train == 10  # 12 items, 20% for validation
    assert f"--batch-size 16 is larger than the {n_train} training item(s)" in warnings[0]
    assert reporter.named("start")[0]["iters_per_epoch"] == 1  # a single batch per epoch
    assert (out / "checkpoints" / "model_001_last.pth").is_file()


# ---- the same through the command line --------------------------------------------------------------


@pytest.mark.slow
def test_cli_reports_bad_input_with_exit_code_2(project, tmp_path, monkeypatch):
    (project / ITEM).write_bytes(b"garbage")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch cache; downloads are refused
    cases = {  # name: (args, what stderr must name)
        "unknown model": (["--project-dir", str(project), "--model", "Bogus"], "--model"),
        "corrupt image": (["--project-dir", str(project)], str(project / ITEM)),
        "ImageNet weights offline": (["--project-dir", str(project), "--model", "LinkNet34", "--encoder-weights",
                                      "imagenet"], str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-")),
    }

    def run(case):
        args, _ = cases[case]
        return run_cli(*ARGS, *args, "--output", str(tmp_path / "out"), timeout=120)

    with ThreadPoolExecutor(len(cases)) as pool:  # the interpreter start dominates: overlap them
        results = dict(zip(cases, pool.map(run, cases)))
    for case, result in results.items():
        name = cases[case][1]
        assert result.returncode == 2, f"{case}: rc {result.returncode}\n{result.stderr}"
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and name in result.stderr[result.stderr.index("error: "):], f"{case}: {result.stderr}"
        assert "Traceback" not in result.stderr, f"{case}: {result.stderr}"
    assert not (tmp_path / "out").exists()


def test_batch_size_auto_gives_small_projects_enough_steps_and_the_run_records_its_choice(tiny_project, tmp_path):
    """10 training items: batch 8 would make 2 steps an epoch, so auto takes 4 (3 steps); the run says so,
    trains with it and records the number, so a resume or a repeat uses the same."""
    reporter = RecordingReporter()
    out = tmp_path / "out"
    at = ARGS.index("--batch-size")
    argv = ARGS[:at] + ARGS[at + 2:]  # no --batch-size: the default, auto
    summary = main([*argv, "--project-dir", str(tiny_project), "--output", str(out)], reporter=reporter)
    assert summary["status"] == "finished"
    said = [text for level, text in reporter.messages if "--batch-size auto" in text]
    assert said == ["--batch-size auto: 4, 3 steps an epoch (10 training items)"]
    assert reporter.named("start")[0]["iters_per_epoch"] == 3
    assert json.loads((out / "checkpoints" / "train_args.json").read_text())["batch_size"] == 4


@pytest.mark.parametrize("items, world_size, expected", [
    (25, 1, 4),    # batch 8 makes 4 steps, 4 makes 7: the held-out microscopy set's size (issue #23)
    (48, 1, 8),    # 6 steps at 8: larger projects keep the batch of before
    (5000, 1, 8),  # never above 8, so never more memory than before
    (5, 1, 4),     # too few for 6 steps at any size: 4, the smallest (batch 2 spiked at the default lr)
    (50, 2, 4),    # per process: 25 items each under torchrun
])
def test_batch_size_auto_rule(items, world_size, expected):
    said = []
    assert resolve_batch_size("auto", items, world_size, lambda level, text: said.append(level)) == expected
    assert said == ["info"]


def test_an_explicit_batch_size_is_kept_and_warned_about_only_when_larger_than_the_share():
    said = []
    assert resolve_batch_size(8, 25, 1, lambda level, text: said.append((level, text))) == 8
    assert resolve_batch_size(16, 20, 2, lambda level, text: said.append((level, text))) == 16
    assert said == [("warning", "--batch-size 16 is larger than the 20 training item(s) over 2 processes: "
                                "each epoch is a single batch of 10")]
