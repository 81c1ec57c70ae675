"""End-to-end training: the artifact tree, repeatability, resume, stop, non-finite loss, inference.

One CLI run (module fixture ``run_dir``) is shared by most tests; the other runs start from its
train_args.json in-process, so every run here trains the same model on the same data with the
same seed and must end in bitwise-identical weights (``--amp off``; CPU kernels are deterministic).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervisely as sly
import torch
from torch.utils.data import DataLoader

from tests.helpers import TINY_TRAIN_ARGS, assert_same_weights, checkpoints_of, metrics_of, run_cli
from custom_net import augs, sly_seg_dataset as data
from custom_net.inference import convert_prediction_to_sly_format, inference, load_trained_model, predict_image
from custom_net.loss import build_loss
from custom_net.reporting import Reporter
from custom_net.config import AUTO_BATCH_SIZES, ArgsError, parse_config
from custom_net.model import build_model, model_list
from custom_net.train import main
from custom_net.train_norms import add_training_norms, deployable_state_dict
from custom_net.epoch import NonFiniteLoss
from custom_net.validation import validate

pytestmark = pytest.mark.slow  # starts processes or servers

EPOCHS = 4
AUGS = "seg_simple_rotate_crop_flipLR_flipUD"
CLASSES = ["__bg__", "disk", "triangle", "box"]  # build_demo_project's classes, in meta order
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_args(**overrides) -> list[str]:
    args = list(TINY_TRAIN_ARGS)
    for flag, value in overrides.items():
        flag = "--" + flag.replace("_", "-")
        i = args.index(flag)
        args[i + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def run_dir(tiny_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    # --init he: test_int8_runtime_predicts_like_float32 counts every pixel, and this barely trained UNet
    # (4 epochs at 64x64) agreed with float32 on 0.914 of them when lsuv-scaled without BatchNorm. From
    # scratch it now trains with BatchNorm (--train-batchnorm auto), where lsuv leaves the layers as He made them.
    result = run_cli("--project-dir", str(tiny_project), *_tiny_args(epochs=EPOCHS), "--init", "he",
                     "--checkpoint-interval", "1", "--max-keep-ckpts", "2", "--sly-augs-path", AUGS,
                     "--amp", "off", "--num-workers", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _last(run: Path) -> dict[str, torch.Tensor]:
    (path,) = (run / "checkpoints").glob("model_*_last.pth")
    return torch.load(path)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _args_from(run: Path, *extra: str) -> list[str]:
    return ["--train-args", str(run / "checkpoints" / "train_args.json"), *extra]


def _best_epoch(run: Path) -> int:
    (best,) = (run / "checkpoints").glob("model_*_best.pth")
    return int(best.name.split("_")[1])


# ---- 1. the artifact tree ---------------------------------------------------------------

def test_artifact_tree_is_exactly_the_contract(run_dir):
    best = _best_epoch(run_dir)
    epochs = range(1, EPOCHS + 1)
    expected = {
        "checkpoints/model_003.pth", "checkpoints/model_004.pth",  # --max-keep-ckpts 2
        f"checkpoints/model_{best:03d}_best.pth", "checkpoints/model_004_last.pth",
        "checkpoints/train_args.json", "checkpoints/resume_state.pt",
        "info/augs_config.json", "info/augs_preview.py", "info/model_classes.json", "info/ui_state.json",
        "info/train_set.json", "info/val_set.json", "info/train_vis_items.json", "info/val_vis_items.json",
        "info/metrics.jsonl", "info/summary.json", "info/calibration_images.npz",
        "info/charts/loss.png", "info/charts/lr.png", "info/charts/metrics.png",
        *(f"info/previews/{split}_epoch_{e:03d}.png" for split in ("train", "val") for e in epochs),
        # --eval, --speed-test (on by default): the best checkpoint on the 2 validation items
        *(f"eval/{name}" for name in ("metrics.json", "per_image.json", "worst.json", "speed.json", "report.html",
                                      "confusion_matrix.png", "per_class.png", "speed.png", "worst/01.png", "worst/02.png")),
    }
    found = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert found == expected  # also: no .tmp / hidden leftovers of the atomic writes
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    for png in [run_dir / f for f in expected if f.endswith(".png")]:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        image = cv2.imread(str(png))
        assert image is not None and image.shape[0] > 10 and image.shape[1] > 10, png


def test_every_model_checkpoint_loads_strictly_with_plain_torch_load(run_dir):
    checkpoints = checkpoints_of(run_dir)
    assert len(checkpoints) == 4
    for name, state in checkpoints.items():
        model = build_model("UNet", len(CLASSES), "none")
        model.load_state_dict(state, strict=True)  # what the Serve app does
        assert all(isinstance(v, torch.Tensor) for v in state.values()), name
    # The interval checkpoint and the last checkpoint of epoch 4 hold the same weights.
    assert_same_weights(checkpoints["model_004.pth"], checkpoints["model_004_last.pth"])
    assert not _same(checkpoints["model_003.pth"], checkpoints["model_004.pth"])
    resume = run_dir / "checkpoints" / "resume_state.pt"
    state = torch.load(resume, weights_only=False)
    assert state["epoch"] == EPOCHS and {"model", "optimizer", "scheduler", "history"} <= state.keys()
    assert_same_weights(_folded(state["model"]), checkpoints["model_004_last.pth"])


def _folded(training_state: dict) -> dict:
    """A resume state's model as its checkpoints hold it: UNet from scratch trains with BatchNorm, which the
    resume state keeps and the checkpoints fold into the convs."""
    model = add_training_norms(build_model("UNet", len(CLASSES), "none"))
    model.load_state_dict(training_state)
    return deployable_state_dict(model.eval())


def test_info_files(run_dir, tiny_project):
    info = run_dir / "info"
    template = augs.list_templates()[AUGS]
    assert json.loads((info / "augs_config.json").read_text()) == json.loads(template.read_text())
    namespace: dict = {}
    exec(compile((info / "augs_preview.py").read_text(), "augs_preview.py", "exec"), namespace)
    assert len(namespace["seq"]) == len(json.loads(template.read_text())["pipeline"])

    classes = json.loads((info / "model_classes.json").read_text())
    assert [c["title"] for c in classes] == CLASSES
    assert all({"title", "shape", "color"} <= c.keys() for c in classes)
    meta = sly.Project(str(tiny_project), sly.OpenMode.READ).meta
    for c in classes[1:]:  # the project's colours; every class a bitmap, whatever it was labelled with
        assert c["shape"] == "bitmap"
        assert sly.color.hex2rgb(c["color"]) == meta.get_obj_class(c["title"]).color

    ui_state = json.loads((info / "ui_state.json").read_text())
    assert ui_state["selectedModel"] == "UNet"
    assert ui_state["imgSize"] == {"width": 64, "height": 64}

    sets = {}
    for split in ("train", "val"):
        entries = json.loads((info / f"{split}_set.json").read_text())
        assert all(set(e) == {"dataset_name", "item_name"} for e in entries)
        sets[split] = {(e["dataset_name"], e["item_name"]) for e in entries}
        assert len(sets[split]) == len(entries)
        vis = json.loads((info / f"{split}_vis_items.json").read_text())
        assert len(vis) == min(3, len(entries))  # --vis-count 3
        assert {(e["dataset_name"], e["item_name"]) for e in vis} <= sets[split]
    every = {(i.dataset_name, i.item_name) for i in data.list_items(data.open_project(tiny_project))}
    assert len(every) == 12
    assert not sets["train"] & sets["val"] and sets["train"] | sets["val"] == every

    train_args = json.loads((run_dir / "checkpoints" / "train_args.json").read_text())
    assert train_args["epochs"] == EPOCHS and train_args["sly_augs_path"] == AUGS
    assert train_args["encoder_weights"] == "none"  # recorded resolved, not "auto"
    assert not {"train_args", "resume", "demo"} & train_args.keys()


def test_calibration_images_are_training_images_at_the_input_size(run_dir, tiny_project):
    with np.load(run_dir / "info" / "calibration_images.npz") as saved:
        images = saved["images"]
    train_keys = json.loads((run_dir / "info" / "train_set.json").read_text())
    assert images.dtype == np.uint8 and images.shape == (min(16, len(train_keys)), 64, 64, 3)
    project = data.open_project(tiny_project)
    by_key = {(i.dataset_name, i.item_name): i for i in data.list_items(project)}
    train_items = [by_key[(k["dataset_name"], k["item_name"])] for k in train_keys]
    prepared = data.PreparedData(train_items, project.meta, CLASSES, 64, 64)
    try:
        assert np.array_equal(images, prepared.images[: len(images)])  # fewer than 16: all of them, in order
    finally:
        prepared.close()


def test_int8_runtime_predicts_like_float32(run_dir, tiny_project, tmp_path):
    """predict.py --runtime int8 against --runtime pytorch --amp off on the same trained checkpoint."""
    images = tiny_project / "ds_a" / "img"
    masks = {}
    for runtime, extra in (("int8", []), ("pytorch", ["--amp", "off"])):
        result = run_cli(str(run_dir), str(images), "--output", str(tmp_path / runtime), "--runtime", runtime, *extra,
                         script="predict.py")
        assert result.returncode == 0, result.stderr[-3000:]
        masks[runtime] = {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                          for p in sorted((tmp_path / runtime / "masks").glob("*.png"))}
    assert masks["int8"].keys() == masks["pytorch"].keys() and len(masks["int8"]) == len(list(images.iterdir()))
    int8, float32 = (np.stack(list(m.values())) for m in (masks["int8"], masks["pytorch"]))
    assert len(np.unique(float32)) > 1  # a model that predicts one class everywhere would agree trivially
    assert (int8 == float32).mean() > 0.97


def test_evaluate_scores_the_int8_runtime_like_float32(run_dir, tiny_project, tmp_path):
    from custom_net.evaluate import run_evaluation
    scores = {}
    for runtime, amp in (("int8", "auto"), ("pytorch", "off")):
        result = run_evaluation(run_dir, tiny_project, tmp_path / runtime, split_file=run_dir / "info" / "val_set.json",
                                device="auto", runtime=runtime, amp=amp, speed=False)
        metrics = json.loads((tmp_path / runtime / "metrics.json").read_text())
        assert metrics["amp"] == ("int8" if runtime == "int8" else "float32") and metrics["device"].startswith("CPU ")
        scores[runtime] = result["headline"]["mean_fg_iou"]
    assert scores["pytorch"] > 0 and abs(scores["int8"] - scores["pytorch"]) < 0.03


def test_int8_runtime_without_calibration_images_says_which_file(run_dir, tmp_path):
    run = tmp_path / "old_run"
    for folder in ("checkpoints", "info"):
        (run / folder).mkdir(parents=True)
    best = next((run_dir / "checkpoints").glob("model_*_best.pth"))
    (run / "checkpoints" / best.name).write_bytes(best.read_bytes())
    for name in ("ui_state.json", "model_classes.json"):  # what a run of the original app has
        (run / "info" / name).write_bytes((run_dir / "info" / name).read_bytes())
    image = next((run_dir / "info" / "previews").glob("*.png"))
    result = run_cli(str(run), str(image), "--output", str(tmp_path / "out"), "--runtime", "int8", script="predict.py")
    assert result.returncode == 2
    assert "calibration_images.npz not found" in result.stderr and "pytorch runtime" in result.stderr
    assert not (tmp_path / "out").exists()


def test_metrics_log_and_summary(run_dir):
    records = metrics_of(run_dir)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for r in records:
        assert {"train_loss", "lr", "val_loss", "mean_fg_iou", "pixel_accuracy"} <= r.keys()
        assert set(r["iou"]) == set(CLASSES)
    best = _best_epoch(run_dir)
    values = [r["mean_fg_iou"] for r in records]
    assert best == values.index(max(values)) + 1  # the first epoch with the highest default best metric
    summary = json.loads((run_dir / "info" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["last_epoch"] == EPOCHS
    assert summary["best"]["epoch"] == best and Path(summary["best"]["checkpoint"]).is_file()
    assert Path(summary["last_checkpoint"]).name == "model_004_last.pth"
    assert summary["final"] == records[-1]


# ---- 2. it learns -----------------------------------------------------------------------

def test_training_loss_falls(run_dir):
    records = metrics_of(run_dir)
    assert records[-1]["train_loss"] < 0.85 * records[0]["train_loss"], [r["train_loss"] for r in records]


# ---- 3. logged metrics are reproducible from the checkpoints ------------------------------

def _evaluate_checkpoint(run: Path, project_dir: Path, checkpoint: Path) -> dict:
    args = json.loads((run / "checkpoints" / "train_args.json").read_text())
    project = data.open_project(project_dir)
    by_key = {(i.dataset_name, i.item_name): i for i in data.list_items(project)}
    val_items = [by_key[e["dataset_name"], e["item_name"]] for e in json.loads((run / "info" / "val_set.json").read_text())]
    prepared = data.PreparedData(val_items, project.meta, CLASSES, args["input_height"], args["input_width"])
    try:
        loader = DataLoader(data.SlySegDataset(prepared), batch_size=args["batch_size"], shuffle=False)
        model = build_model(args["model"], len(CLASSES), "none")
        model.load_state_dict(torch.load(checkpoint), strict=True)
        model.to(memory_format=torch.channels_last)
        criterion = build_loss(args["loss"], len(CLASSES), args["jaccard_weight"], args["class_weights"])
        return validate(model, criterion, loader, torch.device("cpu"), CLASSES, None, torch.channels_last)
    finally:
        prepared.close()


@pytest.mark.parametrize("which", ["best", "last"])
def test_checkpoint_reproduces_logged_metrics(run_dir, tiny_project, which):
    (checkpoint,) = (run_dir / "checkpoints").glob(f"model_*_{which}.pth")
    epoch = int(checkpoint.name.split("_")[1])
    logged = metrics_of(run_dir)[epoch - 1]
    got = _evaluate_checkpoint(run_dir, tiny_project, checkpoint)
    assert got["pixel_accuracy"] == pytest.approx(logged["pixel_accuracy"], abs=1e-6)
    assert got["mean_fg_iou"] == pytest.approx(logged["mean_fg_iou"], abs=1e-6)
    assert got["val_loss"] == pytest.approx(logged["val_loss"], abs=1e-4)


# ---- 4. repeatability -------------------------------------------------------------------

def test_train_args_json_repeats_the_run_bitwise(run_dir, tmp_path):
    summary = main(_args_from(run_dir, "--output", str(tmp_path / "rerun")), reporter=Reporter())
    assert summary["status"] == "finished"
    assert_same_weights(_last(tmp_path / "rerun"), _last(run_dir))
    assert metrics_of(tmp_path / "rerun") == metrics_of(run_dir)


def test_worker_processes_do_not_change_the_result(run_dir, tmp_path):
    # run_dir used --num-workers 0; the sampler puts the epoch in the index and augs are seeded per sample.
    main(_args_from(run_dir, "--num-workers", "2", "--output", str(tmp_path / "workers")), reporter=Reporter())
    assert_same_weights(_last(tmp_path / "workers"), _last(run_dir))


# ---- 5. resume --------------------------------------------------------------------------

class StopAfterEpoch(Reporter):
    def __init__(self, epoch: int):
        super().__init__()
        self.stop_epoch = epoch

    def epoch_end(self, epoch, record):
        if epoch == self.stop_epoch:
            self.request_stop()


class SimulatedCrash(Exception):
    pass


class CrashInPreviews(Reporter):
    """Dies after epoch ``epoch`` is logged to metrics.jsonl but before its resume state is saved."""

    def __init__(self, epoch: int):
        super().__init__()
        self.crash_epoch = epoch

    def previews(self, epoch, split, images):
        if epoch == self.crash_epoch:
            raise SimulatedCrash()


def _assert_resumed_run_equals(resumed: Path, reference: Path) -> None:
    assert metrics_of(resumed) == metrics_of(reference)  # epochs 1..4 once each, same values
    a, b = checkpoints_of(resumed), checkpoints_of(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert_same_weights(a[name], b[name])
    summary = json.loads((resumed / "info" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["last_epoch"] == EPOCHS
    assert summary["best"]["epoch"] == _best_epoch(reference)


def test_stop_and_crash_then_resume_equal_the_uninterrupted_run(run_dir, tmp_path):
    out = tmp_path / "interrupted"
    # 1) A stop asked for during epoch 2's end-of-epoch work ends the run there, without starting epoch 3.
    summary = main(_args_from(run_dir, "--output", str(out)), reporter=StopAfterEpoch(2))
    assert summary["status"] == "stopped" and summary["last_epoch"] == 2
    assert [r["epoch"] for r in metrics_of(out)] == [1, 2]
    state = torch.load(out / "checkpoints" / "resume_state.pt", weights_only=False)
    assert state["epoch"] == 2
    assert_same_weights(torch.load(out / "checkpoints" / "model_002_last.pth"), _folded(state["model"]))

    # 2) The resumed run dies after logging epoch 3 but before saving epoch 3's resume state.
    with pytest.raises(SimulatedCrash):
        main(["--resume", str(out)], reporter=CrashInPreviews(3))
    assert [r["epoch"] for r in metrics_of(out)] == [1, 2, 3]
    assert torch.load(out / "checkpoints" / "resume_state.pt", weights_only=False)["epoch"] == 2

    # 3) Resuming again redoes epoch 3 and finishes: the same log (each epoch once) and weights as run_dir.
    summary = main(["--resume", str(out)], reporter=Reporter())
    assert summary["output_dir"] == str(out)
    _assert_resumed_run_equals(out, run_dir)


# ---- 6. stop ----------------------------------------------------------------------------

class StopAtFirstIteration(Reporter):
    def train_step(self, epoch, iteration, iterations, loss, lr):
        if (epoch, iteration) == (1, 1):
            self.request_stop()


def test_stop_during_first_epoch(tiny_project, tmp_path):
    out = tmp_path / "stop"
    reporter = StopAtFirstIteration()
    summary = main(["--project-dir", str(tiny_project), *_tiny_args(), "--metrics-period", "1", "--amp", "off",
                    "--output", str(out)], reporter=reporter)
    assert summary["status"] == "stopped" and summary["last_epoch"] == 1 and summary["final"] is None
    assert json.loads((out / "info" / "summary.json").read_text())["status"] == "stopped"
    (last,) = (out / "checkpoints").glob("model_*_last.pth")
    assert last.name == "model_001_last.pth"
    build_model("UNet", len(CLASSES), "none").load_state_dict(torch.load(last), strict=True)
    assert not (out / "checkpoints" / "resume_state.pt").exists()  # no epoch was completed
    with pytest.raises(ArgsError, match="before its first epoch"):
        main(["--resume", str(out)], reporter=Reporter())


# ---- 7. non-finite loss -----------------------------------------------------------------

class _NaNOnTrainingCall(torch.nn.Module):
    """The real loss, but NaN on the ``at``-th training call (validation runs without grad)."""

    def __init__(self, inner, at: int):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, logits, target):
        loss = self.inner(logits, target)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                return loss * float("nan")
        return loss


def test_non_finite_loss_raises_and_keeps_checkpoints(tiny_project, tmp_path, monkeypatch):
    import custom_net.trainer as train_module

    real = train_module.build_loss
    # 10 training items, batch 4: 3 iterations per epoch, so call 5 is epoch 2, iteration 2.
    monkeypatch.setattr(train_module, "build_loss", lambda *a, **k: _NaNOnTrainingCall(real(*a, **k), at=5))
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, iteration 2\b"):
        main(["--project-dir", str(tiny_project), *_tiny_args(epochs=3), "--amp", "off", "--output", str(out)],
             reporter=Reporter())
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert {"model_001.pth", "model_001_best.pth", "resume_state.pt", "train_args.json"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    build_model("UNet", len(CLASSES), "none").load_state_dict(torch.load(out / "checkpoints" / "model_001.pth"))
    assert [r["epoch"] for r in metrics_of(out)] == [1]
    summary = json.loads((out / "info" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["last_epoch"] == 2


# ---- 8. --demo parsing ------------------------------------------------------------------

def test_demo_defaults_and_overrides():
    """--demo is sized for a laptop CPU: a model with no encoder to download, smaller inputs and batches than
    a real run's defaults, its own output folder; flags given explicitly win."""
    demo, real = parse_config(["--demo"]), parse_config(["--project-dir", "."])
    assert demo.demo and demo.project_dir is None
    assert model_list[demo.model]["pretrained_encoder"] is None and demo.encoder_weights == "none"
    assert demo.input_height * demo.input_width < real.input_height * real.input_width
    assert real.batch_size == "auto" and demo.batch_size < max(AUTO_BATCH_SIZES) and demo.output != real.output
    args = parse_config(["--demo", "--epochs", "3", "--input-width", "64"])
    assert args.epochs == 3 and args.input_width == 64
    assert args.model == demo.model and args.input_height == demo.input_height
    with pytest.raises(ArgsError, match="--project-dir"):
        parse_config(["--epochs", "3"])


# ---- 9. inference -----------------------------------------------------------------------

def _colour_model() -> torch.nn.Module:
    """A 1x1 conv 'model' on normalised RGB: red -> class 1, blue -> class 2, grey -> background."""
    conv = torch.nn.Conv2d(3, len(CLASSES), 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0], conv.weight[1, 2], conv.bias[1] = 1.0, -1.0, -1.0  # R - B - 1
        conv.weight[2, 0], conv.weight[2, 2], conv.bias[2] = -1.0, 1.0, -1.0  # B - R - 1
        conv.bias[3] = -100.0
    return conv


def _model_classes(tiny_project) -> list[sly.ObjClass]:
    return data.build_model_classes(data.open_project(tiny_project).meta, None)


def test_inference_returns_mask_at_original_size():
    image = np.full((70, 100, 3), 128, np.uint8)  # 100 wide, 70 high
    image[:, :30] = (255, 0, 0)
    image[:, 70:] = (0, 0, 255)
    mask = inference(_colour_model(), image, 64, 64)
    assert mask.shape == (70, 100) and mask.dtype == np.uint8
    assert (mask[:, :25] == 1).all() and (mask[:, 35:65] == 0).all() and (mask[:, 75:] == 2).all()


def test_sliding_window_covers_large_and_small_images():
    model = _colour_model()
    image = np.full((300, 410, 3), 128, np.uint8)  # not a multiple of the 64x64 tile
    image[:, :100] = (255, 0, 0)
    image[250:, 300:] = (0, 0, 255)
    probs = predict_image(model, image, 64, 64, mode="sliding", overlap=0.5)
    assert probs.shape == (len(CLASSES), 300, 410)
    assert torch.allclose(probs.sum(0), torch.ones(300, 410), atol=1e-4)
    mask = inference(model, image, 64, 64, mode="sliding")
    assert (mask[:, :100] == 1).all() and (mask[:240, 110:] == 0).all() and (mask[250:, 300:] == 2).all()
    # A pointwise model gives the same answer in sliding mode as on the full image at once.
    full = predict_image(model, image, 300, 410, mode="whole")
    assert torch.allclose(probs, full, atol=1e-5)
    small = inference(model, image[:20, :30], 64, 64, mode="sliding")
    assert small.shape == (20, 30) and (small == 1).all()
    with pytest.raises(ValueError, match="sliding"):
        inference(model, image, 64, 64, mode="tiles")
    with pytest.raises(ValueError, match="overlap"):
        inference(model, image, 64, 64, mode="sliding", overlap=1.0)


def test_load_trained_model_from_run_folder(tmp_path, tiny_project):
    out = tmp_path / "run"
    main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--epochs", "1", "--output", str(out)])
    best = next((out / "checkpoints").glob("model_*_best.pth"))
    trained = load_trained_model(best)
    assert trained.model_name == "UNet" and [c.name for c in trained.model_classes] == CLASSES
    assert (trained.input_height, trained.input_width) == (64, 64)
    assert not trained.model.training
    (out / "info" / "ui_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="ui_state.json"):
        load_trained_model(best)


def test_prediction_to_sly_annotation_round_trips(tiny_project):
    model_classes = _model_classes(tiny_project)
    assert [c.name for c in model_classes] == CLASSES
    mask = np.zeros((70, 100), np.uint8)
    mask[5:20, 10:40], mask[30:60, 50:60], mask[40:69, 80:99] = 1, 2, 3
    ann = convert_prediction_to_sly_format(mask, model_classes)
    assert tuple(ann.img_size) == mask.shape
    assert sorted(label.obj_class.name for label in ann.labels) == sorted(CLASSES[1:])
    for label in ann.labels:
        assert isinstance(label.geometry, sly.Bitmap) and label.obj_class.geometry_type is sly.Bitmap
        drawn = np.zeros(mask.shape, bool)
        label.geometry.draw(drawn, True)
        assert (drawn == (mask == CLASSES.index(label.obj_class.name))).all(), label.obj_class.name

    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection(
        [c.clone(geometry_type=sly.Bitmap) for c in model_classes[1:]]))
    restored = sly.Annotation.from_json(json.loads(json.dumps(ann.to_json())), meta)
    assert restored.img_size == ann.img_size
    assert [(l.obj_class.name, l.geometry.to_json()) for l in restored.labels] == \
           [(l.obj_class.name, l.geometry.to_json()) for l in ann.labels]
    # Background only: no labels at all.
    assert convert_prediction_to_sly_format(np.zeros((7, 9), np.uint8), model_classes).labels == []
