"""Platform transfers: the project download (cached), Team Files inputs, the artifact upload.

Transient failures (dropped connections, timeouts, 5xx) are retried with the SDK's own bounded backoff
(``api.retry_count`` attempts, ``api.retry_sleep_sec * 2**n`` seconds, at most 60; set by
``SUPERVISELY_PUBLIC_API_RETRIES`` / ``SUPERVISELY_PUBLIC_API_RETRY_SLEEP_SEC``):
- JSON calls (the download, listings) already retry inside ``sly.Api.post``; the download is retried whole
  when the SDK gives up (a longer outage).
- The upload does not go through the SDK's retry: it re-sends a multipart body that the first attempt
  consumed (the request then hangs). Each batch is posted once per attempt, with a timeout, and only the
  files not yet in Team Files are sent again, always to the same folder (``RunFolder.upload_state``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Callable

import requests
import supervisely as sly
from requests_toolbelt import MultipartEncoder
from supervisely.io.network_exceptions import RETRY_STATUS_CODES

from custom_net.run_folder import RunFolder
from train_app.environment import Environment

logger = logging.getLogger("train_dashboard")
CACHE_MARKER = ".unet_download.json"
DOWNLOAD_ATTEMPTS = 3  # whole downloads; each request inside is retried by the SDK
UPLOAD_TIMEOUT = (10.0, 300.0)  # seconds to connect, to wait for the answer to one batch
BATCH_BYTES, BATCH_FILES = 20 * 1024 * 1024, 50  # as the SDK's upload_directory


class PlatformError(ValueError):
    """The platform refused or could not be reached; the message says what was being done."""


def _platform_call(what: str):
    """Turn the SDK's HTTP errors into a PlatformError naming the operation (shown on the card)."""
    def wrap(func):
        @functools.wraps(func)
        def call(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except requests.RequestException as e:  # incl. the SDK's RetryError after its retries
                raise PlatformError(f"{what} failed: {e}") from e
        return call
    return wrap


def transient(error: BaseException) -> bool:
    """Worth retrying: a dropped connection, a timeout, a 5xx (or 408/429), the SDK giving up its retries."""
    if isinstance(error, requests.HTTPError):
        return error.response is not None and error.response.status_code in RETRY_STATUS_CODES
    return isinstance(error, requests.RequestException)


def backoff(api: sly.Api, attempt: int) -> float:
    """The SDK's schedule: retry_sleep_sec doubled each attempt, at most a minute."""
    return min(api.retry_sleep_sec * 2 ** attempt, 60)


@_platform_call("downloading the project")
def download_project(env: Environment, progress: Callable[[int, int], None]) -> tuple[Path, bool, str]:
    """The project in ``data_dir/projects/<id>``; downloaded only when the cached copy is older than the
    project on the platform. Returns (folder, downloaded, the project's name on the platform).
    ``progress(done, total)`` counts images."""
    if env.project_id is None:
        raise ValueError("no project: start the app from an image project's context menu")
    info = env.api.project.get_info_by_id(env.project_id)
    if info is None:
        raise ValueError(f"project {env.project_id} not found on the platform")
    folder = env.data_dir / "projects" / str(env.project_id)
    stamp = {"project_id": info.id, "updated_at": info.updated_at}
    marker = folder / CACHE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder, False, info.name
    for attempt in range(DOWNLOAD_ATTEMPTS):
        shutil.rmtree(folder, ignore_errors=True)
        done = [0]

        def on_image(n):
            done[0] += n
            progress(min(done[0], info.items_count), info.items_count)

        try:
            sly.download_project(env.api, env.project_id, str(folder), progress_cb=on_image, log_progress=False)
            break
        except requests.RequestException as e:
            if not transient(e) or attempt == DOWNLOAD_ATTEMPTS - 1:
                raise
            logger.warning("project download failed (%s); attempt %d of %d in %.0f s",
                           e, attempt + 2, DOWNLOAD_ATTEMPTS, backoff(env.api, attempt))
            time.sleep(backoff(env.api, attempt))
    marker.write_text(json.dumps(stamp))  # written last: an interrupted download is never "current"
    return folder, True, info.name


@_platform_call("reading Team Files")
def fetch_team_file(env: Environment, remote_path: str) -> Path:
    """A Team Files file (custom augs config or weights) downloaded into data_dir."""
    if not env.api.file.exists(env.team_id, remote_path):
        raise FileNotFoundError(f"Team Files: {remote_path} not found")
    local = env.data_dir / "team_files" / remote_path.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    env.api.file.download(env.team_id, remote_path, str(local))
    return local


def fetch_checkpoint(env: Environment, remote_path: str) -> Path:
    """A Team Files checkpoint, and its run's ``info/model_classes.json`` beside it when the run has one: the
    engine carries the head's channels over to the classes of the same names."""
    local = fetch_team_file(env, remote_path)
    classes = RunFolder.of_checkpoint(PurePosixPath(remote_path)).model_classes
    if env.api.file.exists(env.team_id, str(classes)):
        fetch_team_file(env, str(classes))
    return local


class UploadError(PlatformError):
    """The upload gave up; the run folder is intact and ``command`` uploads it later."""

    def __init__(self, message: str, run_dir: Path, command: str):
        super().__init__(f"{message}. The artifacts are kept in {run_dir}; upload them later with:\n{command}")
        self.run_dir, self.command = run_dir, command


def upload_command(env: Environment, run_dir: Path, remote_dir: str) -> str:
    """The shell command that uploads ``run_dir`` later (SERVER_ADDRESS and API_TOKEN from the environment)."""
    src = Path(__file__).resolve().parent.parent
    return (f"PYTHONPATH={shlex.quote(str(src))} {shlex.quote(sys.executable)} -m train_app.upload_run "
            f"{shlex.quote(str(run_dir))} --team-id {env.team_id} --remote {shlex.quote(remote_dir)}"
            + (f" --task-id {env.task_id}" if env.task_id is not None else ""))


def _destination(env: Environment, run_dir: Path, remote_dir: str) -> str:
    """The Team Files folder of this run: chosen once (``remote_dir``, or ``remote_dir_000`` ... when taken,
    as the SDK names it) and kept in the run folder, so retries and later uploads complete the same one."""
    state = RunFolder(run_dir).upload_state
    if state.is_file():
        return json.loads(state.read_text())["remote_dir"]
    remote = env.api.file.get_free_dir_name(env.team_id, remote_dir).rstrip("/") + "/"
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps({"remote_dir": remote}))
    os.replace(tmp, state)
    return remote


def _post_batch(env: Environment, batch: list[tuple[Path, str]], timeout) -> None:
    """One bulk upload request; a fresh body each attempt (a consumed stream cannot be sent again)."""
    with ExitStack() as files:
        fields = []
        for local, remote in batch:
            name = PurePosixPath(remote).name
            fields += [("name", name), ("path", str(PurePosixPath(remote).parent) + "/"),
                       ("file", (name, files.enter_context(open(local, "rb")), "application/octet-stream"))]
        encoder = MultipartEncoder(fields=fields)
        response = requests.post(f"{env.api.api_server_address}/v3/file-storage.bulk.upload?teamId={env.team_id}",
                                 data=encoder, headers={**env.api.headers, "Content-Type": encoder.content_type},
                                 timeout=timeout)
    if response.status_code != 200:
        sly.Api._raise_for_status(response)


def _batches(files: list[tuple[Path, str, int]]):
    """(local, remote, size) in groups of at most BATCH_FILES files and BATCH_BYTES (a bigger file alone)."""
    batch, size = [], 0
    for local, remote, n in files:
        if batch and (size + n > BATCH_BYTES or len(batch) == BATCH_FILES):
            yield batch
            batch, size = [], 0
        batch.append((local, remote, n))
        size += n
    if batch:
        yield batch


def upload_artifacts(env: Environment, run_dir: Path, remote_dir: str,
                     progress: Callable[[int, int], None] = lambda done, total: None,
                     timeout=UPLOAD_TIMEOUT) -> str:
    """Upload the run folder to Team Files and make it the task's output; returns the remote folder.
    Transient failures are retried (bounded backoff, ``api.retry_count`` failures in a row at most); a file
    already in Team Files with its size is not sent again. On final failure raises UploadError with the
    command that finishes the upload later."""
    remote, attempts, failures = remote_dir, max(env.api.retry_count, 1), 0  # gives up after `attempts` in a row
    while True:
        try:
            remote = _destination(env, run_dir, remote_dir)
            files = [(p, remote + p.relative_to(run_dir).as_posix(), p.stat().st_size)
                     for p in sorted(run_dir.rglob("*")) if p.is_file() and p != RunFolder(run_dir).upload_state]
            total = sum(n for _, _, n in files)
            present = {f.path: f.sizeb for f in env.api.file.list(env.team_id, remote, return_type="fileinfo")}
            todo = [f for f in files if present.get(f[1]) != f[2]]  # what arrived before is not sent again
            done = total - sum(n for _, _, n in todo)
            progress(done, total)
            for batch in _batches(todo):
                _post_batch(env, [(local, dst) for local, dst, _ in batch], timeout)
                done += sum(n for _, _, n in batch)
                progress(done, total)
                failures = 0
            break
        except requests.RequestException as e:
            failures += 1
            if not transient(e) or failures == attempts:
                raise UploadError(f"uploading the artifacts to {remote} failed {failures} time(s) in a row: {e}",
                                  run_dir, upload_command(env, run_dir, remote)) from e
            logger.warning("upload to %s failed (%s); retry %d of %d in %.0f s",
                           remote, e, failures, attempts - 1, backoff(env.api, failures - 1))
            time.sleep(backoff(env.api, failures - 1))
    if env.task_id is not None and files:
        try:
            first = env.api.file.get_info_by_path(env.team_id, files[0][1])
            if first is not None:
                env.api.task.set_output_directory(env.task_id, first.id, remote)
        except requests.RequestException as e:
            raise UploadError(f"the artifacts are in {remote}, but setting the task output failed: {e}", run_dir,
                              upload_command(env, run_dir, remote)) from e
    return remote
