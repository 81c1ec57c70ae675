"""What a finished platform run leaves besides its Team Files folder, as the original Train UNet does: the
experiment (``experiment_info.json`` beside the checkpoints, and the task's output experiment, so the run shows
in the platform's Experiments table) and the workflow nodes (the input project and custom weights, the output
best checkpoint and benchmark report). Each step fails on its own: the caller reports it, the run stays."""
from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath

import supervisely as sly
from supervisely.nn.experiments import ExperimentInfo

from custom_net.run_folder import RunFolder
from custom_net.sly_integration import workflow_supported
from train_app.environment import Environment

FRAMEWORK = "UNet"  # as supervisely.nn.artifacts.UNet names it: the Experiments table groups runs by it
TASK_TYPE = "semantic segmentation"


def experiment_info(env: Environment, run_dir: Path, remote_dir: str, project: sly.ProjectInfo, model: str,
                    benchmark=None, custom_weights: str | None = None) -> dict:
    """ExperimentInfo's fields for this run; paths are relative to ``remote_dir``."""
    folder = RunFolder(run_dir)
    relative = lambda path: Path(path).relative_to(folder.root).as_posix()
    checkpoints = folder.checkpoint_files()
    sizes = {split: len(json.loads(folder.split_set(split).read_text())) for split in ("train", "val")}
    metrics, primary = _evaluation_metrics(folder, benchmark)
    started = time.gmtime(folder.train_args.stat().st_mtime)
    return ExperimentInfo(
        experiment_name=f"{env.task_id}_{project.name}_{model}", framework_name=FRAMEWORK, model_name=model,
        task_type=TASK_TYPE, project_id=project.id, task_id=env.task_id,
        model_files={"config": relative(folder.train_args)}, model_meta=relative(folder.model_meta),
        checkpoints=[relative(c) for c in checkpoints], best_checkpoint=folder.chosen_checkpoint().name,
        hyperparameters=relative(folder.train_args), artifacts_dir=remote_dir, app_state=relative(folder.ui_state),
        base_checkpoint=PurePosixPath(custom_weights).name if custom_weights else None,
        base_checkpoint_link=custom_weights, train_size=sizes["train"], val_size=sizes["val"],
        datetime=time.strftime("%Y-%m-%d %H:%M:%S", started),
        evaluation_report_id=getattr(benchmark, "report_id", None),
        evaluation_report_link=getattr(benchmark, "report_link", None), evaluation_metrics=metrics,
    ).to_json() | {"primary_metric": primary}


def write_model_meta(run_dir: Path) -> None:
    """The model's classes as a ProjectMeta at the run's root, uploaded with it."""
    folder = RunFolder(run_dir)
    meta = sly.ProjectMeta(obj_classes=sly.ObjClassCollection(folder.read_model_classes()))
    folder.model_meta.write_text(json.dumps(meta.to_json()))


def _evaluation_metrics(folder: RunFolder, benchmark) -> tuple[dict | None, str | None]:
    """The Model Benchmark's key metrics when it ran, else our own evaluation's on the validation set."""
    if benchmark is not None and benchmark.metrics:
        return benchmark.metrics, benchmark.primary_metric
    path = folder.eval / "metrics.json"
    if not path.is_file():
        return None, None
    metrics = json.loads(path.read_text()).get("headline") or None
    return metrics, "mean_fg_iou" if metrics and "mean_fg_iou" in metrics else None


def register_experiment(env: Environment, run_dir: Path, remote_dir: str, info: dict, project: sly.ProjectInfo) -> None:
    """experiment_info.json into the run folder and beside the uploaded checkpoints, then the task's output
    experiment (with the project's preview, as the table shows it)."""
    record = {k: v for k, v in info.items() if k != "primary_metric"}
    local = RunFolder(run_dir).experiment_info
    local.write_text(json.dumps(record, indent=2))
    env.api.file.upload(env.team_id, str(local), remote_dir.rstrip("/") + "/" + local.name)
    preview = project.image_preview_url if project.reference_image_url else None  # the SDK's fails on an empty project
    env.api.task.set_output_experiment(env.task_id, {**info, "project_preview": preview})


def record_workflow(env: Environment, remote_dir: str, best_checkpoint: str, custom_weights: str | None = None,
                    report=None) -> None:
    """Input: the project (and the custom weights' file); output: the best checkpoint (its path relative to
    ``remote_dir``; a model weight, linked to this session) and the benchmark report."""
    if not workflow_supported(env.api):
        return
    workflow = env.api.app.workflow
    workflow.add_input_project(env.project_id, task_id=env.task_id)
    if custom_weights:
        workflow.add_input_file(custom_weights, model_weight=True, task_id=env.task_id)
    best = env.api.file.get_info_by_path(env.team_id, remote_dir.rstrip("/") + "/" + best_checkpoint)
    node = sly.WorkflowSettings(title="Train UNet", url=f"/apps/sessions/{env.task_id}", url_title="Show Results")
    if best is not None:
        folder = sly.WorkflowSettings(title="Checkpoints", icon="folder", icon_color="#FFA500",
                                      icon_bg_color="#FFE8BE", url=f"/files/{best.id}/true", url_title="Open Folder")
        workflow.add_output_file(best, model_weight=True, meta=sly.WorkflowMeta(folder, node), task_id=env.task_id)
    if report is not None:
        link = sly.WorkflowSettings(title="Model Benchmark", icon="assignment", icon_color="#dcb0ff",
                                    icon_bg_color="#faebff", url=f"/model-benchmark?id={report.id}",
                                    url_title="Open Benchmark Report")
        workflow.add_output_file(report, meta=sly.WorkflowMeta(link, node), task_id=env.task_id)
