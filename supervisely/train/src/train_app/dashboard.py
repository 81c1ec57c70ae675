"""The app: seven step cards over one Session, in local or platform mode."""
from __future__ import annotations

import supervisely as sly
from supervisely.app.widgets import Container, Text

from train_app.environment import Environment
from train_app.session import Session
from train_app.step01_input import InputStep
from train_app.step02_splits import SplitsStep
from train_app.step03_classes import ClassesStep
from train_app.step04_augs import AugsStep
from train_app.step05_model import ModelStep
from train_app.step06_hyperparameters import HyperparametersStep
from train_app.step07_train import TrainStep
from train_app.wizard import Wizard


class Dashboard:
    def __init__(self, env: Environment):
        self.env = env
        self.session = Session(env)
        self.steps = [cls(self.session) for cls in (InputStep, SplitsStep, ClassesStep, AugsStep, ModelStep,
                                                     HyperparametersStep, TrainStep)]
        self.train_step = self.steps[-1]
        self.wizard = Wizard(self.steps, can_restart=self._restart_refused)
        mode = Text(f"Mode: <b>{env.mode}</b>" + ("" if env.platform else f", results in {env.results_dir}"),
                    status="info", widget_id="app_mode")
        self.app = sly.Application(layout=Container([mode, *(s.card for s in self.steps)]))
        self.app.call_before_shutdown(self.train_step.shutdown)
        self.train_step.stop_app = self.app.stop

    @classmethod
    def from_env(cls) -> "Dashboard":
        return cls(Environment.from_env())

    def _restart_refused(self) -> str | None:
        return "Training is running: stop it before restarting a step." if self.train_step.busy else None
