"""Users of the original Train UNet / Serve UNet apps: their argv, train_args.json, run folders, checkpoints
and serving code work with this app, both ways.

The facts about the original app below are read from its code (supervisely-ecosystem/unet): the parser in
custom_net/train.py, the argv its dashboard builds in supervisely/train/src/ui/step07_train.py, the
dashboard's initial state in step06_hyperparameters.py / step04_augs.py, and the serving in
supervisely/serve/src/unet_model.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervisely as sly
import torch
from supervisely.nn.inference import SemanticSegmentation
from supervisely.nn.prediction_dto import PredictionSegmentation

from custom_net import sly_seg_dataset as data
from custom_net.custom_weights import load_custom_weights
from custom_net.model import build_model, model_list
from custom_net.config import ArgsError, build_parser, parse_config
from custom_net.train import main
from tests.helpers import REPO, RecordingReporter as Messages, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:imgaug.*", "ignore::DeprecationWarning:imageio.*",
                                        "ignore:--gpu-id cuda.0. no CUDA device:UserWarning")


# ---- the original dashboard's run ---------------------------------------------------------------

def original_run_folder(folder: Path, project_dir: Path, epochs: int = 2) -> tuple[Path, list[str]]:
    """What the original dashboard prepared before starting custom_net/train.py (step07_train.py): the
    artifacts folder with info/ files, and the argv it built (sizes made small for the CPU)."""
    project = sly.Project(str(project_dir), sly.OpenMode.READ)
    # model_classes.json: the classes of its segmentation project (sly.Project.to_segmentation_task):
    # bitmaps, __bg__ added last, rectangle classes dropped.
    seg_meta, _ = project.meta.to_segmentation_task()
    seg_meta = seg_meta.add_obj_class(sly.ObjClass("__bg__", sly.Bitmap, color=[0, 0, 0]))
    info = folder / "info"
    info.mkdir(parents=True)
    (info / "model_classes.json").write_text(json.dumps(seg_meta.obj_classes.to_json()))
    entries = [{"dataset_name": ds.name, "item_name": name, "img_path": ds.get_img_path(name),
                "sly_ann_path": ds.get_ann_path(name), "seg_mask_path": ds.get_seg_path(name)}
               for ds in project.datasets for name in sorted(ds.get_items_names())]
    (info / "train_set.json").write_text(json.dumps(entries[:-3]))
    (info / "val_set.json").write_text(json.dumps(entries[-3:]))
    (info / "train_vis_items.json").write_text(json.dumps(entries[2:3]))
    (info / "val_vis_items.json").write_text(json.dumps(entries[-1:]))
    shutil.copy(REPO / "supervisely" / "train" / "augs" / "seg_simple.json", info / "augs_config.json")
    (info / "ui_state.json").write_text(json.dumps({"selectedModel": "UNet", "expName": "lemons", "useAugs": True,
                                                    "imgSize": {"width": 64, "height": 64, "proportional": True}}))
    argv = ["--model", "UNet", "--project-dir", str(project_dir), "--classes-path", str(info / "model_classes.json"),
            "--train-set-path", str(info / "train_set.json"), "--val-set-path", str(info / "val_set.json"),
            "--sly-augs-path", str(info / "augs_config.json"), "--epochs", str(epochs), "--input-height", "64",
            "--input-width", "64", "--batch-size", "4", "--optimizer", "Adam", "--lr", "0.001", "--momentum", "0.9",
            "--weight-decay", "0.0001", "--lr-schedule", "", "--gpu-id", "cuda:0", "--num-workers", "0",
            "--metrics-period", "10", "--val-interval", "1", "--checkpoint-interval", "1", "--save-last", "--save-best",
            "--checkpoints-dir", str(folder / "checkpoints"), "--max-keep-ckpts", "3",
            "--train-vis-items-path", str(info / "train_vis_items.json"),
            "--val-vis-items-path", str(info / "val_vis_items.json"), "--sly"]
    return info, argv


@pytest.fixture(scope="module")
def original_run(tiny_project, tmp_path_factory):
    folder = tmp_path_factory.mktemp("original") / "artifacts"
    info, argv = original_run_folder(folder, tiny_project)
    reporter = Messages()
    summary = main([*argv, "--reporter", "none"], reporter=reporter)
    return folder, info, summary, reporter


def test_original_dashboard_argv_trains_into_its_folder(original_run):
    folder, info, summary, reporter = original_run
    assert summary["status"] == "finished" and summary["output_dir"] == str(folder)  # the folder it prepared
    assert (folder / "checkpoints" / "model_002_last.pth").is_file()
    recorded = json.loads((folder / "checkpoints" / "train_args.json").read_text())
    # the class order of --classes-path, __bg__ last as there; the split and previews of its files
    assert recorded["classes"] == ["disk", "triangle", "__bg__"]
    assert [c["title"] for c in json.loads((info / "model_classes.json").read_text())] == recorded["classes"]
    assert recorded["split"] == "files" and recorded["lr_schedule"] == "none" and recorded["sly"] is True
    lrs = [json.loads(line)["lr"] for line in (info / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.001, 0.001]  # "" = no schedule
    vis = json.loads((info / "train_vis_items.json").read_text())
    third = json.loads((info / "train_set.json").read_text())[2]  # the one original_run_folder chose
    assert [(v["dataset_name"], v["item_name"]) for v in vis] == [(third["dataset_name"], third["item_name"])]
    # the dashboard's own ui_state.json keeps its fields; serving's are there
    ui_state = json.loads((info / "ui_state.json").read_text())
    assert ui_state["expName"] == "lemons" and ui_state["useAugs"] is True and ui_state["selectedModel"] == "UNet"
    assert any("--sly: not running in a Supervisely task" in text for _, text in reporter.messages)


def test_background_is_the_class_id_the_class_list_gives(tiny_project):
    """__bg__ last (the original's order): pixels of no label get the last id, in training and evaluation."""
    project = data.open_project(tiny_project)
    items = data.list_items(project)[:3]
    first = data.PreparedData(items, project.meta, ["__bg__", "disk", "triangle", "box"], 48, 64)
    last = data.PreparedData(items, project.meta, ["disk", "triangle", "box", "__bg__"], 48, 64)
    try:
        expected = np.array([3, 0, 1, 2], np.uint8)[np.asarray(first.masks)]  # the same pixels, renumbered
        assert np.array_equal(np.asarray(last.masks), expected)
        assert (np.asarray(last.masks) == 3).mean() > 0.5
    finally:
        first.close()
        last.close()


def test_original_train_args_replay_as_the_original_ran(original_run, tiny_project, tmp_path):
    """Its train_args.json is vars(args) of its parser, with the agent's paths; the run folder beside it
    has the info/ files. What it did without a flag (its loss, init, schedule order, best by loss) applies."""
    folder, info, _, _ = original_run
    run = tmp_path / "downloaded_run"
    shutil.copytree(info, run / "info")
    (run / "checkpoints").mkdir()
    agent = "/sly_task_data/2412/artifacts"
    recorded = {"model": "UNet", "project_dir": "/sly_task_data/2412/lemons_seg",
                "classes_path": f"{agent}/info/model_classes.json", "train_set_path": f"{agent}/info/train_set.json",
                "val_set_path": f"{agent}/info/val_set.json", "sly_augs_path": f"{agent}/info/augs_config.json",
                "epochs": 2, "input_height": 64, "input_width": 64, "batch_size": 4, "jaccard_weight": 0.5,
                "optimizer": "Adam", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0001, "nesterov": False,
                "lr_schedule": "StepLR", "step_size": 1, "gamma_step": 0.1, "milestones": "[5, 10, 15]",
                "gamma_exp": 0.9, "gpu_id": "cuda:0", "num_workers": 0, "metrics_period": 10, "val_interval": 1,
                "checkpoint_interval": 1, "save_last": True, "save_best": True,
                "checkpoints_dir": str(tmp_path / "replay" / "checkpoints"), "max_keep_ckpts": 3, "custom_weights": "",
                "train_vis_items_path": f"{agent}/info/train_vis_items.json",
                "val_vis_items_path": f"{agent}/info/val_vis_items.json", "sly": True}
    (run / "checkpoints" / "train_args.json").write_text(json.dumps(recorded))
    with pytest.warns(UserWarning, match="recorded paths not on this machine, taken from .*: classes_path, train_set"):
        args = parse_config(["--train-args", str(run / "checkpoints" / "train_args.json"),
                           "--project-dir", str(tiny_project)])
    assert args.classes == ("disk", "triangle", "__bg__") and args.train_set == str(run / "info" / "train_set.json")
    assert (args.loss, args.init, args.scheduler_order, args.best_metric, args.clip_grad_norm, args.bn_momentum) == \
        ("jaccard_nll", "original", "before", "val_loss", 0.0, 0.1)
    assert args.milestones == (5, 10, 15) and args.output == str(tmp_path / "replay")

    summary = main(["--train-args", str(run / "checkpoints" / "train_args.json"), "--project-dir", str(tiny_project),
                    "--reporter", "none", "--no-eval"])
    assert summary["status"] == "finished" and summary["output_dir"] == str(tmp_path / "replay")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "replay" / "info" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-4, 1e-5])  # StepLR(1, 0.1) stepped before each epoch, as there
    assert summary["best"]["metric"] == "val_loss"


@pytest.mark.slow
def test_original_argv_on_the_command_line(tiny_project, tmp_path):
    """The argv as the original dashboard passed it, to ``python custom_net/train.py``, on a machine without CUDA."""
    _, argv = original_run_folder(tmp_path / "artifacts", tiny_project, epochs=1)
    result = run_cli(*argv, "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA device is available; training on the CPU" in result.stderr
    assert (tmp_path / "artifacts" / "checkpoints" / "model_001_best.pth").is_file()


def test_help_lists_the_original_flags():
    text = build_parser().format_help()
    section = text.split("the original app's flags")[1]
    for flag in ("--classes-path", "--train-set-path", "--val-set-path", "--checkpoints-dir", "--train-vis-items-path",
                 "--val-vis-items-path", "--sly"):
        assert flag in section, flag


@pytest.mark.parametrize("argv, message", [
    (["--classes", "disk", "--classes-path", "x.json"], "--classes or --classes-path"),
    (["--output", "a", "--checkpoints-dir", "b/checkpoints"], "--output or --checkpoints-dir"),
    (["--classes-path", "missing.json"], "--classes-path: missing.json not found"),
    (["--milestones", "[5, x]"], "--milestones"),
])
def test_original_flags_bad_input(argv, message):
    with pytest.raises(ArgsError, match=re.escape(message)):
        parse_config(["--project-dir", ".", *argv])


def test_vis_items_outside_their_split_are_refused(tiny_project, tmp_path):
    info, argv = original_run_folder(tmp_path / "artifacts", tiny_project)
    entries = json.loads((info / "val_set.json").read_text())
    (info / "train_vis_items.json").write_text(json.dumps(entries[:1]))  # a validation item
    with pytest.raises(data.DataError, match="--train-vis-items-path .* not in the train set"):
        main([*argv, "--reporter", "none"])
    assert not (tmp_path / "artifacts" / "checkpoints").exists()  # refused before anything was written


# ---- the original Serve UNet on our runs ----------------------------------------------------------

def original_serve(run_dir: Path, checkpoint: Path, image: np.ndarray) -> list[sly.Label]:
    """What the original Serve UNet does with a run (supervisely/serve/src/unet_model.py): an ObjClass from
    each model_classes.json entry, the architecture from ui_state.json with a strict load_state_dict, the
    image resized to imgSize, the argmax resized back, and the SDK's SemanticSegmentation labels from it."""
    ui_state = json.loads((run_dir / "info" / "ui_state.json").read_text())
    model_classes = json.loads((run_dir / "info" / "model_classes.json").read_text())
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection([sly.ObjClass.from_json(c) for c in model_classes]))
    model = model_list[ui_state["selectedModel"]]["class"](num_classes=len(model_classes))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    model.eval()
    width, height = ui_state["imgSize"]["width"], ui_state["imgSize"]["height"]
    x = cv2.resize(image, (width, height)).astype(np.float32) / 255
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        output = model(torch.from_numpy(x.transpose(2, 0, 1)).float()[None])
    indices = output.numpy().argmax(axis=1)[0]
    mask = cv2.resize(indices, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    server = types.SimpleNamespace(get_classes=lambda: [c["title"] for c in model_classes], model_meta=meta)
    return SemanticSegmentation._create_label(server, PredictionSegmentation(mask))


def with_alpha_mask_class(source: Path, target: Path) -> Path:
    """``source`` (bitmap, polygon and rectangle classes) plus an alpha-mask class labelled on every image."""
    shutil.copytree(source, target)
    project = sly.Project(str(target), sly.OpenMode.READ)
    glow = sly.ObjClass("glow", sly.AlphaMask, color=[250, 250, 0])
    meta = project.meta.add_obj_class(glow)
    project.set_meta(meta)
    for dataset in project.datasets:
        for name in dataset.get_items_names():
            ann = dataset.get_ann(name, meta)
            alpha = np.zeros(ann.img_size, np.uint8)
            alpha[: ann.img_size[0] // 4, : ann.img_size[1] // 3] = 200
            dataset.set_ann(name, ann.add_label(sly.Label(sly.AlphaMask(alpha), glow)))
    return target


def test_original_serve_unet_loads_our_run_of_every_shape(tiny_project, tmp_path):
    project_dir = with_alpha_mask_class(tiny_project, tmp_path / "project")
    shapes = {c.name: c.geometry_type for c in data.open_project(project_dir).meta.obj_classes}
    assert {shapes["triangle"], shapes["box"], shapes["glow"]} == {sly.Polygon, sly.Rectangle, sly.AlphaMask}
    summary = main(["--project-dir", str(project_dir), "--model", "UNet", "--input-height", "64", "--input-width", "64",
                    "--epochs", "1", "--batch-size", "4", "--encoder-weights", "none", "--reporter", "none", "--no-eval",
                    "--output", str(tmp_path / "run")])
    run = Path(summary["output_dir"])
    saved = json.loads((run / "info" / "model_classes.json").read_text())
    assert [c["title"] for c in saved] == ["__bg__", "disk", "triangle", "box", "glow"]
    assert {c["shape"] for c in saved} == {"bitmap"}
    image = sly.image.read(data.list_items(data.open_project(project_dir))[0].image_path)
    labels = original_serve(run, Path(summary["last_checkpoint"]), image)
    assert labels and all(isinstance(label.geometry, sly.Bitmap) for label in labels)
    assert sum(label.geometry.data.sum() for label in labels) == image.shape[0] * image.shape[1]  # one label per class
    # What the SDK refuses, and what runs of this app wrote before: a Bitmap label of a polygon class.
    with pytest.raises(RuntimeError, match="geometry type"):
        sly.Label(sly.Bitmap(np.ones((2, 2), bool)), sly.ObjClass("triangle", sly.Polygon))


# ---- --custom-weights by class name ---------------------------------------------------------------

def _head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from custom_net.custom_weights import class_dimensions
    return {k: model.state_dict()[k].clone() for k in class_dimensions(model)}


@pytest.mark.parametrize("name", sorted(model_list))
def test_custom_weights_keep_each_class_by_name(name, tmp_path):
    """A checkpoint of the original app (classes a, b, __bg__) into a run with __bg__, b, a and a new class c:
    channel by channel, each class keeps its own weights, c starts untrained, the body is the checkpoint's."""
    torch.manual_seed(1)
    old = build_model(name, 3, "none")
    run = tmp_path / "original_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "info").mkdir()
    torch.save(old.state_dict(), run / "checkpoints" / "model_010_best.pth")
    (run / "info" / "model_classes.json").write_text(json.dumps(
        [sly.ObjClass(t, sly.Bitmap).to_json() for t in ("a", "b", "__bg__")]))
    torch.manual_seed(2)
    new = build_model(name, 4, "none")
    fresh = _head(new)
    reporter = Messages()
    load_custom_weights(new, str(run / "checkpoints" / "model_010_best.pth"), ["__bg__", "b", "a", "c"], reporter.message)
    from custom_net.custom_weights import class_dimensions
    dims = class_dimensions(new)
    assert dims  # every architecture has a head
    state, old_state = new.state_dict(), old.state_dict()
    for key, dim in dims.items():
        for ours, theirs in ((0, 2), (1, 1), (2, 0)):
            assert torch.equal(state[key].select(dim, ours), old_state[key].select(dim, theirs)), (key, ours)
        assert torch.equal(state[key].select(dim, 3), fresh[key].select(dim, 3)), key
    body = [k for k in state if k not in dims]
    assert all(torch.equal(state[k], old_state[k]) for k in body)
    assert any("keeps the weights of __bg__, b, a; new, untrained: c" in text for _, text in reporter.messages)


def test_custom_weights_without_a_common_class_start_the_head_untrained(tmp_path):
    torch.manual_seed(1)
    old = build_model("UNet", 3, "none")
    torch.save(old.state_dict(), tmp_path / "model.pth")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["x", "y", "__background__"]))
    new = build_model("UNet", 3, "none")
    fresh = _head(new)
    reporter = Messages()
    load_custom_weights(new, str(tmp_path / "model.pth"), ["__bg__", "a", "b"], reporter.message, str(classes))
    assert all(torch.equal(new.state_dict()[k], v) for k, v in fresh.items())
    assert any(level == "warning" and "none of its classes" in text for level, text in reporter.messages)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(["x", "y"]))
    with pytest.raises(ValueError, match="lists 2 classes, but the head of"):
        load_custom_weights(new, str(tmp_path / "model.pth"), ["__bg__", "a", "b"], reporter.message, str(wrong))


def test_custom_weights_from_an_original_run_folder_in_training(original_run, tiny_project, tmp_path):
    """train.py --custom-weights with a checkpoint of the original's layout (__bg__ last): found beside its
    run's info/, mapped into this run's order (__bg__ first)."""
    folder = original_run[0]
    checkpoint = folder / "checkpoints" / "model_002_last.pth"
    reporter = Messages()
    summary = main(["--project-dir", str(tiny_project), "--model", "UNet", "--input-height", "64", "--input-width", "64",
                    "--epochs", "1", "--batch-size", "4", "--reporter", "none", "--no-eval", "--lr", "1e-9",
                    "--custom-weights", str(checkpoint), "--output", str(tmp_path / "run")], reporter=reporter)
    assert any("keeps the weights of __bg__, disk, triangle; new, untrained: box" in text for _, text in reporter.messages)
    old, new = torch.load(checkpoint), torch.load(summary["last_checkpoint"])
    assert torch.allclose(new["conv_final.bias"][:3], old["conv_final.bias"][[2, 0, 1]], atol=1e-6)


# ---- --preset original = the original dashboard as it starts -----------------------------------------

# The original dashboard's initial state as the argv its step 07 built from it (step06_hyperparameters.py:
# 10 epochs, batch 8, 256x256, Adam 1e-3, weight decay 1e-4, lrPolicyEnabled False, max 3 checkpoints,
# 1 train / 1 val visualisation; step04_augs.py: augmentations on, template "Only Color" = seg_simple).
ORIGINAL_DASHBOARD_ARGV = ["--epochs", "10", "--input-height", "256", "--input-width", "256", "--batch-size", "8",
                           "--optimizer", "Adam", "--lr", "0.001", "--momentum", "0.9", "--weight-decay", "0.0001",
                           "--lr-schedule", "", "--val-interval", "1", "--metrics-period", "10",
                           "--checkpoint-interval", "1", "--save-last", "--save-best", "--max-keep-ckpts", "3",
                           "--sly-augs-path", "seg_simple", "--vis-count", "1"]
# What it did with no flag for it (custom_net/utils.py, loss.py): LossMulti = (1-w) NLL - w log Jaccard,
# scheduler.step() before each epoch, no clipping, layers' own init, BatchNorm's default momentum, no BatchNorm
# in UNet / UNet11 / UNet16, the best checkpoint by validation loss, a preview every max(1, epochs // 20) epochs.
ORIGINAL_BEHAVIOUR = {"loss": "jaccard_nll", "jaccard_weight": 0.5, "scheduler_order": "before", "clip_grad_norm": 0.0,
                      "init": "original", "bn_momentum": 0.1, "train_batchnorm": "off", "decoder_lr_factor": 1.0,
                      "best_metric": "val_loss", "vis_interval": 1}


def _readme_preset_table() -> dict[str, str]:
    """{flag: value} from the README's table of --preset original."""
    text = (REPO / "README.md").read_text()
    section = text.split("### `--preset original`: the original dashboard's defaults")[1].split("\n#")[0]
    rows = re.findall(r"^\|[^|]*\|[^|]*\| `(--[a-z-]+)(?: ([^`]*))?` \|", section, re.M)
    return {flag: value for flag, value in rows}


def test_preset_original_is_the_original_dashboards_start():
    preset = parse_config(["--project-dir", ".", "--preset", "original"]).as_dict()
    as_original_ran = parse_config(["--project-dir", ".", *ORIGINAL_DASHBOARD_ARGV]).as_dict()
    for dest in (flag[2:].replace("-", "_") for flag in ORIGINAL_DASHBOARD_ARGV if flag.startswith("--")):
        assert preset[dest] == as_original_ran[dest], dest
    assert {k: preset[k] for k in ORIGINAL_BEHAVIOUR} == ORIGINAL_BEHAVIOUR
    # Given flags still win.
    assert parse_config(["--project-dir", ".", "--preset", "original", "--epochs", "3"]).epochs == 3


def test_readme_states_the_preset_flag_by_flag():
    table = _readme_preset_table()
    stated = parse_config(["--project-dir", ".", *[part for flag, value in table.items()
                                                  for part in ([flag, value] if value else [flag])]])
    preset = parse_config(["--project-dir", ".", "--preset", "original"])
    dests = {flag[2:].replace("-", "_").removeprefix("no_") for flag in table}
    assert dests >= {flag[2:].replace("-", "_") for flag in ORIGINAL_DASHBOARD_ARGV if flag.startswith("--")}
    assert dests >= set(ORIGINAL_BEHAVIOUR)
    for dest in dests:
        assert getattr(stated, dest) == getattr(preset, dest), dest


# ---- tag splits ------------------------------------------------------------------------------------

def test_tag_split_follows_the_original_rule(tiny_project, tmp_path):
    """The SDK's get_train_val_splits_by_tag, which the original used: an item with both tags is in both sets;
    one tag name for both sides puts every tagged item in both."""
    project_dir = tmp_path / "project"
    shutil.copytree(tiny_project, project_dir)
    project = sly.Project(str(project_dir), sly.OpenMode.READ)
    dataset = project.datasets.get("ds_a")
    name = sorted(dataset.get_items_names())[0]
    ann = dataset.get_ann(name, project.meta)
    tags = {t.name for t in ann.img_tags}
    other = "val" if "train" in tags else "train"
    dataset.set_ann(name, ann.add_tag(sly.Tag(project.meta.get_tag_meta(other))))
    project = data.open_project(project_dir)
    items = data.list_items(project)
    train, val = data.split_by_tags(items, project.meta, "train", "val")
    sdk_train, sdk_val = sly.Project.get_train_val_splits_by_tag(str(project_dir), "train", "val")
    assert sorted((i.dataset_name, i.item_name) for i in train) == sorted((i.dataset_name, i.name) for i in sdk_train)
    assert sorted((i.dataset_name, i.item_name) for i in val) == sorted((i.dataset_name, i.name) for i in sdk_val)
    both = [i for i in train if i in val]
    assert [(i.dataset_name, i.item_name) for i in both] == [("ds_a", name)]
    same_train, same_val = data.split_by_tags(items, project.meta, "train", "train")
    assert same_train == same_val and len(same_val) == len(train)
    reporter = Messages()
    main(["--project-dir", str(project_dir), "--split", "tags", "--train-tag", "train", "--val-tag", "train",
          "--model", "UNet", "--input-height", "64", "--input-width", "64", "--epochs", "1", "--encoder-weights", "none",
          "--reporter", "none", "--no-eval", "--output", str(tmp_path / "run")], reporter=reporter)
    assert any("in both the training and the validation set" in text for _, text in reporter.messages)


# ---- --sly ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sly_reports_progress_to_the_platform_task(tiny_project, tmp_path):
    """In a platform task the SDK's progress events and the metrics are JSON lines on the SDK logger's stream,
    which the agent reads, each whole (no console progress bar breaks into them)."""
    env = {**os.environ, "TASK_ID": "42", "SERVER_ADDRESS": "http://127.0.0.1:9", "API_TOKEN": "x" * 128,
           "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "custom_net" / "train.py"), "--project-dir", str(tiny_project),
                             "--model", "UNet", "--input-height", "64", "--input-width", "64", "--epochs", "2",
                             "--encoder-weights", "none", "--no-eval", "--sly", "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]  # every line is one event
    epochs = [e for e in events if e.get("message") == "progress" and e.get("subtask") == "Training: epochs"]
    assert [(e["current"], e["total"]) for e in epochs][-1] == (2, 2)
    assert any(e.get("message") == "Train metrics" and "loss" in e for e in events)
    assert any(e.get("message") == "Val metrics" and "mean_fg_iou" in e for e in events)
    assert any(e.get("message") == "Training finished" for e in events)
