"""06 Hyperparameters: every other option of ``custom_net/train.py``, checked by the engine's own parser."""
from __future__ import annotations

import argparse

from supervisely.app.widgets import Button, Card, Container, Field, Input, Select, Switch, Text

from custom_net.sly_integration import check_setting, settings_to_argv
from custom_net.train import ArgsError, build_parser, parse_args
from train_app.wizard import Step

# The options this card shows, by section. A new engine option goes into one of these lists (new groups,
# such as evaluation switches, get a section of their own), or into SET_ELSEWHERE; the dashboard tests
# check that every option of build_parser() has a place.
SECTIONS = [
    ("Input size", ["input_height", "input_width"]),
    ("Training", ["epochs", "batch_size", "loss", "jaccard_weight", "class_weights", "seed", "amp", "channels_last"]),
    ("Optimizer", ["optimizer", "lr", "momentum", "weight_decay", "nesterov"]),
    ("Learning-rate schedule", ["lr_schedule", "step_size", "gamma_step", "milestones", "gamma_exp",
                                "warmup_epochs", "min_lr"]),
    ("Validation and checkpoints", ["val_interval", "best_metric", "checkpoint_interval", "max_keep_ckpts",
                                    "save_best", "save_last"]),
    # gpu_id is a text field for now; a device selector (multi-GPU, torchrun: issue #6) replaces its widget
    # in _widget() and adds its options here.
    ("System", ["gpu_id", "num_workers", "metrics_period", "vis_count", "vis_interval"]),
]
SET_ELSEWHERE = {
    "project_dir": 1, "split": 2, "val_percent": 2, "train_datasets": 2, "val_datasets": 2, "train_tag": 2,
    "val_tag": 2, "untagged": 2, "classes": 3, "sly_augs_path": 4, "model": 5, "encoder_weights": 5,
    "custom_weights": 5, "output": 7, "cache_dir": 7, "reporter": 7,
    # CLI-only ways to start a run: the dashboard always starts a fresh one from its widgets
    "demo": None, "train_args": None, "resume": None, "train_set": None, "val_set": None,
}


def _label(dest: str) -> str:
    return dest.replace("_", " ").capitalize()


class HyperparametersStep(Step):
    number, title = 6, "Hyperparameters"
    description = "Training settings; each value is checked as train.py checks it"

    def build(self):
        actions = {a.dest: a for a in build_parser()._actions if a.option_strings}
        self.inputs, self.errors = {}, {}
        sections = []
        for title, dests in SECTIONS:
            fields = []
            for dest in dests:
                action = actions[dest]
                self.inputs[dest] = widget = self._widget(dest, action)
                self.errors[dest] = error = Text("", status="error", widget_id=self.wid(f"err_{dest}"))
                error.hide()
                fields.append(Field(Container([widget, error], gap=2), _label(dest),
                                    (action.help or "").replace("%(default)s", str(action.default))))
            sections.append(Card(title, content=Container(fields), collapsable=True,
                                 widget_id=self.wid(f"section_{len(sections)}")))
        self.experiment = Input("unet", widget_id=self.wid("experiment"))
        self.apply = Button("Check and use these settings", widget_id=self.wid("apply"))
        self.controls = [*self.inputs.values(), self.experiment, self.apply]
        self.action(self.apply)(self._apply)
        return [*sections, Field(self.experiment, "Experiment name", "names the results folder"), self.apply]

    def _widget(self, dest, action):
        wid = self.wid(dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            return Switch(switched=bool(action.default), widget_id=wid)
        if action.choices is not None:
            select = Select([Select.Item(c) for c in action.choices], widget_id=wid)
            select.set_value(action.default)
            return select
        default = action.default
        text = " ".join(map(str, default)) if isinstance(default, list) else ("" if default is None else str(default))
        return Input(text, widget_id=wid)  # text, so that a typo reaches the check and gets a message

    def _raw(self, dest):
        widget = self.inputs[dest]
        return widget.is_switched() if isinstance(widget, Switch) else widget.get_value()

    def _apply(self):
        settings, bad = {}, 0
        for dest in self.inputs:
            value, message = check_setting(dest, self._raw(dest))
            if message:
                bad += 1
                self.errors[dest].set(message, status="error")
                self.errors[dest].show()
            else:
                self.errors[dest].hide()
                settings[dest] = value
        experiment = self.experiment.get_value().strip()
        if not experiment or any(c in experiment for c in '/\\:*?"<>|') :
            raise ValueError("enter an experiment name without / \\ : * ? \" < > |")
        if bad:
            raise ValueError(f"{bad} value(s) need fixing: see the messages under the fields")
        try:  # rules that involve several options (and everything earlier steps chose)
            parse_args(settings_to_argv({**self.session.settings(), **settings}))
        except ArgsError as e:
            raise ValueError(str(e)) from None
        self.session.settings_by_step[self.number] = settings
        self.session.experiment = experiment
        self.wizard.complete(self, f"Settings checked: {settings['epochs']} epoch(s), batch {settings['batch_size']}, "
                                   f"input {settings['input_width']}x{settings['input_height']}.")

    def reset(self):
        for error in self.errors.values():
            error.hide()
