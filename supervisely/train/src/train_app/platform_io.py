"""Platform transfers: the project download (cached), Team Files inputs, the artifact upload."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Callable

import requests
import supervisely as sly

from train_app.environment import Environment

CACHE_MARKER = ".unet_download.json"


class PlatformError(ValueError):
    """The platform refused or could not be reached; the message says what was being done."""


def _platform_call(what: str):
    """Turn the SDK's HTTP errors into a PlatformError naming the operation (shown on the card)."""
    def wrap(func):
        @functools.wraps(func)
        def call(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except (requests.HTTPError, requests.ConnectionError) as e:
                raise PlatformError(f"{what} failed: {e}") from e
        return call
    return wrap


@_platform_call("downloading the project")
def download_project(env: Environment, progress: Callable[[int, int], None]) -> tuple[Path, bool]:
    """The project in ``data_dir/projects/<id>``; downloaded only when the cached copy is older than the
    project on the platform. Returns (folder, downloaded). ``progress(done, total)`` counts images."""
    if env.project_id is None:
        raise ValueError("no project: start the app from an image project's context menu")
    info = env.api.project.get_info_by_id(env.project_id)
    if info is None:
        raise ValueError(f"project {env.project_id} not found on the platform")
    folder = env.data_dir / "projects" / str(env.project_id)
    stamp = {"project_id": info.id, "updated_at": info.updated_at}
    marker = folder / CACHE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder, False
    shutil.rmtree(folder, ignore_errors=True)
    done = [0]

    def on_image(n):
        done[0] += n
        progress(done[0], info.items_count)

    sly.download_project(env.api, env.project_id, str(folder), progress_cb=on_image, log_progress=False)
    marker.write_text(json.dumps(stamp))  # written last: an interrupted download is never "current"
    return folder, True


@_platform_call("reading Team Files")
def fetch_team_file(env: Environment, remote_path: str) -> Path:
    """A Team Files file (custom augs config or weights) downloaded into data_dir."""
    if not env.api.file.exists(env.team_id, remote_path):
        raise FileNotFoundError(f"Team Files: {remote_path} not found")
    local = env.data_dir / "team_files" / remote_path.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    env.api.file.download(env.team_id, remote_path, str(local))
    return local


@_platform_call("uploading the artifacts")
def upload_artifacts(env: Environment, run_dir: Path, remote_dir: str,
                     progress: Callable[[int, int], None]) -> str:
    """Upload the run folder to Team Files and make it the task's output; returns the remote folder
    (the SDK picks ``<remote_dir>_000`` ... when it exists)."""
    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    sent = [0]

    def on_bytes(n):
        sent[0] += n
        progress(min(sent[0], total), total)

    remote = env.api.file.upload_directory(env.team_id, str(run_dir), remote_dir, progress_size_cb=on_bytes)
    remote = remote.rstrip("/") + "/"
    first = remote + files[0].relative_to(run_dir).as_posix()
    file_info = env.api.file.get_info_by_path(env.team_id, first)
    if env.task_id is not None and file_info is not None:
        env.api.task.set_output_directory(env.task_id, file_info.id, remote)
    return remote
