"""Model Benchmark on the platform (train_app.model_benchmark) against a loopback Supervisely server holding the
tiny project: a run trained on that project is served, its predictions of the validation images land in a new
project, and the SDK's evaluation and report land in Team Files; a failure at any step is one BenchmarkError,
leaves no predictions project and no server behind, and never touches the run."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import supervisely as sly
import torch

from custom_net.evaluate import evaluate_items
from custom_net.inference import load_trained_model
from custom_net.model import build_model
from custom_net.predict import load_predictor
from custom_net.preprocessing import decode_image_rgb, normalize_batch, read_image_rgb, resize_image
from custom_net.run_folder import RunFolder
from custom_net.sly_seg_dataset import list_items, open_project, rasterize, split_from_files
from custom_net.train import main
from tests.helpers import TINY_TRAIN_ARGS, assert_agrees
from tests.sly_loopback import LoopbackPlatform
from train_app.environment import Environment
from train_app.model_benchmark import BenchmarkError, run_model_benchmark

pytestmark = pytest.mark.slow  # trains, and starts the serving app

TASK_ID = 4242
WORKSPACE = "Model Benchmark: predictions and differences"  # the SDK's


@pytest.fixture(scope="module")
def run(tiny_project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmark") / "run"
    main(["--project-dir", str(tiny_project), *TINY_TRAIN_ARGS, "--epochs", "3", "--val-percent", "34",
          "--output", str(out)])
    items = validation_items(tiny_project, out)
    predict_every_class(RunFolder(out).chosen_checkpoint(), [read_image_rgb(i.image_path) for i in items])
    return out


def validation_items(project_dir: Path, run_dir: Path):
    folder = RunFolder(run_dir)
    items = list_items(open_project(project_dir))
    return split_from_files(items, str(folder.split_set("train")), str(folder.split_set("val")))[1]


@torch.no_grad()
def predict_every_class(checkpoint: Path, images: list[np.ndarray]) -> None:
    """Centre the head's logits on these images. A few epochs predict background and disks only, and every class
    must be predicted somewhere: triangles and boxes too, labelled with polygons and rectangles and predicted as
    bitmaps (the report must take both shapes of a class)."""
    state = torch.load(checkpoint)
    classes = len(model_classes(checkpoint.parent.parent))
    model = build_model("UNet", classes, "none")
    model.load_state_dict(state)
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == classes][-1]
    batch = normalize_batch(torch.as_tensor(np.stack([resize_image(image, 64, 64) for image in images])))
    head.bias -= model(batch).mean(dim=(0, 2, 3))
    torch.save(model.state_dict(), checkpoint)


@pytest.fixture(scope="module")
def val_items(tiny_project, run):
    return validation_items(tiny_project, run)


@pytest.fixture(scope="module")
def benchmarked(val_items):
    """The validation items the SDK can benchmark: the first of each image name (it keys images by name)."""
    kept = {}
    for item in val_items:
        kept.setdefault(item.item_name, item)
    assert len(kept) < len(val_items), "the tiny project's split should repeat a name across datasets"
    return list(kept.values())


@pytest.fixture(scope="module")
def platform(tiny_project):
    with LoopbackPlatform(tiny_project) as platform:
        yield platform


def environment(platform: LoopbackPlatform, data_dir: Path) -> Environment:
    return Environment(platform=True, data_dir=data_dir, api=sly.Api(platform.url, platform.token, retry_count=1),
                       team_id=platform.team_id, workspace_id=platform.workspace_id, project_id=platform.project_id,
                       task_id=TASK_ID)


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_classes(run: Path) -> list[str]:
    return [c.name for c in RunFolder(run).read_model_classes()]


def served_processes() -> list[int]:
    """Children of this process running the serving app."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"serve_app.app:create_app" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def benchmark(platform, run, val_items, tmp_path_factory):
    before = fingerprint(run)
    result = run_model_benchmark(environment(platform, tmp_path_factory.mktemp("bench_data")), run, val_items,
                                 model_classes(run), speed_test=True, device="cpu")
    assert fingerprint(run) == before
    assert served_processes() == []
    return result


def test_predictions_project_holds_the_served_checkpoints_masks(benchmark, platform, run, val_items, benchmarked):
    assert platform.unknown == []
    project = platform.projects[benchmark.predictions_project_id]
    assert platform.workspaces[project["workspace_id"]]["name"] == WORKSPACE
    checkpoint = RunFolder(run).chosen_checkpoint()
    assert project["name"] == f"{platform.projects[platform.project_id]['name']} - {checkpoint.name}"
    datasets = {ds["id"]: ds["name"] for ds in platform.datasets if ds["project_id"] == benchmark.predictions_project_id}
    images = {(datasets[img["dataset_id"]], img["name"]): img for img in platform.images.values()
              if img["dataset_id"] in datasets}
    assert sorted(images) == sorted((item.dataset_name, item.item_name) for item in benchmarked)
    assert sorted(benchmark.skipped_images) == sorted(f"{i.dataset_name}/{i.item_name}" for i in val_items
                                                      if i not in benchmarked)

    predictor = load_predictor(run, "cpu")  # what the server loads: the chosen checkpoint, the default fast path
    classes = predictor.model_classes
    foreground = {c.name for c in classes} - {"__bg__"}
    assert {label["classTitle"] for img in images.values() for label in img["ann"]["objects"]} == foreground
    for image in images.values():
        labels = image["ann"]["objects"]
        assert {label["geometryType"] for label in labels} <= {"bitmap"}
        assert {label["classTitle"] for label in labels} <= foreground
        pixels = decode_image_rgb(image["bytes"])
        meta = sly.ProjectMeta([c.clone(geometry_type=sly.Bitmap) for c in classes])
        stored = rasterize(sly.Annotation.from_json(image["ann"], meta), {c.name: i for i, c in enumerate(classes)})
        assert_agrees(stored, predictor.masks([pixels])[0])


def test_evaluation_and_report_arrive_in_team_files(benchmark, platform, run, benchmarked):
    remote = f"/model-benchmark/{platform.project_id}_{platform.projects[platform.project_id]['name']}/{TASK_ID}_Train UNet"
    assert benchmark.remote_dir == remote
    for name in ("evaluation/eval_data.pkl", "evaluation/inference_info.json", "speedtest/speedtest.json",
                 "visualizations/template.vue", "visualizations/state.json",
                 "visualizations/Model Evaluation Report.lnk"):
        assert f"{remote}/{name}" in platform.files, name
    template = f"{remote}/visualizations/template.vue"
    assert benchmark.report_file.path == template
    api = sly.Api(platform.url, platform.token)
    assert benchmark.report_id == api.file.get_info_by_path(platform.team_id, template).id
    link = platform.files[f"{remote}/visualizations/Model Evaluation Report.lnk"].decode()
    assert link == f"/model-benchmark?id={benchmark.report_id}"
    assert benchmark.report_link == platform.url + link
    assert benchmark.speedtest_error is None
    info = json.loads(platform.files[f"{remote}/evaluation/inference_info.json"])
    assert info["val_images_cnt"] == len(benchmarked) and info["dt_project_id"] == benchmark.predictions_project_id
    assert info["checkpoint_name"] == RunFolder(run).chosen_checkpoint().name


def test_metrics_agree_with_the_report_and_our_evaluation(benchmark, platform, run, benchmarked, tiny_project):
    metrics = benchmark.metrics
    assert benchmark.primary_metric == "mIoU" and 0 <= metrics["mIoU"] <= 1
    eval_data = pickle.loads(platform.files[f"{benchmark.remote_dir}/evaluation/eval_data.pkl"])
    assert metrics["mIoU"] == pytest.approx(eval_data["result"].loc["mean", "IoU"])
    table = next(json.loads(data) for path, data in platform.files.items()
                 if path.startswith(f"{benchmark.remote_dir}/visualizations/data/table_key_metrics"))
    shown = {row["id"]: row["row"][1] for row in table["content"]}
    assert shown["mIoU"] == round(metrics["mIoU"] * 100, 1)

    # Our own evaluation of the same checkpoint on the same images (fp32 here, the server's default autocast
    # there: a few pixels may differ).
    project = open_project(tiny_project)
    ours = evaluate_items(load_trained_model(RunFolder(run).chosen_checkpoint()), project.meta, benchmarked,
                          torch.device("cpu"), worst=0)["metrics"]
    assert metrics["mIoU"] == pytest.approx(ours["mean_iou"], abs=0.03)
    assert metrics["PixelAcc"] == pytest.approx(ours["pixel_accuracy"], abs=0.03)


@pytest.mark.parametrize("method, step", [
    ("images.list", "finding the validation images on the platform"),
    ("annotations.bulk.add", "predicting the validation images"),  # the served model's write of its predictions
    ("file-storage.bulk.upload", "uploading the evaluation"),
    ("users.me", "rendering the report"),  # after the differences project was made
])
def test_a_failure_raises_benchmark_error_and_cleans_up(platform, run, val_items, tmp_path, method, step):
    before, projects = fingerprint(run), set(platform.projects)
    platform.fail(method, status=403)
    with pytest.raises(BenchmarkError) as info:
        run_model_benchmark(environment(platform, tmp_path), run, val_items, model_classes(run), speed_test=False,
                            device="cpu")
    assert step in str(info.value) and "403" in str(info.value), str(info.value)
    assert set(platform.projects) == projects, "a predictions project was left behind"
    assert fingerprint(run) == before
    assert served_processes() == []
    assert platform.unknown == []


def test_a_failing_cleanup_does_not_hide_the_failure(platform, run, val_items, tmp_path):
    projects, calls = set(platform.projects), len(platform.calls)
    platform.fail("users.me", status=403)
    platform.fail("projects.archive", status=403, times=2)
    env = environment(platform, tmp_path)
    with pytest.raises(BenchmarkError, match="rendering the report failed"):
        run_model_benchmark(env, run, val_items, model_classes(run), speed_test=False, device="cpu")
    left = set(platform.projects) - projects  # the predictions and differences projects could not be removed
    assert len(left) == 2 and platform.methods()[calls:].count("projects.archive") == 2
    for project_id in left:
        env.api.project.remove(project_id)
    assert set(platform.projects) == projects


def test_a_checkpoint_that_cannot_be_served_is_a_benchmark_error(platform, run, val_items, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    checkpoint = RunFolder(broken).chosen_checkpoint()
    checkpoint.write_bytes(b"not a checkpoint")
    projects = set(platform.projects)
    with pytest.raises(BenchmarkError, match=f"serving the checkpoint {checkpoint.name} failed"):
        run_model_benchmark(environment(platform, tmp_path / "data"), broken, val_items, model_classes(run),
                            speed_test=False, device="cpu")
    assert set(platform.projects) == projects and served_processes() == []
