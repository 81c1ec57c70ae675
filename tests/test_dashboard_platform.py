"""The train dashboard in platform mode against a loopback Supervisely server (tests/sly_loopback.py):
download by project id (cached), upload of the artifact tree to Team Files, task output."""
from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import time

import pytest
import requests

from tests.dashboard_harness import DashboardServer
from tests.sly_loopback import LoopbackPlatform

pytestmark = pytest.mark.slow  # starts processes or servers

TASK_ID = 4242


@pytest.fixture(scope="module")
def platform(tiny_project, tmp_path_factory):
    """The tiny project plus a point class (no area: must not be selectable in step 03)."""
    project = tmp_path_factory.mktemp("platform_project") / "tiny"
    shutil.copytree(tiny_project, project)
    meta = json.loads((project / "meta.json").read_text())
    meta["classes"].append({"title": "keypoint", "shape": "point", "color": "#00FF00"})
    (project / "meta.json").write_text(json.dumps(meta))
    with LoopbackPlatform(project) as platform:
        yield platform


@pytest.fixture(scope="module")
def app(platform, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash_platform")
    server = DashboardServer({"SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token, "TASK_ID": str(TASK_ID),
                              "TEAM_ID": str(platform.team_id), "WORKSPACE_ID": str(platform.workspace_id),
                              "PROJECT_ID": str(platform.project_id), "SLY_APP_DATA_DIR": str(tmp / "data"),
                              # the SDK's retries, also used for the upload's: two tries each, no sleeping
                              "SUPERVISELY_PUBLIC_API_RETRIES": "2", "SUPERVISELY_PUBLIC_API_RETRY_SLEEP_SEC": "0"},
                             tmp / "app.log")
    server.data_dir = tmp / "data"
    yield server
    server.close()


def test_platform_errors_are_shown_on_the_card(app, platform):
    platform.fail("projects.info", status=404)
    app.click("s01_load")
    assert app.status(1) == ("error", f"project {platform.project_id} not found on the platform")
    platform.fail("projects.info", status=403)
    app.click("s01_load")
    status, text = app.status(1)
    assert status == "error" and text.startswith("downloading the project failed: 403 Client Error: Forbidden")
    assert app.state()["s02_card"]["disabled"]["disabled"]


def test_download_by_project_id_then_cached(app, platform, tiny_project):
    app.click("s01_load")
    assert app.status(1) == ("success", "Project ready: downloaded."), app.log_tail()
    assert platform.unknown == []
    progress = app.data()["s01_progress"]
    assert progress["n"] == len(platform.images) and progress["percent"] == 100
    local = app.data_dir / "projects" / str(platform.project_id)
    for image in platform.images.values():  # what the server sent arrived unchanged
        ds_name = next(d["name"] for d in platform.datasets if d["id"] == image["dataset_id"])
        assert (local / ds_name / "img" / image["name"]).read_bytes() == image["bytes"]
    assert "2 dataset(s) (ds_a, ds_b)" in app.text("s01_summary")

    downloads = platform.methods().count("images.bulk.download")
    app.click("s01_restart")
    app.click("s01_load")
    assert app.status(1) == ("success", "Project ready: the cached copy is current: download skipped.")
    assert platform.methods().count("images.bulk.download") == downloads

    platform.updated_at = "2026-02-01T00:00:00.000Z"  # the project changed on the platform
    app.click("s01_restart")
    app.click("s01_load")
    assert app.status(1) == ("success", "Project ready: downloaded.")
    assert platform.methods().count("images.bulk.download") > downloads


def test_train_and_upload_the_artifact_tree(app, platform):
    app.click("s02_apply", s02_method={"value": "datasets"}, s02_train_datasets={"value": ["ds_a"]},
              s02_val_datasets={"value": ["ds_b"]})
    assert app.status(2) == ("success", "Training set: 6 image(s), validation set: 4 image(s).")
    rows = [row[0]["data"] for row in app.data()["s03_table"]["table_data"]]
    assert sorted(rows) == ["box", "disk", "triangle"]  # the point class is not offered
    assert "Not selectable, no area: keypoint (point)." in app.text("s03_notes")
    app.click("s03_apply")
    assert app.status(3)[0] == "success" and "disk, triangle, box" in app.status(3)[1]
    app.click("s04_apply", s04_mode={"value": "custom"}, s04_custom_path={"value": "/augs/missing.json"})
    assert app.status(4) == ("error", "Team Files: /augs/missing.json not found")
    flip = {"pipeline": [{"category": "flip", "name": "Fliplr", "params": {"p": 0.5}}], "random_order": False}
    platform.files["/augs/flip.json"] = json.dumps(flip).encode()  # a custom config in Team Files
    app.click("s04_apply", s04_mode={"value": "custom"}, s04_custom_path={"value": "/augs/flip.json"})
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "none"})
    app.click("s06_apply", s06_input_height={"value": "64"}, s06_input_width={"value": "64"},
              s06_epochs={"value": "1"}, s06_batch_size={"value": "4"}, s06_gpu_id={"value": ["cpu"]},
              s06_speed_test={"value": False}, s06_experiment={"value": "exp"},
              s06_benchmark={"value": False}, s06_stop_app={"value": False})  # the app serves the tests below
    for step in range(2, 7):
        assert app.status(step)[0] == "success", (step, app.status(step))
    app.click("s07_train")
    assert app.wait_phase() == "finished", (app.status(7), app.log_tail())

    remote = f"/unet/{TASK_ID}_exp/"
    assert app.data()["s07_location"]["text"] == f"Artifacts: {remote}"
    run_dir = app.data_dir / "runs" / f"{TASK_ID}_exp"
    local = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*")
             if p.is_file() and p.name != ".unet_upload.json"}  # where this run uploads to: not uploaded
    assert json.loads((run_dir / ".unet_upload.json").read_text()) == {"remote_dir": f"/unet/{TASK_ID}_exp/"}
    uploaded = {path[len(remote):]: data for path, data in platform.files.items() if path.startswith(remote)}
    assert set(uploaded) == set(local) and all(uploaded[k] == local[k] for k in local)  # byte-identical
    assert_experiment(platform, remote, model="UNet", benchmark=False)
    for name in ("checkpoints/model_001_best.pth", "info/ui_state.json", "info/model_classes.json", "open_app.lnk",
                 "eval/report.html", "eval/metrics.json", "model_meta.json"):
        assert name in uploaded, name
    assert "eval/speed.json" not in uploaded  # the speed test was switched off
    # the report is named where the user finds it: in Team Files, inside the uploaded folder
    assert app.data()["s07_eval"]["text"].endswith(f"Report: {remote}eval/report.html")
    assert json.loads(uploaded["info/ui_state.json"])["widgets"]["s06_experiment"]["value"] == "exp"
    assert json.loads(uploaded["info/augs_config.json"]) == flip
    assert uploaded["open_app.lnk"].decode().strip() == f"{platform.url}/apps/sessions/{TASK_ID}"
    upload = app.data()["s07_upload"]
    assert upload["percent"] == 100
    # the task output names the folder, then the experiment (the loopback refuses an invalid one)
    general, experiment = platform.task_outputs
    assert general["taskId"] == TASK_ID and general["output"]["general"]["title"] == remote
    assert experiment["output"]["experiment"]["data"]["artifacts_dir"] == remote
    # workflow is off in a development environment (ENV unset): not a single workflow call, only a debug line
    assert not [m for m in platform.methods() if m.startswith("workflow.")] and platform.workflow == []
    assert platform.unknown == []
    assert app.process.poll() is None  # "Stop the app when done" was switched off


def assert_experiment(platform, remote: str, model: str, benchmark: bool) -> dict:
    """experiment_info.json beside the checkpoints, as the SDK's ExperimentInfo reads it, agreeing with the run."""
    from supervisely.nn.experiments import ExperimentInfo
    info = json.loads(platform.files[remote + "experiment_info.json"])
    experiment = ExperimentInfo(**info)  # raises when a required field is missing
    assert experiment.framework_name == "UNet" and experiment.task_type == "semantic segmentation"
    assert experiment.model_name == model and experiment.task_id == TASK_ID
    assert experiment.project_id == platform.project_id and experiment.artifacts_dir == remote
    for path in [*experiment.checkpoints, experiment.hyperparameters, experiment.model_meta, experiment.app_state]:
        assert remote + path in platform.files, path
    assert experiment.best_checkpoint in {p.split("/")[-1] for p in experiment.checkpoints}
    assert "best" in experiment.best_checkpoint
    train_set = json.loads(platform.files[remote + "info/train_set.json"])
    val_set = json.loads(platform.files[remote + "info/val_set.json"])
    assert (experiment.train_size, experiment.val_size) == (len(train_set), len(val_set))
    assert json.loads(platform.files[remote + experiment.hyperparameters])["model"] == model
    meta = json.loads(platform.files[remote + experiment.model_meta])
    classes = json.loads(platform.files[remote + "info/model_classes.json"])
    assert [c["title"] for c in meta["classes"]] == [c["title"] for c in classes]
    if benchmark:
        assert experiment.evaluation_report_id is not None and experiment.evaluation_metrics
    else:  # our own evaluation's headline, which eval/metrics.json holds
        headline = json.loads(platform.files[remote + "eval/metrics.json"])["headline"]
        assert experiment.evaluation_report_id is None and experiment.evaluation_metrics == headline
    return info


def test_upload_that_gives_up_keeps_the_run_and_shows_the_command(app, platform):
    """After test_train_and_upload_the_artifact_tree: the same experiment again, while uploads fail."""
    platform.fail("file-storage.bulk.upload", "drop", times=2)  # both tries of the first batch
    app.click("s07_restart")
    app.click("s07_train")
    assert app.wait_phase() == "upload failed", (app.status(7), app.log_tail())
    run_dir = app.data_dir / "runs" / f"{TASK_ID}_exp_000"  # the engine's new folder: the first run's is kept
    status, text = app.status(7)
    text = html.unescape(text)
    assert status == "error" and f"The artifacts are kept in {run_dir}; upload them later with:<br>" in text, text
    command = text.split("<br>")[-1]
    remote = f"/unet/{TASK_ID}_exp_000/"  # a new run: the first run's folder is taken
    assert f"uploading the artifacts to {remote} failed 2 time(s) in a row" in text
    assert command.endswith(f"-m train_app.upload_run {run_dir} --team-id {platform.team_id} --remote {remote} "
                            f"--task-id {TASK_ID}"), command
    assert (run_dir / "checkpoints" / "model_001_best.pth").is_file()
    assert not any(path.startswith(remote) for path in platform.files)

    env = {**os.environ, "SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token}
    result = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    local = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()} - {".unet_upload.json"}
    assert {path[len(remote):] for path in platform.files if path.startswith(remote)} == local
    assert platform.task_outputs[-1]["output"]["general"]["title"] == remote



def test_custom_weights_from_team_files_bring_their_classes(app, platform):
    """After the runs above: step 05 takes a checkpoint of the uploaded run from Team Files together with its
    info/model_classes.json, which the engine maps the head's channels with."""
    remote = f"/unet/{TASK_ID}_exp/checkpoints/model_001_best.pth"
    app.click("s05_restart")
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "custom"},
              s05_custom_path={"value": remote})
    assert app.status(5)[0] == "success", app.status(5)
    local = app.data_dir / "team_files" / "unet" / f"{TASK_ID}_exp"
    assert (local / "checkpoints" / "model_001_best.pth").read_bytes() == platform.files[remote]
    assert (local / "info" / "model_classes.json").read_bytes() == platform.files[f"/unet/{TASK_ID}_exp/info/model_classes.json"]


def test_a_failed_benchmark_and_a_refused_experiment_keep_the_uploaded_run(app, platform):
    """After the tests above (step 05 holds custom weights): the benchmark cannot find the validation images and
    the platform refuses the experiment; the run is uploaded all the same, the card says what failed, the app
    stays up for the user to read it."""
    platform.fail("images.list", status=400)  # not a transient status: no retry
    set_output = platform.handlers["tasks.output.set"]
    platform.handlers["tasks.output.set"] = lambda call: (
        (400, {"error": "experiments are not enabled"}) if "experiment" in call.body["output"] else set_output(call))
    try:
        app.click("s06_apply", s06_input_height={"value": "64"}, s06_input_width={"value": "64"},
                  s06_epochs={"value": "1"}, s06_batch_size={"value": "4"}, s06_gpu_id={"value": ["cpu"]},
                  s06_speed_test={"value": False}, s06_experiment={"value": "faults"},
                  s06_benchmark={"value": True}, s06_stop_app={"value": True})
        app.click("s07_train")
        assert app.wait_phase() == "finished", (app.status(7), app.log_tail())
    finally:
        platform.handlers["tasks.output.set"] = set_output
    status, text = app.status(7)
    assert status == "error", text
    assert "The Model Benchmark failed" in text and "finding the validation images on the platform failed" in text
    assert "The run is uploaded but not in the Experiments table" in text and "experiments are not enabled" in text
    remote = f"/unet/{TASK_ID}_faults/"
    assert remote + "checkpoints/model_001_best.pth" in platform.files
    assert remote + "experiment_info.json" in platform.files  # written before the platform refused it
    assert platform.task_outputs[-1]["output"]["general"]["title"] == remote
    assert app.data()["s07_benchmark"]["hide"]  # no report link
    assert app.process.poll() is None


def test_a_platform_run_ends_as_the_original_does(tiny_project, tmp_path):
    """Defaults of a platform run, on a platform with workflow: the experiment is named after the project; after
    the upload, the Model Benchmark's report, the experiment (linking that report) and the workflow nodes; then
    the task stops itself."""
    with LoopbackPlatform(tiny_project) as platform:
        server = DashboardServer({"SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token, "ENV": "production",
                                  "TASK_ID": str(TASK_ID), "TEAM_ID": str(platform.team_id),
                                  "WORKSPACE_ID": str(platform.workspace_id), "PROJECT_ID": str(platform.project_id),
                                  "SLY_APP_DATA_DIR": str(tmp_path / "data")}, tmp_path / "app.log")
        try:
            server.click("s01_load")
            server.click("s02_apply", s02_method={"value": "datasets"}, s02_train_datasets={"value": ["ds_a"]},
                         s02_val_datasets={"value": ["ds_b"]})
            for step in ("s03_apply", "s04_apply"):
                server.click(step)
            server.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "none"})
            name = platform.projects[platform.project_id]["name"]
            assert server.state()["s06_experiment"]["value"] == name  # the project's name, as in the original
            server.click("s06_apply", s06_input_height={"value": "64"}, s06_input_width={"value": "64"},
                         s06_epochs={"value": "1"}, s06_batch_size={"value": "4"}, s06_gpu_id={"value": ["cpu"]},
                         s06_speed_test={"value": False})
            assert server.status(6)[0] == "success", server.status(6)
            server.click("s07_train")
            assert _exit_code_when_stopped(server) == 0, server.log_tail()  # the app stopped itself
        finally:
            server.close()
        assert "Application has been shut down successfully" in server.log_tail(200000)
        assert platform.task_outputs[-1]["output"]["experiment"]["data"]["project_preview"].startswith(platform.url)
        remote = f"/unet/{TASK_ID}_{name}/"
        info = assert_experiment(platform, remote, model="UNet", benchmark=True)
        report_path = next(p for p in platform.files if p.startswith("/model-benchmark/") and p.endswith("template.vue"))
        report_id = platform._file_info(report_path)["id"]
        assert info["evaluation_report_id"] == report_id and info["evaluation_report_link"].endswith(f"id={report_id}")
        experiment = platform.task_outputs[-1]["output"]["experiment"]["data"]
        assert experiment["evaluation_report_id"] == report_id and experiment["primary_metric"] == "mIoU"
        assert 0 <= experiment["evaluation_metrics"]["mIoU"] <= 1
        best = platform._file_info(remote + "checkpoints/" + info["best_checkpoint"])["id"]
        nodes = {(n["direction"], n["type"], n["id"]) for n in platform.workflow}
        assert nodes == {("input", "project", platform.project_id), ("output", "model_weight", best),
                         ("output", "file", report_id)}, platform.workflow
        assert all(n["node"] == {"type": "task", "id": TASK_ID} for n in platform.workflow)
        assert platform.unknown == []


def _exit_code_when_stopped(server: DashboardServer, timeout: float = 600) -> int:
    """Wait for the app to stop itself; fail at once when its run ends without stopping (a failure on the card)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.process.poll() is not None:
            return server.process.returncode
        try:
            phase, (status, text) = server.text("s07_phase"), server.status(7)
        except requests.ConnectionError:  # stopping right now
            continue
        assert phase in ("running", "uploading", "benchmarking") or status == "success", (phase, text)
        time.sleep(0.5)
    raise AssertionError(f"the app did not stop in {timeout} s:\n{server.log_tail()}")
