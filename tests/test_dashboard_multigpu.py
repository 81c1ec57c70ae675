"""The train dashboard's multi-GPU path: with two GPUs selected, step 07 launches the run through torchrun
(custom_net.distributed.run_torchrun) and follows it like an in-process run. The app is started with a
faked device list (tests/dashboard_two_gpus.py); the two torchrun processes train on the CPU with gloo."""
from __future__ import annotations

import json
import shlex

import pytest

from custom_net.config import parse_config
from tests.dashboard_harness import DashboardServer

pytestmark = pytest.mark.slow  # starts processes or servers


@pytest.fixture(scope="module")
def app(tiny_project, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash_multigpu")
    server = DashboardServer({"UNET_PROJECT_DIR": str(tiny_project), "UNET_RESULTS_DIR": str(tmp / "results"),
                              "SLY_APP_DATA_DIR": str(tmp / "data")}, tmp / "app.log", app="tests.dashboard_two_gpus:app")
    server.results = tmp / "results"
    yield server
    server.close()


def test_two_gpus_train_through_torchrun(app):
    app.click("s01_load")
    app.click("s02_apply", s02_method={"value": "datasets"}, s02_train_datasets={"value": ["ds_a"]},
              s02_val_datasets={"value": ["ds_b"]})
    app.click("s03_apply")
    app.click("s04_apply", s04_mode={"value": "none"})
    app.click("s05_apply", s05_model={"selectedRow": 0}, s05_weights={"value": "none"})
    for step in range(1, 6):
        assert app.status(step)[0] == "success", (step, app.status(step))
    assert [item["value"] for item in app.data()["s06_gpu_id"]["items"]] == ["cpu", "cuda:0", "cuda:1"]
    app.click("s06_apply", s06_gpu_id={"value": ["cuda:0", "cuda:1"]}, s06_input_height={"value": "64"},
              s06_input_width={"value": "64"}, s06_epochs={"value": "2"}, s06_batch_size={"value": "2"},
              s06_vis_count={"value": "2"}, s06_speed_test={"value": False}, s06_experiment={"value": "ddp"})
    assert app.status(6) == ("success", "Settings checked: 2 epoch(s), batch 2, input 64x64, "
                                        "on GPUs 0, 1 (torchrun, batch per GPU)."), app.status(6)
    command = app.text("s07_command")
    prefix = "CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc-per-node 2 custom_net/train.py "
    assert command.startswith(prefix)
    assert parse_config(shlex.split(command[len(prefix):])).gpu_id == "auto"  # process N takes the N-th GPU

    app.click("s07_train")
    assert app.wait_phase(timeout=300) == "finished", (app.status(7), app.log_tail())
    data = app.data()
    run_dir = app.results / "ddp"
    assert "x 2 processes" in data["s07_log"]["text"]
    # followed live as an in-process run: progress, charts, previews (cut from rank 0's PNGs), evaluation
    assert data["s07_epochs"]["n"] == 2 and data["s07_iterations"]["percent"] == 100
    series = {s["name"]: s["data"] for s in data["s07_metrics"]["series"]}
    assert [x for x, _ in series["IoU"]] == [1, 2]
    assert [len(col) for col in data["s07_gallery"]["content"]["layout"]] == [2, 2]
    assert data["s07_eval"]["text"].endswith(f"Report: {run_dir}/eval/report.html")
    assert data["s07_location"]["text"] == f"Artifacts: {run_dir}"
    assert [p.name for p in run_dir.parent.iterdir()] == ["ddp"]  # one artifact tree
    summary = json.loads((run_dir / "info" / "summary.json").read_text())
    assert summary["status"] == "finished" and not (run_dir / "eval" / "speed.json").exists()
    ui_state = json.loads((run_dir / "info" / "ui_state.json").read_text())
    assert ui_state["gpusId"] == [0, 1] and ui_state["widgets"]["s06_gpu_id"]["value"] == ["cuda:0", "cuda:1"]


def test_stop_reaches_the_torchrun_processes(app):
    app.click("s06_restart")
    app.click("s06_apply", s06_epochs={"value": "200"}, s06_experiment={"value": "ddp_stop"})
    assert app.status(6)[0] == "success", app.status(6)
    app.click("s07_train")
    app.wait_phase(lambda phase: phase != "running" or app.data()["s07_epochs"]["n"] >= 1, timeout=120)
    app.click("s07_stop")
    assert app.wait_phase(timeout=120) == "stopped", (app.status(7), app.log_tail())
    summary = json.loads((app.results / "ddp_stop" / "info" / "summary.json").read_text())
    assert summary["status"] == "stopped" and 1 <= summary["last_epoch"] < 200
    assert app.data()["s07_eval"]["text"] == "Evaluation skipped: the run was stopped before its last epoch."
