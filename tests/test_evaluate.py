"""Evaluation report: metrics on hand-made masks with known answers, the CLI and its errors, the
end-of-training evaluation, and the HTML report rendered in headless Chromium."""
from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import supervisely as sly
import torch
import torch.nn.functional as F

from custom_net import sly_seg_dataset as data
from custom_net.evaluate import EvalError, cli, evaluate_items, run_evaluation
from custom_net.inference import TrainedModel
from custom_net.model import build_model
from custom_net.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from custom_net.train import main
from custom_net.validation import BoundaryIoU, ConfusionMatrix, edge_band
from tests.helpers import REPO, TINY_TRAIN_ARGS, shared_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["__bg__", "a", "b"]


def _strict_json(path):
    """json.loads that refuses NaN / Infinity, as browsers do."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


# ---- metrics from the confusion matrix -----------------------------------------------------

def test_full_metrics_on_hand_made_masks():
    # 3 classes; class 2 is never predicted (precision undefined), class 3 appears nowhere.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    cm = ConfusionMatrix(4)
    cm.update(target, pred)
    m = cm.full_metrics(NAMES + ["never"])
    assert m["confusion_matrix"] == [[4, 1, 0, 0], [1, 2, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]
    assert m["confusion_matrix_normalized"][0] == pytest.approx([0.8, 0.2, 0, 0])
    assert m["confusion_matrix_normalized"][2] == pytest.approx([1, 0, 0, 0])
    assert all(math.isnan(v) for v in m["confusion_matrix_normalized"][3])  # no ground truth: row undefined
    assert m["support"] == {"__bg__": 5, "a": 3, "b": 2, "never": 0}
    assert m["precision"]["__bg__"] == pytest.approx(4 / 7) and m["precision"]["a"] == pytest.approx(2 / 3)
    assert math.isnan(m["precision"]["b"]) and math.isnan(m["precision"]["never"])
    assert m["recall"]["__bg__"] == pytest.approx(4 / 5) and m["recall"]["a"] == pytest.approx(2 / 3)
    assert m["recall"]["b"] == 0 and math.isnan(m["recall"]["never"])
    assert m["mean_fg_precision"] == pytest.approx(2 / 3)  # only "a" is defined
    assert m["mean_fg_recall"] == pytest.approx((2 / 3 + 0) / 2)
    iou = {"__bg__": 4 / 8, "a": 2 / 4, "b": 0.0}
    assert m["iou"]["__bg__"] == pytest.approx(iou["__bg__"]) and m["iou"]["a"] == pytest.approx(iou["a"])
    assert m["frequency_weighted_iou"] == pytest.approx(0.5 * 0.5 + 0.3 * 0.5 + 0.2 * 0.0)
    assert m["pixel_accuracy"] == pytest.approx(0.6)
    # The training metrics are the same numbers from the same matrix.
    core = cm.metrics(NAMES + ["never"])
    assert json.dumps({k: m[k] for k in core}, sort_keys=True) == json.dumps(core, sort_keys=True)  # NaN-safe


def test_matrix_add_accumulates_images():
    total, one, two = ConfusionMatrix(2), ConfusionMatrix(2), ConfusionMatrix(2)
    one.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    two.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    total.add(one)
    total.add(two)
    assert total.matrix.tolist() == [[1, 0], [2, 1]]


def _square(size, top, left, height, width):
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[top:top + height, left:left + width] = 1
    return mask


def test_edge_band_is_the_inner_ring_and_ignores_the_frame():
    band = edge_band(_square(8, 2, 2, 4, 4) == 1, 1)
    assert band.sum() == 12 and not band[3:5, 3:5].any()  # a 4x4 square: its 12 border pixels
    assert edge_band(_square(20, 4, 4, 10, 10) == 1, 2).sum() == 100 - 36  # all but the 6x6 core
    assert not edge_band(torch.ones(6, 6, dtype=torch.bool), 1).any()  # the image frame is not an edge
    left_half = torch.zeros(6, 6, dtype=torch.bool)
    left_half[:, :3] = True
    assert edge_band(left_half, 1).nonzero()[:, 1].unique().tolist() == [2]  # only along the real edge


def test_boundary_iou_known_answers():
    truth = _square(20, 4, 4, 10, 10)  # rows/cols 4..13
    b = BoundaryIoU(2, width=1)
    b.update(truth, _square(20, 5, 4, 9, 10))  # the top row missing
    m = b.metrics(["__bg__", "a"])
    # Rings of width 1. Object: truth 36 px, prediction 34, shared: bottom row 10 + sides 2*8 = 26.
    assert m["boundary_iou"]["a"] == pytest.approx(26 / (36 + 34 - 26))
    # Background: the rings just outside the squares: 44 and 42 px, shared 12 + 2*10 = 32.
    assert m["boundary_iou"]["__bg__"] == pytest.approx(32 / (44 + 42 - 32))
    assert m["mean_fg_boundary_iou"] == pytest.approx(26 / 44)

    shifted = BoundaryIoU(2, width=1)  # a square 3 px larger all round: region IoU 100/256, rings disjoint
    shifted.update(truth, _square(20, 1, 1, 16, 16))
    assert shifted.metrics(["__bg__", "a"])["boundary_iou"]["a"] == 0
    same = BoundaryIoU(2, width=3)
    same.update(truth, truth)
    assert same.metrics(["__bg__", "a"])["mean_boundary_iou"] == 1
    with pytest.raises(ValueError, match="boundary width"):
        BoundaryIoU(2, width=0)


# ---- evaluation of a hand-made project with a model whose predictions are known -------------

class RedChannelOracle(torch.nn.Module):
    """Predicts class round(red / 100) at every pixel: a test image's red channel is the prediction."""

    def forward(self, x):
        red = x[:, 0].float() * (IMAGENET_STD[0] * 255) + IMAGENET_MEAN[0] * 255
        classes = torch.round(red / 100).long().clamp(0, len(NAMES) - 1)
        return F.one_hot(classes, len(NAMES)).permute(0, 3, 1, 2).float() * 10


def _rows(n_rows: int, value: int) -> np.ndarray:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:n_rows] = value
    return mask


# (item, ground truth, prediction); 32x32 each
CASES = [("perfect", _rows(8, 1), _rows(8, 1)),    # a -> a 256, bg -> bg 768
         ("missed", _rows(8, 2), _rows(0, 0)),     # b -> bg 256, bg -> bg 768
         ("wrong", _rows(16, 1), _rows(16, 2))]    # a -> b 512, bg -> bg 512


@pytest.fixture(scope="module")
def oracle_project(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "project"
    classes = [sly.ObjClass("a", sly.Bitmap, color=[255, 0, 0]), sly.ObjClass("b", sly.Bitmap, color=[0, 255, 0])]
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection(classes))
    project = sly.Project(str(path), sly.OpenMode.CREATE)
    project.set_meta(meta)
    dataset = project.create_dataset("ds")
    for name, truth, prediction in CASES:
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        image[..., 0] = prediction * 100
        labels = [sly.Label(sly.Bitmap(truth == i), c) for i, c in enumerate(classes, 1) if (truth == i).any()]
        dataset.add_item_np(f"{name}.png", image, ann=sly.Annotation((32, 32), labels))
    model_classes = data.build_model_classes(meta, None)
    return path, TrainedModel(RedChannelOracle(), "oracle", model_classes, 32, 32, path / "none.pth")


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_evaluate_items_gives_the_known_answers(oracle_project, mode):
    path, trained = oracle_project
    project = data.open_project(path)
    items = data.list_items(project)
    result = evaluate_items(trained, project.meta, items, torch.device("cpu"), mode=mode, boundary_width=2, worst=2)
    m = result["metrics"]
    assert m["confusion_matrix"] == [[2048, 0, 0], [0, 256, 512], [256, 0, 0]]
    assert m["iou"] == pytest.approx({"__bg__": 2048 / 2304, "a": 256 / 768, "b": 0.0})
    assert m["precision"] == pytest.approx({"__bg__": 2048 / 2304, "a": 1.0, "b": 0.0})
    assert m["recall"] == pytest.approx({"__bg__": 1.0, "a": 1 / 3, "b": 0.0})
    assert m["pixel_accuracy"] == pytest.approx(0.75)
    assert m["mean_fg_iou"] == pytest.approx(1 / 6)
    assert m["frequency_weighted_iou"] == pytest.approx(2048 / 3072 * 8 / 9 + 768 / 3072 / 3)
    assert m["boundary_iou"]["b"] == 0
    by_name = {r["item_name"].removesuffix(".png"): r for r in result["per_image"]}
    assert by_name["perfect"]["mean_fg_iou"] == 1 and by_name["perfect"]["pixel_accuracy"] == 1
    assert by_name["missed"]["mean_fg_iou"] == 0 and by_name["wrong"]["pixel_accuracy"] == 0.5
    # The two images with foreground IoU 0 are the worst, in item order; panels are 4 parts wide.
    assert [r["item_name"] for r, _ in result["worst"]] == ["missed.png", "wrong.png"]
    panel = result["worst"][0][1]
    assert panel.shape[1] == 4 * panel.shape[0] + 3 * 4
    # Error overlay of "missed": the missed rows are red, the rest is grey.
    part = panel[:, 3 * (panel.shape[0] + 4):]
    assert (part[: panel.shape[0] // 8 - 2] == (230, 40, 40)).all()
    assert (part[-5:, :, 0] == part[-5:, :, 1]).all()


@pytest.fixture(scope="module")
def oracle_report(oracle_project, tmp_path_factory):
    """run_evaluation of the oracle (a cheap model: the speed test takes no time) with every part on."""
    path, trained = oracle_project
    out = tmp_path_factory.mktemp("oracle_eval")
    ckpt = out / "model.pth"
    ckpt.write_bytes(b"")  # resolve_checkpoint wants a file; the model comes from the patched loader
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("custom_net.evaluate.load_trained_model", lambda checkpoint, device: trained)
        result = run_evaluation(ckpt, path, out / "eval", device="cpu", boundary_width=2, worst=2, speed_batch=2)
    return out / "eval", result


def test_run_evaluation_writes_strict_json_and_pictures(oracle_report):
    out, result = oracle_report
    metrics = _strict_json(out / "metrics.json")
    assert metrics["headline"]["pixel_accuracy"] == pytest.approx(0.75) == result["headline"]["pixel_accuracy"]
    assert metrics["items"] == 3 and metrics["classes"] == NAMES
    per_image = _strict_json(out / "per_image.json")
    assert {r["item_name"]: r["iou"]["b"] for r in per_image}["perfect.png"] is None  # NaN written as null
    assert [w["panel"] for w in _strict_json(out / "worst.json")] == ["worst/01.png", "worst/02.png"]
    speed = _strict_json(out / "speed.json")
    assert {(c["batch_size"], c["fast_path"]) for c in speed["cases"]} == {(1, False), (2, False), (1, True), (2, True)}
    assert all(c["ms_per_image"] > 0 for c in speed["cases"]) and speed["device"].startswith("CPU")
    assert {c["memory_format"] for c in speed["cases"] if c["fast_path"]} == {"channels_last"}
    for name in ("confusion_matrix.png", "per_class.png", "speed.png", "worst/01.png", "worst/02.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert result["report"] == str(out / "report.html")
    assert result["speed"] == speed["cases"]


def test_split_file_selects_items_and_bad_input_names_the_flag(oracle_project, tmp_path, monkeypatch):
    path, trained = oracle_project
    monkeypatch.setattr("custom_net.evaluate.load_trained_model", lambda checkpoint, device: trained)
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"")
    split = tmp_path / "val_set.json"
    split.write_text(json.dumps([{"dataset_name": "ds", "item_name": "perfect.png"}]))
    result = run_evaluation(ckpt, path, tmp_path / "eval", split_file=split, device="cpu", speed=False)
    assert result["items"] == 1 and result["headline"]["mean_fg_iou"] == 1
    assert not (tmp_path / "eval" / "speed.json").exists()

    def fails(match, **kwargs):
        with pytest.raises((EvalError, data.DataError), match=match):
            run_evaluation(kwargs.pop("checkpoint", ckpt), kwargs.pop("project", path), tmp_path / "bad",
                           device="cpu", speed=False, **kwargs)

    split.write_text("[]")
    fails(f"--split-file: {re.escape(str(split))} lists no items", split_file=split)
    split.write_text(json.dumps([{"dataset_name": "ds", "item_name": "nope.png"}]))
    fails("--split-file: .*1 item\\(s\\) not in the project, e.g. ds/nope.png", split_file=split)
    fails("--split-file: .*not found", split_file=tmp_path / "missing.json")
    fails("--mode: unknown inference mode 'tiles'", mode="tiles")
    fails("--checkpoint: .*missing.pth not found", checkpoint=tmp_path / "missing.pth")
    fails("--checkpoint: .*eval: no checkpoints/model_\\*.pth", checkpoint=tmp_path / "eval")
    fails("project folder .*nowhere does not exist", project=tmp_path / "nowhere")


# ---- training runs it; the CLI; the report in a browser -------------------------------------

@pytest.fixture(scope="module")
def trained_run(tiny_project, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run") / "run"
    summary = main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--epochs", "1", "--no-speed-test",
                                      "--output", str(out)])
    return out, summary


def test_training_evaluates_its_best_checkpoint(trained_run):
    run, summary = trained_run
    ev = summary["eval"]
    assert ev["checkpoint"] == summary["best"]["checkpoint"]
    assert ev["report"] == str(run / "eval" / "report.html")
    val_items = json.loads((run / "info" / "val_set.json").read_text())
    assert ev["items"] == len(val_items) == len(_strict_json(run / "eval" / "per_image.json"))
    assert set(ev["headline"]) >= {"mean_fg_iou", "pixel_accuracy", "frequency_weighted_iou", "mean_fg_boundary_iou"}
    assert 0 <= ev["headline"]["pixel_accuracy"] <= 1
    assert json.loads((run / "info" / "summary.json").read_text())["eval"] == ev  # what the dashboard reads
    assert (run / "eval" / "report.html").is_file() and not (run / "eval" / "speed.json").exists()  # --no-speed-test


def test_no_eval_flag_skips_it(tiny_project, tmp_path):
    out = tmp_path / "run"
    summary = main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--epochs", "1", "--no-eval",
                                      "--output", str(out)])
    assert "eval" not in summary and not (out / "eval").exists()


@pytest.mark.slow
def test_cli_sliding_window_on_the_validation_split(trained_run, tiny_project, tmp_path):
    run, _ = trained_run
    out = tmp_path / "cli_eval"
    result = subprocess.run([sys.executable, str(REPO / "custom_net" / "evaluate.py"), "--checkpoint", str(run),
                             "--project-dir", str(tiny_project), "--split-file", str(run / "info" / "val_set.json"),
                             "--device", "cpu", "--mode", "sliding", "--no-speed-test", "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"report: {out / 'report.html'}" in result.stdout and "mean IoU (foreground classes)" in result.stdout
    metrics = _strict_json(out / "metrics.json")
    assert metrics["mode"] == "sliding" and metrics["checkpoint"].endswith("_best.pth")


@pytest.mark.parametrize("argv, names", [
    (["--checkpoint", "{tmp}/none.pth"], ["--checkpoint", "none.pth"]),
    (["--checkpoint", "{run}", "--mode", "tiles"], ["--mode", "tiles"]),
    (["--checkpoint", "{run}", "--split-file", "{tmp}/broken.json"], ["--split-file", "broken.json", "JSON"]),
    (["--checkpoint", "{tmp}/stray.pth"], ["--checkpoint", "stray.pth", "ui_state.json"]),
    (["--checkpoint", "{run}", "--device", "tpu"], ["--device", "tpu"]),
])
def test_cli_bad_input_exits_2_with_a_message(trained_run, tiny_project, tmp_path, capsys, argv, names):
    run, _ = trained_run
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "stray.pth").write_bytes((run / "checkpoints" / "train_args.json").read_bytes())  # no run folder
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert cli(argv + ["--project-dir", str(tiny_project), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(n in err for n in names), err


def _find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium / google-chrome on PATH (.ci/run installs Debian's chromium)")


# Appended to a copy of the report: on load, record what the browser shows into the DOM.
CHECK_SCRIPT = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  const table = document.querySelector('#metrics');
  const out = document.createElement('pre');
  out.id = 'check';
  out.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0).length,
    metricsVisible: !!table && table.getBoundingClientRect().height > 0,
    metricsText: table ? table.innerText : ''});
  document.body.appendChild(out);
});</script>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium(oracle_report, tmp_path):
    chromium = _find_chromium()
    out, result = oracle_report
    page = (out / "report.html").read_text(encoding="utf-8")
    # Self-contained: every image is embedded, nothing is fetched.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<script" not in page
    probe = tmp_path / "report_probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="check">(.*?)</pre>', run.stdout, re.S)
    assert found, f"no result from the page; chromium said: {run.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["images"] == 3 + 2  # per-class chart, confusion heatmap, speed chart, 2 worst panels
    assert check["loaded"] == check["images"]
    assert check["metricsVisible"]
    assert "mean IoU (foreground classes)" in check["metricsText"] and f"{1 / 6:.4f}" in check["metricsText"]
    assert "pixel accuracy" in check["metricsText"] and "0.7500" in check["metricsText"]


def test_original_app_run_folder_on_real_data(tmp_path):
    """A run folder as the original app left it (plain state dict + info/) evaluated on the lemons:
    the matrix counts every pixel of every image, and class supports are the rasterised labels."""
    lemons = shared_path("data", "lemons_annotated")
    project = data.open_project(lemons)
    model_classes = data.build_model_classes(project.meta, None)
    run = tmp_path / "original_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "info").mkdir()
    torch.manual_seed(0)
    torch.save(build_model("UNet", len(model_classes), "none").state_dict(), run / "checkpoints" / "model_001.pth")
    (run / "info" / "model_classes.json").write_text(json.dumps([c.to_json() for c in model_classes]))
    (run / "info" / "ui_state.json").write_text(json.dumps({"selectedModel": "UNet", "imgSize": {"width": 64, "height": 64}}))
    items = data.list_items(project)[:2]
    split = tmp_path / "val_set.json"
    split.write_text(json.dumps([i.key for i in items]))
    result = run_evaluation(run / "checkpoints" / "model_001.pth", lemons, split_file=split, device="cpu",
                            speed=False, worst=1)
    metrics = _strict_json(run / "eval" / "metrics.json")["metrics"]
    index = {c.name: i for i, c in enumerate(model_classes)}
    pixels = [data.load_item(i, project.meta, index)[1] for i in items]
    assert np.asarray(metrics["confusion_matrix"]).sum() == sum(m.size for m in pixels)
    expected = np.bincount(np.concatenate([m.ravel() for m in pixels]), minlength=len(model_classes))
    assert [metrics["support"][c.name] for c in model_classes] == expected.tolist()
    assert result["items"] == 2 and result["report"] == str(run / "eval" / "report.html")
