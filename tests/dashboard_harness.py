"""The train dashboard as its users start it (``uvicorn main:app --app-dir supervisely/train/src``),
in a subprocess per scenario: the SDK's Application / StateJson / DataJson are process-wide
singletons, so one app per process. Talks to it the way the page does: ``/sly/state``,
``/sly/data`` and widget routes with ``{"state": ..., "context": {}}``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from websockets.sync.client import connect

from tests.helpers import free_port

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "supervisely" / "train" / "src"


class DashboardServer:
    def __init__(self, env: dict, log_path: Path, startup_timeout: float = 120, app: str = "main:app"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Drop any platform variables of the outer environment: ``env`` decides the mode.
        base = {k: v for k, v in os.environ.items()
                if k not in ("SERVER_ADDRESS", "API_TOKEN", "TASK_ID", "TEAM_ID", "PROJECT_ID", "WORKSPACE_ID")}
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--app-dir", str(APP_DIR), "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO, env={**base, "PYTHONUNBUFFERED": "1", **env}, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dashboard exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                requests.post(f"{self.url}/sly/state", timeout=5).raise_for_status()
                break
            except requests.ConnectionError:
                if time.time() > deadline:
                    raise RuntimeError(f"dashboard did not start:\n{self.log_tail()}") from None
                time.sleep(0.3)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    # ---- what the page does
    def state(self) -> dict:
        return requests.post(f"{self.url}/sly/state", timeout=30).json()

    def data(self) -> dict:
        return requests.post(f"{self.url}/sly/data", timeout=30).json()

    def post(self, route: str, **state_patch) -> None:
        """Change widget state as the user would (``{widget_id: {key: value}}``), then call ``route``."""
        state = self.state()
        for widget_id, values in state_patch.items():
            state.setdefault(widget_id, {}).update(values)
        response = requests.post(f"{self.url}/{route}", json={"state": state, "context": {}}, timeout=120)
        assert response.status_code == 200, f"{route}: {response.status_code} {response.text}\n{self.log_tail()}"

    def click(self, widget_id: str, **state_patch) -> None:
        self.post(f"{widget_id}/button_clicked_cb", **state_patch)

    def text(self, widget_id: str) -> str:
        return self.data()[widget_id]["text"]

    def status(self, step: int) -> tuple[str, str]:
        """(status, text) of a step card's message line; ("hidden", "") when none is shown."""
        text = self.data()[f"s{step:02d}_status"]
        return ("hidden", "") if text.get("hide") else (text["status"], text["text"])

    def wait_phase(self, done=lambda phase: phase not in ("running", "stopping", "uploading", "benchmarking"), timeout=240) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            phase = self.text("s07_phase")
            if done(phase):
                return phase
            time.sleep(0.5)
        raise AssertionError(f"training phase still {phase!r} after {timeout}s\n{self.log_tail()}")


class PushListener:
    """What the page receives on ``/sly/ws`` (JSON patches of data and state) while it is open."""

    def __init__(self, server: DashboardServer):
        self.messages: list[dict] = []
        self._socket = connect(f"ws://127.0.0.1:{server.port}/sly/ws")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for text in self._socket:
                self.messages.append(json.loads(text))
        except Exception:  # closed
            pass

    def paths(self) -> set[str]:
        """The JSON-patch paths received, e.g. "/s07_loss/series/0/data/0"."""
        return {op.get("path", "") for m in self.messages for ops in m.values() if isinstance(ops, list)
                for op in ops if isinstance(op, dict)}

    def close(self):
        self._socket.close()
        self._thread.join(5)
