"""The train dashboard in local mode, driven through its HTTP routes as the page drives it:
one app process (see dashboard_harness) on ../shared/data/lemons_annotated, tests in file order."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from custom_net.report import METRIC_LABELS
from custom_net.model import model_list
from custom_net.config import build_parser, parse_config
from tests.dashboard_harness import DashboardServer, PushListener

pytestmark = pytest.mark.slow  # starts processes or servers

TINY = {"s06_input_height": {"value": "64"}, "s06_input_width": {"value": "64"}, "s06_epochs": {"value": "2"},
        "s06_batch_size": {"value": "4"}, "s06_gpu_id": {"value": ["cpu"]}, "s06_vis_count": {"value": "2"}}


@pytest.fixture(scope="module")
def app(lemons_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash_local")
    server = DashboardServer({"UNET_PROJECT_DIR": str(lemons_dir), "UNET_RESULTS_DIR": str(tmp / "results"),
                              "SLY_APP_DATA_DIR": str(tmp / "data")}, tmp / "app.log")
    server.results = tmp / "results"
    server.tmp = tmp
    yield server
    server.close()


def locked(app, step: int, state: dict | None = None) -> bool:
    disabled = (state or app.state())[f"s{step:02d}_card"]["disabled"]  # Card.lock() stores {disabled, message}
    return disabled["disabled"] if isinstance(disabled, dict) else bool(disabled)


def steps_03_to_05(app):
    app.click("s03_apply", s03_table={"checkboxes": [True, True]})
    app.click("s04_apply", s04_mode={"value": "template"}, s04_template={"value": "seg_simple"})
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "none"})
    for step in range(3, 6):
        assert app.status(step)[0] == "success", (step, app.status(step))


def test_steps_unlock_in_order_and_refuse_early_clicks(app):
    assert not locked(app, 1) and all(locked(app, n) for n in range(2, 8))
    app.click("s03_apply")
    assert app.status(3) == ("error", "Complete the previous step first.")
    app.click("s01_load")
    assert app.status(1)[0] == "success"
    summary = app.text("s01_summary")
    assert "lemons_annotated" in summary and "1 dataset(s) (ds1)" in summary and "6 image(s)" in summary
    assert "2 class(es) (kiwi, lemon)" in summary
    assert not locked(app, 2) and locked(app, 3)
    app.click("s01_load")  # a done step does not run again
    assert "Restart from this step" in app.status(1)[1]


def test_splits_show_counts_and_refuse_empty_sets(app):
    app.click("s02_apply", s02_method={"value": "random"}, s02_val_percent={"value": 99})
    assert app.status(2) == ("error", "random split of 6 item(s) at 99.0%: the training set is empty")
    app.click("s02_apply", s02_method={"value": "tags"})  # lemons carry no tags
    assert app.status(2)[0] == "error" and "training set is empty" in app.status(2)[1]
    app.click("s02_apply", s02_method={"value": "datasets"}, s02_train_datasets={"value": ["ds1"]},
              s02_val_datasets={"value": []})
    assert app.status(2) == ("error", "choose at least one training and one validation dataset")
    assert locked(app, 3)
    app.click("s02_apply", s02_method={"value": "random"}, s02_val_percent={"value": 34})
    assert app.status(2) == ("success", "Training set: 4 image(s), validation set: 2 image(s).")
    assert not locked(app, 3)


def test_classes_table_and_selection(app):
    table = app.data()["s03_table"]
    rows = {row[0]["data"]: row for row in table["table_data"]}
    assert set(rows) == {"kiwi", "lemon"}
    assert rows["kiwi"][1]["data"] == "bitmap" and rows["kiwi"][0]["color"] == "#FF0000"
    assert [c["name"] for c in rows["lemon"][2:]] == ["ITEMS COUNT", "OBJECTS COUNT"]
    assert "__bg__" in app.text("s03_notes")
    app.click("s03_apply", s03_table={"checkboxes": [False, False]})
    assert app.status(3) == ("error", "select at least one class")
    app.click("s03_apply", s03_table={"checkboxes": [True, True]})
    assert app.status(3)[0] == "success" and "kiwi, lemon" in app.status(3)[1]


def test_augmentations_preview_and_bad_config(app, tmp_path):
    flip = tmp_path / "flip.json"  # always changes the image: the preview must show it
    flip.write_text(json.dumps({"pipeline": [{"category": "flip", "name": "Fliplr", "params": {"p": 1.0}}]}))
    app.click("s04_preview", s04_mode={"value": "custom"}, s04_custom_path={"value": str(flip)})
    assert app.status(4)[0] == "info" and app.status(4)[1].startswith("Preview: ds1/")
    data = app.data()
    urls = [data[w]["url"] for w in ("s04_original", "s04_augmented", "s04_overlay")]
    assert all(u.startswith("data:image/png;base64,") for u in urls) and len(set(urls)) == 3
    shown = {app.status(4)[1] for _ in range(6) if app.click("s04_preview") is None}
    assert len(shown) > 1  # re-roll: another random image
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    app.click("s04_apply", s04_mode={"value": "custom"}, s04_custom_path={"value": str(bad)})
    assert app.status(4)[0] == "error" and "not valid JSON" in app.status(4)[1]
    app.click("s04_apply", s04_mode={"value": "custom"}, s04_custom_path={"value": ""})
    assert app.status(4) == ("error", "enter the path of the augmentation config")
    app.click("s04_apply", s04_mode={"value": "template"}, s04_template={"value": "seg_simple"})
    assert app.status(4)[0] == "success"


def test_model_choices(app):
    assert [row[0] for row in app.data()["s05_model"]["raw_rows_data"]] == list(model_list)
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "imagenet"})
    assert app.status(5)[0] == "error" and "no pretrained encoder" in app.status(5)[1]
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "custom"},
              s05_custom_path={"value": "/nonexistent/model.pth"})
    assert app.status(5) == ("error", "custom weights /nonexistent/model.pth not found")
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "none"})
    assert app.status(5) == ("success", "UNet, from scratch.")


def test_hyperparameters_are_validated_on_the_widgets(app):
    app.click("s06_apply", s06_input_height={"value": "100"}, s06_lr={"value": "fast"}, s06_epochs={"value": "0"},
              s06_optimizer={"value": "Adam"})
    data = app.data()
    assert app.status(6)[0] == "error" and "3 value(s) need fixing" in app.status(6)[1]
    assert "multiple of 32" in data["s06_err_input_height"]["text"] and not data["s06_err_input_height"]["hide"]
    assert data["s06_err_lr"]["text"] == "not a valid number: 'fast'"
    assert data["s06_err_epochs"]["text"] == "must be >= 1, got 0"
    assert data["s06_err_batch_size"]["hide"]
    app.click("s06_apply", **TINY, s06_lr={"value": "0.001"}, s06_num_workers={"value": "-1"})
    assert app.data()["s06_err_num_workers"]["text"] == "must be 'auto' or >= 0, got -1"
    app.click("s06_apply", **TINY, s06_num_workers={"value": "auto"}, s06_checkpoint_interval={"value": "-1"})
    assert app.status(6) == ("error", "--checkpoint-interval must be >= 0")  # a rule of parse_args, not of one type
    assert locked(app, 7)


def test_device_selector(app):
    """cpu plus every GPU torch sees (here: none), one or several; several GPUs never with the CPU."""
    items = app.data()["s06_gpu_id"]["items"]
    assert [item["value"] for item in items] == ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert app.state()["s06_gpu_id"]["value"] == ["cuda:0" if torch.cuda.is_available() else "cpu"]
    for selected, message in (([], "choose the CPU or one or more GPUs"),
                              (["cpu", "cuda:0"], "the CPU cannot be combined with GPUs: choose the CPU alone, or GPUs only")):
        app.click("s06_apply", **{**TINY, "s06_gpu_id": {"value": selected}})
        assert app.data()["s06_err_gpu_id"]["text"] == message and app.status(6)[0] == "error"
    assert locked(app, 7)


def test_recipe_fills_the_fields_it_decides(app):
    """"original app" sets what --preset original sets; "defaults" puts the engine defaults back;
    fields no recipe decides keep what the user typed."""
    app.post("s06_preset/value_changed", s06_preset={"value": "original"}, s06_input_height={"value": "96"},
             s06_seed={"value": "7"})
    state = app.state()
    assert state["s06_epochs"]["value"] == "10" and state["s06_lr"]["value"] == "0.001"
    assert state["s06_batch_size"]["value"] == "8"
    assert state["s06_clip_grad_norm"]["value"] == "0.0" and state["s06_max_keep_ckpts"]["value"] == "3"
    assert (state["s06_loss"]["value"], state["s06_lr_schedule"]["value"], state["s06_scheduler_order"]["value"],
            state["s06_init"]["value"], state["s06_best_metric"]["value"]) == ("jaccard_nll", "none", "before",
                                                                              "original", "val_loss")
    assert state["s06_input_height"]["value"] == "256" and state["s06_seed"]["value"] == "7"
    assert state["s06_train_batchnorm"]["value"] == "off"
    app.post("s06_preset/value_changed", s06_preset={"value": "default"})
    state = app.state()
    assert state["s06_train_batchnorm"]["value"] == "auto"
    assert (state["s06_epochs"]["value"], state["s06_batch_size"]["value"], state["s06_loss"]["value"],
            state["s06_lr_schedule"]["value"], state["s06_init"]["value"]) == ("20", "auto", "smooth_jaccard_nll",
                                                                               "cosine", "lsuv")
    assert (state["s06_lr"]["value"], state["s06_clip_grad_norm"]["value"]) == ("0.003", "1.0")


def test_learning_rates_follow_the_model(app):
    """Step 05's architecture sets step 06's learning rate and decoder factor (AlbuNet's decoder trains at
    0.33x by default), unless the user typed their own."""
    def choose(model, **state_patch):
        app.click("s05_restart", **state_patch)
        app.click("s05_apply", s05_model={"selectedRow": list(model_list).index(model)}, s05_weights={"value": "none"})
        assert app.status(5)[0] == "success"
        state = app.state()
        return state["s06_lr"]["value"], state["s06_decoder_lr_factor"]["value"]

    assert choose("AlbuNet") == ("0.003", "0.33")
    assert choose("LinkNet34") == ("0.003", "1.0")
    assert choose("AlbuNet", s06_decoder_lr_factor={"value": "0.5"}) == ("0.003", "0.5")
    assert choose("UNet", s06_decoder_lr_factor={"value": ""}, s06_lr={"value": "0.0005"}) == ("0.0005", "1.0")


def test_full_run_to_the_end(app):
    state = app.state()
    assert state["s06_eval"]["value"] is True and state["s06_speed_test"]["value"] is True  # on by default
    app.click("s06_apply", **TINY, s06_num_workers={"value": "0"}, s06_checkpoint_interval={"value": "1"},
              s06_experiment={"value": "full"})
    assert app.status(6)[0] == "success", app.status(6)
    page = PushListener(app)  # the live page: pushed patches, not only what /sly/data answers
    app.click("s07_train")
    app.click("s07_train")  # a second click while the first run trains
    assert app.status(7) == ("error", "Training is already running: stop it first.")
    assert app.wait_phase() == "finished", app.status(7)
    page.close()
    pushed = {path.split("/")[1] for path in page.paths()}
    assert {"s07_epochs", "s07_iterations", "s07_loss", "s07_lr", "s07_metrics", "s07_gallery", "s07_phase"} <= pushed
    data = app.data()
    run_dir = app.results / "full"
    assert data["s07_location"]["text"] == f"Artifacts: {run_dir}"
    assert data["s07_epochs"]["n"] == 2 and data["s07_epochs"]["percent"] == 100
    assert data["s07_iterations"]["percent"] == 100
    series = {p: {s["name"]: s["data"] for s in data[p]["series"]} for p in ("s07_lr", "s07_loss", "s07_metrics")}
    assert len(series["s07_lr"]["lr"]) >= 2 and len(series["s07_loss"]["train"]) >= 2
    assert [x for x, _ in series["s07_loss"]["val"]] == [1, 2]
    assert [x for x, _ in series["s07_metrics"]["IoU"]] == [1, 2] and len(series["s07_metrics"]["Dice"]) == 2
    assert all(0 <= y <= 1 for _, y in series["s07_metrics"]["IoU"])
    assert "Best mean_fg_iou" in data["s07_results"]["text"]
    # gallery: 2 train + 2 val previews of the newest epoch; the selector lists the epochs with previews
    assert [len(col) for col in data["s07_gallery"]["content"]["layout"]] == [2, 2]
    epochs = [item["value"] for item in data["s07_preview_epoch"]["items"]]
    assert epochs == [1, 2]
    app.post("s07_preview_epoch/value_changed", s07_preview_epoch={"value": 1})
    titles = [a["title"] for a in app.data()["s07_gallery"]["content"]["annotations"].values()]
    assert len(titles) == 4 and sum(t.startswith("val: ") for t in titles) == 2
    # the artifact tree
    for name in ("checkpoints/model_002_last.pth", "checkpoints/train_args.json", "info/model_classes.json",
                 "info/metrics.jsonl", "info/summary.json", "info/augs_config.json", "info/charts/loss.png",
                 "info/train_vis_items.json", "info/previews/val_epoch_002.png"):
        assert (run_dir / name).is_file(), name
    ui_state = json.loads((run_dir / "info" / "ui_state.json").read_text())
    assert ui_state["selectedModel"] == "UNet" and ui_state["imgSize"] == {"width": 64, "height": 64}
    assert ui_state["widgets"]["s06_epochs"]["value"] == "2"
    assert ui_state["settings"]["classes"] == ["kiwi", "lemon"]
    torch.load(run_dir / "checkpoints" / "model_002_last.pth", weights_only=True)
    summary = json.loads((run_dir / "info" / "summary.json").read_text())
    assert summary["status"] == "finished"
    # the end-of-training evaluation: headline metrics and where the report is
    for name in ("eval/report.html", "eval/metrics.json", "eval/speed.json"):
        assert (run_dir / name).is_file(), name
    evaluation = data["s07_eval"]
    assert not evaluation["hide"] and evaluation["status"] == "text"
    headline = summary["eval"]["headline"]
    assert f"{METRIC_LABELS['mean_fg_iou']}: <b>{headline['mean_fg_iou']:.4f}</b>" in evaluation["text"]
    assert f"{METRIC_LABELS['pixel_accuracy']}: <b>{headline['pixel_accuracy']:.4f}</b>" in evaluation["text"]
    assert evaluation["text"].endswith(f"Report: {run_dir}/eval/report.html")


def test_stop_ends_cleanly_with_the_last_checkpoint(app):
    app.click("s06_restart")
    app.click("s06_apply", **{**TINY, "s06_epochs": {"value": "40"}}, s06_experiment={"value": "stopped"})
    assert app.status(6)[0] == "success", app.status(6)
    app.click("s07_train")
    app.wait_phase(lambda phase: phase != "running" or app.data()["s07_epochs"]["n"] >= 1, timeout=120)
    app.click("s06_restart")  # not while training
    assert app.status(6) == ("error", "Training is running: stop it before restarting a step.")
    app.click("s07_stop")
    assert app.wait_phase() == "stopped", app.status(7)
    summary = json.loads((app.results / "stopped" / "info" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["last_epoch"] < 40
    assert Path(summary["last_checkpoint"]).is_file()
    assert app.data()["s07_location"]["text"] == f"Artifacts: {app.results / 'stopped'}"
    assert app.data()["s07_eval"]["text"] == "Evaluation skipped: the run was stopped before its last epoch."
    assert not (app.results / "stopped" / "eval").exists()
    app.click("s07_stop")
    assert app.status(7) == ("error", "Nothing to stop: training is not running.")


def test_engine_errors_at_train_time_are_shown(app, tmp_path):
    """Input only the engine can judge (here: custom weights that are no state dict) fails the run
    with the engine's message; the app stays up and can train again after a restart."""
    garbage = tmp_path / "model_001.pth"
    garbage.write_bytes(b"not a checkpoint")
    app.click("s05_restart")
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "custom"},
              s05_custom_path={"value": str(garbage)})
    assert app.status(5) == ("success", "UNet, custom weights.")
    app.click("s06_apply", **TINY, s06_experiment={"value": "broken"})
    app.click("s07_train")
    assert app.wait_phase() == "failed"
    assert app.status(7) == ("error", f"--custom-weights: {garbage} is not a PyTorch state dict")
    assert not (app.results / "broken").exists()  # nothing written for a run that could not start
    assert not app.data()["s07_train"]["disabled"]


def test_restart_from_an_early_step_locks_the_later_ones(app):
    app.click("s02_restart")
    state = app.state()
    assert not locked(app, 2, state) and all(locked(app, n, state) for n in range(3, 8))
    app.click("s02_apply", s02_method={"value": "random"}, s02_val_percent={"value": 50})
    assert app.status(2) == ("success", "Training set: 3 image(s), validation set: 3 image(s).")
    assert not locked(app, 3) and locked(app, 4)


def _non_default(action):
    """A value other than the default that the option accepts."""
    if action.choices is not None:
        return next(c for c in action.choices if c != action.default)
    if isinstance(action.default, bool):
        return not action.default
    return {"input_height": 96, "input_width": 128, "class_weights": [0.5, 1.0, 2.0], "milestones": [3, 7],
            "gpu_id": "cpu", "num_workers": 1, "lr": 0.005, "min_lr": 1e-5, "jaccard_weight": 0.25, "max_keep_ckpts": 3,
            "warmup_epochs": 2.0, "bn_momentum": 0.5, "batch_size": 3, "decoder_lr_factor": 0.25}.get(action.dest, (action.default or 0) + 1 if isinstance(action.default, (int, float))
                                      and not isinstance(action.default, bool) else None)


def test_every_widget_value_lands_in_the_argv(app):
    """(Last: it leaves odd settings.) Restart from step 06, set every hyperparameter widget to a non-default value; the command the
    card shows must parse (with train.py's parser) back to exactly those values, and every engine
    option must be either a widget of step 06 or set by an earlier step."""
    steps_03_to_05(app)  # the restart test left step 02 done
    state = app.state()
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    widgets = {dest for dest in actions if f"s06_{dest}" in state}
    earlier = {"project_dir", "split", "val_percent", "train_datasets", "val_datasets", "train_tag", "val_tag",
               "untagged", "classes", "sly_augs_path", "model", "encoder_weights", "custom_weights"}
    app_owned = {"output", "reporter", "cache_dir", "demo", "train_args", "resume", "train_set", "val_set",
                 "custom_weights_classes", "classes_path", "checkpoints_dir", "train_vis_items_path",
                 "val_vis_items_path", "sly"}
    assert set(actions) == widgets | earlier | app_owned, set(actions) - widgets - earlier - app_owned
    wanted, patch = {}, {}
    for dest in sorted(widgets):
        value = wanted[dest] = _non_default(actions[dest])
        assert value is not None, dest
        if dest == "gpu_id":  # the device selector: a list
            patch[f"s06_{dest}"] = {"value": [value]}
        elif isinstance(value, bool):
            patch[f"s06_{dest}"] = {"value": value}
        elif isinstance(value, list):
            patch[f"s06_{dest}"] = {"value": " ".join(map(str, value))}
        elif actions[dest].choices is not None:
            patch[f"s06_{dest}"] = {"value": value}
        else:
            patch[f"s06_{dest}"] = {"value": str(value)}
    app.click("s06_apply", **patch, s06_experiment={"value": "roundtrip"})
    assert app.status(6)[0] == "success", (app.status(6), {k: v for k, v in app.data().items() if "err" in k and not v["hide"]})
    command = shlex.split(app.text("s07_command"))
    assert command[:2] == ["python", "custom_net/train.py"]
    args = parse_config(command[2:]).as_dict()
    for dest, value in wanted.items():
        assert args[dest] == value, dest
    assert args["classes"] == ["kiwi", "lemon"] and args["model"] == "UNet" and args["sly_augs_path"] == "seg_simple"
    assert args["split"] == "random" and args["val_percent"] == 50.0
    assert args["output"] == str(app.results / "roundtrip") and args["project_dir"].endswith("lemons_annotated")
