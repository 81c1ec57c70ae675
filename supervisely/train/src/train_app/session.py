"""What the steps have decided so far: one object, shared by the step cards."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import supervisely as sly

from custom_net.sly_integration import Launch
from custom_net.sly_seg_dataset import Item
from train_app.environment import Environment


@dataclass
class AfterTraining:
    """What a platform run does after its upload (step 06's switches), as the original app did."""
    benchmark: bool = True             # the SDK's Model Benchmark on the validation images
    benchmark_speed_test: bool = True  # its speed test
    stop_app: bool = True              # the task ends, so the agent's GPU is free


@dataclass
class Session:
    env: Environment
    project: sly.Project | None = None
    project_dir: Path | None = None
    project_name: str | None = None  # on the platform, not the download folder's name
    items: list[Item] = field(default_factory=list)
    # Each step's contribution to train.py's options, {parser dest: value}, by step number.
    settings_by_step: dict[int, dict] = field(default_factory=dict)
    experiment: str = "unet"  # step 06 proposes the project's name, as the original did
    after_training: AfterTraining = field(default_factory=AfterTraining)
    weights_source: str | None = None  # step 05's custom weights as the user named them (a Team Files path)
    launch: Launch = field(default_factory=lambda: Launch("auto"))  # step 06's devices: in-process or torchrun

    def settings(self) -> dict:
        merged: dict = {}
        for number in sorted(self.settings_by_step):
            merged.update(self.settings_by_step[number])
        return merged

    def forget_from(self, number: int) -> None:
        for key in [k for k in self.settings_by_step if k >= number]:
            del self.settings_by_step[key]
