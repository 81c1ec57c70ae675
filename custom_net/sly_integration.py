"""The dashboard's side of a training run.

The train dashboard runs ``custom_net.train.main(argv, reporter=DashboardReporter())`` in a
worker thread. The engine never touches widgets: it posts events here, and the app's UI loop
calls ``drain()`` and updates progress bars, charts and the predictions gallery from them.
The dashboard's Stop button calls ``request_stop()``; the engine then saves the last checkpoint
and returns. Also the gate both apps ask before recording workflow nodes on the platform.
"""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from custom_net.reporting import EventSink, Reporter

WORKFLOW_MIN_VERSION = "6.9.31"  # the SDK's first platform version with workflow nodes
logger = logging.getLogger(__name__)


def workflow_supported(api) -> bool:
    """Workflow nodes are recorded only where the platform has them (and the SDK has them enabled: not in
    development mode); elsewhere one debug line says why, and nothing else happens."""
    if not api.app.workflow.is_enabled():  # asked first: it needs no request
        logger.debug("workflow: not recorded (the SDK disables it in development mode)")
        return False
    version = api.instance_version
    try:
        supported = version not in (None, "unknown") and Version(version) >= Version(WORKFLOW_MIN_VERSION)
    except InvalidVersion:
        supported = False
    if not supported:
        logger.debug("workflow: not recorded (platform version %s, before %s)", version, WORKFLOW_MIN_VERSION)
    return supported


class DashboardReporter(EventSink):
    """Thread-safe queue of the run's events (``custom_net.reporting``) between the engine (producer) and the
    dashboard (consumer, which replays them onto its widgets); previews carry RGB arrays."""

    def __init__(self):
        super().__init__()
        self._events: queue.Queue = queue.Queue()

    def emit(self, event: dict) -> None:
        self._events.put(event)

    def drain(self) -> list[dict]:
        """All events posted since the last call, oldest first; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events


# ---- dashboard settings <-> train.py argv ----------------------------------------------------
# The dashboard collects its widget values as {parser dest: value} ("settings"); these two functions
# are the only bridge to the engine's command line, so every engine option is reachable and
# checked the way train.py checks it.

def _options() -> dict:
    from custom_net.config import build_parser  # late: it imports torch; the dashboard may not need it yet

    options = {}
    for action in build_parser()._actions:  # the first flag of a dest; aliases (--train-set-path) come later
        if action.option_strings and action.dest != "help":
            options.setdefault(action.dest, action)
    return options


def settings_to_argv(settings: dict) -> list[str]:
    """argv for ``custom_net.train.main`` from {dest: value}; None, "" and [] are left out
    (the engine's default applies)."""
    import argparse

    options = _options()
    unknown = sorted(set(settings) - set(options))
    if unknown:
        raise ValueError(f"not train.py options: {', '.join(unknown)}")
    argv: list[str] = []
    for dest, value in settings.items():
        action = options[dest]
        flag = next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))
        if value is None or (isinstance(value, (str, list)) and not value):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif action.nargs in ("+", "*"):
            argv += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
        else:
            argv += [flag, str(value)]
    return argv


def check_setting(dest: str, value) -> tuple[object, str | None]:
    """(typed value, None) or (None, message) for one option, by that option's own type and choices.

    ``value`` may be text (as typed in a widget) or a typed value; lists may be space-separated text."""
    import argparse

    action = _options()[dest]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return bool(value), None
    multiple = action.nargs in ("+", "*")
    if multiple:
        items = value.split() if isinstance(value, str) else list(value or [])
        if not items:  # allowed when the engine's default is "none" too
            return (None, "enter at least one value") if action.default not in (None, []) else ([], None)
    else:
        if value is None or (isinstance(value, str) and not value.strip()):
            return (None, None) if action.default is None else (None, "a value is required")
        items = [value.strip() if isinstance(value, str) else value]
    typed = []
    for item in items:
        try:
            converted = action.type(str(item)) if action.type is not None else str(item)
        except (argparse.ArgumentTypeError, ValueError) as e:
            reason = str(e) if isinstance(e, argparse.ArgumentTypeError) else f"not a valid number: {item!r}"
            return None, reason
        if action.choices is not None and converted not in action.choices:
            return None, f"choose from {', '.join(map(str, action.choices))}"
        typed += converted if multiple and isinstance(converted, list) else [converted]  # "[5, 10]" is 2 values
    return (typed if multiple else typed[0]), None


# ---- devices: the dashboard's device selector -> how a run is launched ---------------------------

def list_devices() -> list[tuple[str, str]]:
    """(value, label) of each device a run can use here: "cpu", then "cuda:N" for every GPU torch sees
    (numbered as in this process, i.e. within its CUDA_VISIBLE_DEVICES)."""
    import torch

    devices = [("cpu", "CPU")]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append((f"cuda:{index}", f"GPU {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB"))
    return devices


@dataclass(frozen=True)
class Launch:
    """How a run starts. ``gpu_id`` is train.py's --gpu-id; ``torchrun_gpus`` are the GPUs of a multi-GPU
    run (one process each, through torchrun), empty for a run inside the dashboard's process."""
    gpu_id: str
    torchrun_gpus: tuple[int, ...] = ()

    @property
    def distributed(self) -> bool:
        return bool(self.torchrun_gpus)


def plan_launch(selected) -> Launch:
    """The device selector's value (a list of "cpu" / "cuda:N", or one of them) -> a Launch; ValueError
    with a message for the field when the selection makes no run."""
    devices = [selected] if isinstance(selected, str) else list(selected or [])
    if not devices:
        raise ValueError("choose the CPU or one or more GPUs")
    if len(set(devices)) != len(devices):
        raise ValueError("each device can be chosen once")
    if len(devices) == 1:
        return Launch(gpu_id=devices[0])
    if "cpu" in devices:
        raise ValueError("the CPU cannot be combined with GPUs: choose the CPU alone, or GPUs only")
    gpus = []
    for device in devices:
        index = str(device).removeprefix("cuda:")
        if not index.isdigit():
            raise ValueError(f"not a GPU: {device!r}")
        gpus.append(int(index))
    # Under torchrun process N takes the N-th GPU given to it; "auto" is the id the engine expects there.
    return Launch(gpu_id="auto", torchrun_gpus=tuple(gpus))


def start_training(argv: list[str], launch: Launch, reporter: Reporter, ui_state: dict | None = None) -> dict:
    """Run ``argv`` to the end and return the summary: in this process (``train.main``), or on several
    GPUs through torchrun, which calls the same reporter hooks and honours ``reporter.request_stop()``."""
    from custom_net import distributed, train  # late: both import torch

    if launch.distributed:
        return distributed.run_torchrun(argv, list(launch.torchrun_gpus), reporter, ui_state=ui_state)
    return train.main(argv, reporter=reporter, ui_state=ui_state)


# ---- the end-of-training evaluation on the dashboard ---------------------------------------------

def describe_evaluation(summary: dict, run_location: str) -> tuple[str, list[tuple[str, str]], str]:
    """What the training card says about ``summary["eval"]``: (status, [(metric label, value)], text).

    ``run_location`` is where the run folder is now (the Team Files folder after an upload, else the local
    folder): the report's path is given inside it. ``eval`` is missing when evaluation was off or the run
    did not finish, None when no checkpoint was saved, ``{"error": ...}`` when evaluating failed."""
    from custom_net.report import METRIC_LABELS  # late: the engine loads torch

    if "eval" not in summary:
        if summary.get("status") != "finished":
            return "info", [], f"Evaluation skipped: the run was {summary.get('status')} before its last epoch."
        return "info", [], "Evaluation was turned off in step 06."
    result = summary["eval"]
    if result is None:
        return "warning", [], "Evaluation skipped: no best or last checkpoint was saved."
    if "error" in result:
        return "error", [], f"Evaluation failed: {result['error']}. The checkpoints are fine."
    metrics = [(METRIC_LABELS.get(name, name), "n/a" if value is None else f"{value:.4f}")
               for name, value in result["headline"].items()]
    # The report sits inside the run folder (eval/report.html), which the upload kept whole.
    relative = Path(result["report"]).relative_to(summary["output_dir"]).as_posix()
    return "success", metrics, f"Report: {run_location.rstrip('/')}/{relative}"
