"""Model Benchmark on the platform after training, as the original Train UNet runs it: the run's checkpoint is
served on 127.0.0.1, the SDK's ``SemanticSegmentationBenchmark`` predicts the validation images into a new
project of the workspace "Model Benchmark: predictions and differences", evaluates them against the ground
truth, and uploads its evaluation, optional speed test and report to
``/model-benchmark/<project id>_<project name>/<task id>_<app name>/`` in Team Files.

The checkpoint is served by the serving app in a child process (``uvicorn serve_app.app:create_app``), not in
this process: the SDK's ``Application`` is a per-process singleton, and created here it would be the
dashboard's own app, whose server would then carry the model's routes and readiness check.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import requests
import supervisely as sly
from supervisely.api.file_api import FileInfo
from supervisely.nn.benchmark import SemanticSegmentationBenchmark
from supervisely.nn.benchmark.semantic_segmentation.visualizer import SemanticSegmentationVisualizer
from supervisely.nn.inference import SessionJSON

from custom_net.run_folder import RunFolder
from custom_net.sly_seg_dataset import BG_CLASS, Item, rasterize
from train_app.environment import Environment

logger = logging.getLogger("train_dashboard")

APP_NAME = "Train UNet"  # the results folder's name when the task's own app name is unknown
SPEEDTEST_BATCH_SIZES = (1, 8, 16)  # the original's
NAMES_PER_REQUEST = 200  # image names per listing filter, as the original
STARTUP_TIMEOUT_S = 300
STOP_TIMEOUT_S = 15
# The training task's context: the served model is no task of its own and must not act as this one.
CHILD_DROPPED_VARIABLES = ("TASK_ID", "ENV")


class BenchmarkError(RuntimeError):
    """The benchmark failed; the message says at which step and why."""


@dataclass(frozen=True)
class BenchmarkResult:
    report_id: int
    report_link: str               # the report's page on the platform
    report_file: FileInfo | None   # template.vue in Team Files: what the workflow output points at
    metrics: dict[str, float]      # the SDK's key metrics (mIoU, mPrecision, ... as fractions)
    primary_metric: str            # "mIoU"
    remote_dir: str                # the Team Files folder of this benchmark
    predictions_project_id: int
    skipped_images: list[str] = field(default_factory=list)  # "dataset/name" left out: the name was taken
    speedtest_error: str | None = None  # the speed test is optional: its failure is reported, not raised


class _Visualizer(SemanticSegmentationVisualizer):
    """The SDK's report, whose galleries show the predictions' classes merged with the ground truth's. A class
    labelled with polygons or rectangles is predicted as a bitmap under the same name, and the SDK's merge
    refuses two shapes of one class: here the predictions' class is kept."""

    def _get_filtered_project_meta(self, eval_result) -> sly.ProjectMeta:
        predicted = eval_result.pred_project_meta
        gt = eval_result.gt_project_meta
        gt_only = [c for c in gt.obj_classes if predicted.get_obj_class(c.name) is None]
        meta = predicted.merge(gt.clone(obj_classes=sly.ObjClassCollection(gt_only)))
        keep = set(eval_result.classes_whitelist or meta.obj_classes.keys()) | {eval_result.mp.bg_cls_name, BG_CLASS}
        return meta.delete_obj_classes([c.name for c in meta.obj_classes if c.name not in keep])


class _Benchmark(SemanticSegmentationBenchmark):
    visualizer_cls = _Visualizer


@contextmanager
def _step(what: str):
    """Every failure inside becomes one BenchmarkError naming the step."""
    try:
        yield
    except BenchmarkError:
        raise
    except Exception as e:
        raise BenchmarkError(f"model benchmark: {what} failed: {type(e).__name__}: {e}") from e


def run_model_benchmark(env: Environment, run_dir: Path, val_items: list[Item], classes: list[str], speed_test: bool,
                        progress=None, device: str = "auto") -> BenchmarkResult:
    """Benchmark the run's chosen checkpoint (best, else last) on ``val_items`` of the platform project
    ``env.project_id``, scoring ``classes`` (the model's, ``__bg__`` included). ``progress`` is a tqdm-like
    class the SDK's steps count with (default: its log progress). An item whose image name an earlier one has
    is left out (``skipped_images``). The run folder is only read. On failure the predictions projects made so
    far are removed and BenchmarkError is raised."""
    api = env.api
    if api is None or env.project_id is None:
        raise BenchmarkError("model benchmark: it needs the platform (an API and the project's id)")
    with _step("reading the project"):
        project = api.project.get_info_by_id(env.project_id)
        if project is None:
            raise BenchmarkError(f"model benchmark: project {env.project_id} not found on the platform")
    items, skipped = _unique_names(val_items)
    if skipped:
        logger.warning("model benchmark: %d validation image(s) left out, their names repeat another dataset's "
                       "(the SDK keys images by name): %s", len(skipped), ", ".join(skipped[:5]))
    with _step("finding the validation images on the platform"):
        image_ids = validation_image_ids(api, project.id, items)
    with _step("choosing the Team Files folder"):
        remote_dir = results_dir(api, env, project)
    with _step("reading the run"):
        checkpoint = RunFolder(run_dir).chosen_checkpoint()
        background = next((c for c in RunFolder(run_dir).read_model_classes() if c.name == BG_CLASS), None)
    output_dir = env.data_dir / "benchmark"
    shutil.rmtree(output_dir, ignore_errors=True)  # the SDK skips downloads it finds there
    benchmark = None
    try:
        with served_checkpoint(checkpoint, api, env.team_id, output_dir / "server", device) as url:
            with _step("preparing the benchmark"), _team_variable(env.team_id):
                benchmark = _Benchmark(
                    api, project.id, gt_images_ids=image_ids, output_dir=str(output_dir / "work"),
                    progress=progress, progress_secondary=progress, classes_whitelist=list(classes))
                benchmark.team_id = env.team_id
                session = SessionJSON(api, session_url=url)
            speedtest_error = _run_steps(benchmark, session, project.id, remote_dir, speed_test, background)
    except Exception:
        _remove_predictions(api, benchmark)
        raise
    return BenchmarkResult(
        report_id=benchmark.report.id, report_link=benchmark.get_report_link(), report_file=benchmark.report,
        metrics={k: float(v) for k, v in benchmark.key_metrics.items()}, primary_metric=benchmark.primary_metric_name,
        remote_dir=remote_dir, predictions_project_id=benchmark.dt_project_info.id, skipped_images=skipped,
        speedtest_error=speedtest_error)


def _unique_names(items: list[Item]) -> tuple[list[Item], list[str]]:
    """The items whose image name no earlier item has, and the others as "dataset/name". The SDK's evaluation
    and report key images by name alone: a repeated name would overwrite the other image's masks."""
    kept, seen, skipped = [], set(), []
    for item in items:
        if item.item_name in seen:
            skipped.append(f"{item.dataset_name}/{item.item_name}")
        else:
            seen.add(item.item_name)
            kept.append(item)
    return kept, skipped


def _run_steps(benchmark: _Benchmark, session: SessionJSON, project_id: int, remote_dir: str,
               speed_test: bool, background: sly.ObjClass | None) -> str | None:
    """The original's sequence; returns why the speed test failed, if it did."""
    with _step("predicting the validation images"):
        benchmark.run_inference(session)
        if background is not None:
            _add_class(benchmark.api, benchmark.dt_project_info.id, background)
    with _step("downloading ground truth and predictions"):
        gt_dir, pred_dir = benchmark.download_projects(save_images=False)
        for project_dir in (gt_dir, pred_dir):
            _area_classes_as_bitmaps(project_dir, benchmark.classes_whitelist)
    with _step("evaluating the predictions"):
        benchmark._evaluate(gt_dir, pred_dir)
        info = benchmark._eval_inference_info
        if not info.get("deploy_params"):  # the serving app reports none; the report names the model from them
            info["deploy_params"] = {"checkpoint_name": info.get("checkpoint_name"), "model_name": info.get("model_name")}
        benchmark._dump_eval_inference_info(benchmark._eval_inference_info)
    with _step("uploading the evaluation"):
        benchmark.upload_eval_results(remote_dir + "/evaluation/")
    speedtest_error = None
    if speed_test:
        try:
            benchmark.run_speedtest(session, project_id, batch_sizes=_batch_sizes(session))
            benchmark.upload_speedtest_results(remote_dir + "/speedtest/")
        except Exception as e:  # as the original: the report goes on without it
            speedtest_error = f"{type(e).__name__}: {e}"
            logger.warning("model benchmark: the speed test failed, the report has none: %s", speedtest_error)
    with _step("rendering the report"):
        benchmark.visualize()
    with _step("uploading the report"):
        benchmark.upload_visualizations(remote_dir + "/visualizations/")
        if benchmark.report is None:
            raise BenchmarkError("model benchmark: the report (template.vue) is not in Team Files after the upload")
    return speedtest_error


def _add_class(api: sly.Api, project_id: int, obj_class: sly.ObjClass) -> None:
    """The SDK's evaluator finds the background by its class in the ground truth's or the predictions' meta;
    the serving app writes no ``__bg__`` labels (uncovered pixels are background), so the class is added here
    (the original's server labelled the background, which put its class into the meta)."""
    meta = sly.ProjectMeta.from_json(api.project.get_meta(project_id))
    if meta.get_obj_class(obj_class.name) is None:
        api.project.update_meta(project_id, meta.add_obj_class(obj_class))


def _area_classes_as_bitmaps(project_dir: str, class_names: list[str]) -> None:
    """The SDK's evaluator keeps only Polygon and Bitmap classes (a Rectangle class is "not found"), while
    training takes every area shape: in the downloaded copy the other classes become Bitmap classes, their
    labels rasterised as training rasterises them."""
    project = sly.Project(project_dir, sly.OpenMode.READ)
    changed = {c.name: c.clone(geometry_type=sly.Bitmap) for c in project.meta.obj_classes
               if c.name in class_names and c.geometry_type not in (sly.Bitmap, sly.Polygon)}
    if not changed:
        return
    for dataset in project.datasets:
        for name in dataset.get_items_names():
            ann = dataset.get_ann(name, project.meta)
            labels = [_as_bitmap(label, changed.get(label.obj_class.name), ann.img_size) for label in ann.labels]
            ann = ann.clone(labels=[label for label in labels if label is not None])
            Path(dataset.get_ann_path(name)).write_text(json.dumps(ann.to_json()), encoding="utf-8")
    classes = [changed.get(c.name, c) for c in project.meta.obj_classes]
    meta = project.meta.clone(obj_classes=sly.ObjClassCollection(classes))
    Path(project_dir, "meta.json").write_text(json.dumps(meta.to_json()), encoding="utf-8")


def _as_bitmap(label: sly.Label, bitmap_class: sly.ObjClass | None, image_size) -> sly.Label | None:
    if bitmap_class is None:
        return label
    mask = rasterize(sly.Annotation(image_size, [label]), {label.obj_class.name: 1}) == 1
    return label.clone(geometry=sly.Bitmap(mask), obj_class=bitmap_class) if mask.any() else None


def _batch_sizes(session: SessionJSON) -> tuple[int, ...]:
    info = session.get_session_info()
    if not info.get("batch_inference_support", False):
        return (1,)
    limit = info.get("max_batch_size")
    return tuple(size for size in SPEEDTEST_BATCH_SIZES if limit is None or size <= limit)


def validation_image_ids(api: sly.Api, project_id: int, items: list[Item]) -> list[int]:
    """The platform ids of ``items`` (by dataset path, e.g. "ds/nested", and image name), in their order."""
    datasets = api.dataset.get_list(project_id, recursive=True)
    by_id = {ds.id: ds for ds in datasets}

    def path(ds) -> str:
        return ds.name if ds.parent_id not in by_id else f"{path(by_id[ds.parent_id])}/{ds.name}"

    dataset_ids = {path(ds): ds.id for ds in datasets}
    names_by_dataset: dict[str, list[str]] = {}
    for item in items:
        names_by_dataset.setdefault(item.dataset_name, []).append(item.item_name)
    found: dict[tuple[str, str], int] = {}
    for dataset, names in names_by_dataset.items():
        if dataset not in dataset_ids:
            raise BenchmarkError(f"model benchmark: dataset {dataset!r} is not in project {project_id} any more")
        for batch in sly.batched(names, NAMES_PER_REQUEST):
            infos = api.image.get_list(dataset_ids[dataset], filters=[{"field": "name", "operator": "in", "value": batch}])
            found.update({(dataset, info.name): info.id for info in infos})
    missing = [f"{i.dataset_name}/{i.item_name}" for i in items if (i.dataset_name, i.item_name) not in found]
    if missing:
        raise BenchmarkError(f"model benchmark: {len(missing)} validation image(s) are not in project {project_id} "
                             f"any more, e.g. {', '.join(missing[:3])}")
    return [found[(i.dataset_name, i.item_name)] for i in items]


def results_dir(api: sly.Api, env: Environment, project) -> str:
    """``/model-benchmark/<project id>_<name>/<task id>_<app name>`` (a free one: ``_001``... if taken), no
    trailing slash, as the original's ``get_eval_results_dir_name``."""
    task_dir = APP_NAME
    if env.task_id is not None:
        app = (api.task.get_info_by_id(env.task_id) or {}).get("meta", {}).get("app") or {}
        task_dir = f"{env.task_id}_{app.get('name') or APP_NAME}"
    return api.file.get_free_dir_name(env.team_id, f"/model-benchmark/{project.id}_{project.name}/{task_dir}/")


@contextmanager
def _team_variable(team_id: int):
    """The SDK's benchmark reads the team from TEAM_ID (set on the platform; maybe not for a CLI upload)."""
    before = os.environ.get("TEAM_ID")
    os.environ["TEAM_ID"] = str(team_id)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TEAM_ID", None)
        else:
            os.environ["TEAM_ID"] = before


def _remove_predictions(api: sly.Api, benchmark) -> None:
    """The original's cleanup: the predictions project (and the report's differences project), never raising."""
    if benchmark is None:
        return
    diff = getattr(getattr(benchmark, "_eval_results", None), "diff_project_info", None)
    for project in (benchmark.dt_project_info, diff):
        if project is None:
            continue
        try:
            api.project.remove(project.id)
        except Exception as e:
            logger.warning("model benchmark: could not remove project %s after the failure: %s", project.id, e)


# ---- the served checkpoint ---------------------------------------------------------------------------

def _child_environment(checkpoint: Path, api: sly.Api, team_id: int, workdir: Path, device: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in CHILD_DROPPED_VARIABLES and not k.startswith(("modal.state.", "UNET_"))}
    env.update({"SERVER_ADDRESS": api.server_address, "API_TOKEN": api.token, "TEAM_ID": str(team_id),
                "UNET_CHECKPOINT": str(checkpoint), "UNET_DEVICE": device, "UNET_MODEL_DIR": str(workdir / "model"),
                "SLY_APP_DATA_DIR": str(workdir), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([*_package_roots(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def _package_roots() -> list[str]:
    """Where the child imports custom_net and serve_app from: where this process finds them, else the
    repository's layout (the serving app's folder is on no path when the repository is not installed)."""
    here = Path(__file__).resolve()
    roots = []
    for name, in_repository in (("custom_net", here.parents[3]), ("serve_app", here.parents[2] / "serve" / "src")):
        spec = find_spec(name)
        roots.append(str(Path(spec.origin).parent.parent if spec and spec.origin else in_repository))
    return roots


@contextmanager
def served_checkpoint(checkpoint: Path, api: sly.Api, team_id: int, workdir: Path, device: str = "auto"):
    """Serve ``checkpoint`` with the serving app on a free 127.0.0.1 port, its SDK Api on ``api``'s platform
    (its log: ``workdir/server.log``); yields its URL; stops it on the way out, also after a failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    with _step(f"serving the checkpoint {checkpoint.name}"):
        process, url = _start_server(_child_environment(checkpoint, api, team_id, workdir, device), workdir)
    try:
        yield url
    finally:
        _stop(process)


def _start_server(env: dict, workdir: Path) -> tuple[subprocess.Popen, str]:
    log = workdir / "server.log"
    for _ in range(3):  # another process may take the free port between the check and the server's bind
        port = _free_port()
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "serve_app.app:create_app", "--factory", "--host", "127.0.0.1",
                 "--port", str(port)], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        url, deployed = f"http://127.0.0.1:{port}", False
        try:
            deployed = _wait_until_deployed(process, url)
        finally:
            if not deployed:
                _stop(process)
        if deployed:
            return process, url
        text = log.read_text(errors="replace")
        if "address already in use" not in text.lower():
            raise RuntimeError(f"the server stopped or did not answer within {STARTUP_TIMEOUT_S} s; its log ends:\n"
                               f"{text[-2000:]}")
    raise RuntimeError("no free port on 127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_deployed(process: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.post(f"{url}/is_deployed", timeout=5).json().get("deployed"):
                return True
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    return False


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
