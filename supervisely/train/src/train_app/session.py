"""What the steps have decided so far: one object, shared by the step cards."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import supervisely as sly

from custom_net.sly_integration import Launch
from custom_net.sly_seg_dataset import Item
from train_app.environment import Environment


@dataclass
class Session:
    env: Environment
    project: sly.Project | None = None
    project_dir: Path | None = None
    items: list[Item] = field(default_factory=list)
    # Each step's contribution to train.py's options, {parser dest: value}, by step number.
    settings_by_step: dict[int, dict] = field(default_factory=dict)
    experiment: str = "unet"
    launch: Launch = field(default_factory=lambda: Launch("auto"))  # step 06's devices: in-process or torchrun

    def settings(self) -> dict:
        merged: dict = {}
        for number in sorted(self.settings_by_step):
            merged.update(self.settings_by_step[number])
        return merged

    def forget_from(self, number: int) -> None:
        for key in [k for k in self.settings_by_step if k >= number]:
            del self.settings_by_step[key]
