"""Platform faults against the loopback server (tests/sly_loopback.py): dropped connections, 5xx and
timeouts during the project download (the train dashboard, step 01) and the artifact upload (the
upload command the dashboard uses and prints, ``python -m train_app.upload_run``).

Retries are made fast through the SDK's own settings (SUPERVISELY_PUBLIC_API_RETRIES=2, sleep 0), so each
request is tried twice by the SDK and the app's outer retries are reached with few injected faults.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import Counter

import pytest

from tests.dashboard_harness import DashboardServer
from tests.sly_loopback import LoopbackPlatform
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # starts processes or servers

SDK_RETRIES = 2
DOWNLOAD_ATTEMPTS = 3  # train_app.platform_io.DOWNLOAD_ATTEMPTS
FAST_RETRIES = {"SUPERVISELY_PUBLIC_API_RETRIES": str(SDK_RETRIES), "SUPERVISELY_PUBLIC_API_RETRY_SLEEP_SEC": "0"}
TEAM_SRC = REPO / "supervisely" / "train" / "src"


@pytest.fixture()
def platform(tiny_project):
    with LoopbackPlatform(tiny_project) as platform:
        platform.stall_seconds = 0.5
        yield platform


def _dashboard(platform, tmp_path):
    server = DashboardServer({"SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token, "TASK_ID": "42",
                              "TEAM_ID": str(platform.team_id), "WORKSPACE_ID": str(platform.workspace_id),
                              "PROJECT_ID": str(platform.project_id), "SLY_APP_DATA_DIR": str(tmp_path / "data"),
                              **FAST_RETRIES}, tmp_path / "app.log")
    server.data_dir = tmp_path / "data"
    return server


def test_download_retries_drops_5xx_and_timeouts(platform, tmp_path):
    app = _dashboard(platform, tmp_path)
    try:
        # the SDK retries each request: a drop, a stalled request, a 503, a gateway timeout
        platform.fail("images.list", "drop")
        platform.fail("annotations.bulk.info", "timeout")
        platform.fail("projects.meta", 503)
        # two failures of one request exhaust the SDK's retries: the app downloads again
        platform.fail("images.bulk.download", 500)
        platform.fail("images.bulk.download", 504)
        app.click("s01_load")
        assert app.status(1) == ("success", "Project ready: downloaded."), app.log_tail()
        assert "attempt 2 of 3" in app.log_tail()
        local = app.data_dir / "projects" / str(platform.project_id)
        for image in platform.images.values():  # complete and unchanged after the retries
            ds_name = next(d["name"] for d in platform.datasets if d["id"] == image["dataset_id"])
            assert (local / ds_name / "img" / image["name"]).read_bytes() == image["bytes"]
        assert (local / ".unet_download.json").is_file()

        # a longer outage: every attempt fails; bounded, a clear error, no cached copy marked current
        platform.updated_at = "2026-02-01T00:00:00.000Z"
        before = platform.methods().count("images.bulk.download")
        platform.fail("images.bulk.download", 500, times=SDK_RETRIES * DOWNLOAD_ATTEMPTS)
        app.click("s01_restart")
        app.click("s01_load")
        status, text = app.status(1)
        assert status == "error" and text.startswith("downloading the project failed: Retry limit exceeded"), text
        assert platform.methods().count("images.bulk.download") - before == SDK_RETRIES * DOWNLOAD_ATTEMPTS
        assert not (local / ".unet_download.json").exists()
        app.click("s01_load")  # the platform is back
        assert app.status(1) == ("success", "Project ready: downloaded."), app.log_tail()
    finally:
        app.close()


def _run_dir(tmp_path, n_files=120):
    """A run folder of three upload batches (50 files each at most)."""
    run = tmp_path / "runs" / "42_exp"
    for i in range(n_files):
        path = run / ("checkpoints" if i % 2 else "info") / f"file_{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(100 + i))
    return run


def _upload(platform, run_dir, *extra, command=None):
    env = {**os.environ, **FAST_RETRIES, "SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token}
    if command is None:
        command = [sys.executable, "-m", "train_app.upload_run", str(run_dir), "--team-id", str(platform.team_id),
                   "--remote", "/unet/42_exp/", "--task-id", "42", *extra]
        env["PYTHONPATH"] = str(TEAM_SRC)
    return subprocess.run(command, shell=isinstance(command, str), env=env, capture_output=True, text=True,
                          timeout=120)


def _uploaded(platform, remote):
    return {path[len(remote):]: data for path, data in platform.files.items() if path.startswith(remote)}


def _local(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".unet_upload.json"}


def test_upload_retries_and_never_stores_a_file_twice(platform, tmp_path):
    run = _run_dir(tmp_path)
    platform.files["/unet/42_exp/old.txt"] = b"an earlier run of the same name"
    upload = platform.handlers["file-storage.bulk.upload"]
    calls = []

    def answer_lost_once(call):  # batch 2 arrives, but the gateway loses the answer
        calls.append(call)
        status, body = upload(call)
        return (502, {"error": "bad gateway"}) if len(calls) == 2 else (status, body)

    platform.fail("file-storage.bulk.upload", "drop")  # batch 1, first try
    platform.handlers["file-storage.bulk.upload"] = answer_lost_once
    platform.fail("file-storage.list", 500)  # retried by the SDK
    result = _upload(platform, run, "--timeout", "30")  # no answer is late here but the injected ones
    assert result.returncode == 0, result.stderr[-3000:]
    remote = "/unet/42_exp_000/"  # the folder was taken: named as the SDK names it
    assert f"to Team Files {remote}" in result.stdout
    assert _uploaded(platform, remote) == _local(run)
    assert not any(p.startswith("/unet/42_exp_001") for p in platform.files)
    duplicates = [p for p, n in Counter(platform.stored).items() if n > 1]
    assert len(calls) == 3 and not duplicates, duplicates  # batch 2 was not sent again
    assert platform.task_outputs[-1]["output"]["general"]["title"] == remote

    # a timeout in the middle of a later upload of the same run, then run again: same folder, nothing twice
    (run / "info" / "late.txt").write_text("written after the first upload")
    platform.fail("file-storage.bulk.upload", "timeout")
    result = _upload(platform, run, "--timeout", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Read timed out. (read timeout=0.2)); retry 1 of 1" in result.stderr
    assert _uploaded(platform, remote) == _local(run)
    assert platform.stored.count(remote + "info/late.txt") == 1
    assert [p for p, n in Counter(platform.stored).items() if n > 1] == []


def test_upload_gives_up_keeps_the_run_and_prints_the_command(platform, tmp_path):
    run = _run_dir(tmp_path)
    kept = _local(run)
    calls = []

    def first_batch_only(call):  # the platform goes away after the first batch
        calls.append(call)
        if len(calls) > 1:
            return 503, {"error": "unavailable"}
        return upload(call)

    upload = platform.handlers["file-storage.bulk.upload"]
    platform.handlers["file-storage.bulk.upload"] = first_batch_only
    # A generous timeout: were the first batch's answer late, its retry would skip it and count one call fewer.
    result = _upload(platform, run, "--timeout", "30")
    assert result.returncode == 1
    assert "uploading the artifacts to /unet/42_exp/ failed 2 time(s) in a row: 503 Server Error" in result.stderr
    assert f"The artifacts are kept in {run}; upload them later with:" in result.stderr
    assert len(calls) == 1 + SDK_RETRIES  # bounded: batch 1, then batch 2 as often as the SDK would retry
    assert _local(run) == kept  # the run folder is untouched
    assert platform.task_outputs == []
    command = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"PYTHONPATH=\S+ \S+ -m train_app\.upload_run \S+ --team-id 7 --remote /unet/42_exp/ "
                        r"--task-id 42", command), command
    assert shlex.split(command)[4] == str(run)

    platform.handlers["file-storage.bulk.upload"] = upload  # the platform is back: the printed command finishes
    result = _upload(platform, run, command=command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _uploaded(platform, "/unet/42_exp/") == kept
    assert [p for p, n in Counter(platform.stored).items() if n > 1] == []  # the first batch was not sent again
    assert platform.task_outputs[-1]["output"]["general"]["title"] == "/unet/42_exp/"
