"""Where the dashboard runs: on the platform (a task with an API) or locally on a project folder."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import supervisely as sly


@dataclass
class Environment:
    platform: bool
    data_dir: Path                  # downloads, runs before upload, fetched Team Files
    results_dir: Path | None = None  # local mode: where runs are kept
    project_dir: Path | None = None  # local mode: the project folder
    api: sly.Api | None = None
    team_id: int | None = None
    workspace_id: int | None = None
    project_id: int | None = None
    task_id: int | None = None

    @classmethod
    def from_env(cls) -> "Environment":
        data_dir = Path(os.environ.get("SLY_APP_DATA_DIR") or Path(tempfile.gettempdir()) / "unet_dashboard")
        data_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("SERVER_ADDRESS") and os.environ.get("API_TOKEN"):
            # retry_count=None: the SDK reads SUPERVISELY_PUBLIC_API_RETRIES (from_env alone fixes it at 10)
            return cls(platform=True, data_dir=data_dir, api=sly.Api.from_env(retry_count=None),
                       team_id=sly.env.team_id(), workspace_id=sly.env.workspace_id(raise_not_found=False),
                       project_id=sly.env.project_id(raise_not_found=False),  # step 01 explains when missing
                       task_id=sly.env.task_id(raise_not_found=False))
        project = os.environ.get("UNET_PROJECT_DIR")
        return cls(platform=False, data_dir=data_dir,
                   project_dir=Path(project).expanduser().resolve() if project else None,
                   results_dir=Path(os.environ.get("UNET_RESULTS_DIR", "results/dashboard")).expanduser().resolve())

    @property
    def mode(self) -> str:
        return "platform" if self.platform else "local"
