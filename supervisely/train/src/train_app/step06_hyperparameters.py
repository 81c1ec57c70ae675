"""06 Hyperparameters: every other option of ``custom_net/train.py``, checked by the engine's own parser."""
from __future__ import annotations

import argparse

from supervisely.app.widgets import Button, Card, Container, Field, Input, Select, Switch, Text

from custom_net.sly_integration import check_setting, list_devices, plan_launch, settings_to_argv
from custom_net.original_app import ORIGINAL_PRESET
from custom_net.config import MODEL_DEFAULTS, ArgsError, build_parser, parse_config
from train_app.session import AfterTraining
from train_app.wizard import Step

# The options this card shows, by section. A new engine option goes into one of these lists, or into
# SET_ELSEWHERE; the dashboard tests check that every option of build_parser() has a place.
SECTIONS = [
    ("Recipe", ["preset"]),
    ("Input size", ["input_height", "input_width"]),
    ("Training", ["epochs", "batch_size", "loss", "jaccard_weight", "class_weights", "seed", "init", "train_batchnorm",
                  "bn_momentum"]),
    ("Optimizer", ["optimizer", "lr", "decoder_lr_factor", "momentum", "weight_decay", "nesterov", "clip_grad_norm"]),
    ("Learning-rate schedule", ["lr_schedule", "step_size", "gamma_step", "milestones", "gamma_exp",
                                "warmup_epochs", "min_lr", "scheduler_order"]),
    ("Validation and checkpoints", ["val_interval", "best_metric", "checkpoint_interval", "max_keep_ckpts",
                                    "save_best", "save_last"]),
    ("Evaluation after training", ["eval", "speed_test"]),
    ("Devices", ["gpu_id", "sync_bn", "dist_timeout"]),
    ("Speed and system", ["amp", "channels_last", "compile", "num_workers", "metrics_period", "vis_count",
                          "vis_interval"]),
]
SET_ELSEWHERE = {
    "project_dir": 1, "split": 2, "val_percent": 2, "train_datasets": 2, "val_datasets": 2, "train_tag": 2,
    "val_tag": 2, "untagged": 2, "classes": 3, "sly_augs_path": 4, "model": 5, "encoder_weights": 5,
    "custom_weights": 5, "output": 7, "cache_dir": 7, "reporter": 7,
    # CLI-only ways to start a run: the dashboard always starts a fresh one from its widgets
    "demo": None, "train_args": None, "resume": None, "train_set": None, "val_set": None,
    # step 05 fetches a checkpoint with its run's info/model_classes.json beside it, where the engine looks
    "custom_weights_classes": None,
    # the original app's forms of the above, for its scripts and train_args.json files
    "classes_path": None, "checkpoints_dir": None, "train_vis_items_path": None, "val_vis_items_path": None,
    "sly": None,
}
# Where the engine's flag name or help says too little on a page.
LABELS = {"preset": "Recipe", "gpu_id": "Devices", "eval": "Run evaluation", "speed_test": "Speed test",
          "init": "Initialisation", "train_batchnorm": "BatchNorm while training", "amp": "Mixed precision",
          "compile": "torch.compile",
          "sync_bn": "SyncBatchNorm", "dist_timeout": "Distributed timeout, s"}
HELP = {
    "preset": "choosing one fills every field the recipe decides (epochs, batch and input size, optimizer, learning "
              "rate and schedule, loss, init, checkpoints, previews, best metric), which stay editable; the "
              "augmentations stay as chosen in step 04 (the original app's: the seg_simple template)",
    "gpu_id": "the CPU, one GPU, or several GPUs: one process per GPU through torchrun, with the batch size per GPU",
    "speed_test": "part of the evaluation: ms per image at batch 1 and at the batch size, with and without the fast path",
    "sync_bn": "several GPUs: BatchNorm statistics over all GPUs (CUDA only)",
}
RECIPES = {"default": "defaults of this app", "original": "the original Train UNet app"}
AFTER_TRAINING = {  # platform only: AfterTraining's fields, label and help
    "benchmark": ("Run Model Benchmark", "the platform's evaluation report of the best checkpoint on the validation "
                  "images (a predictions project and a report linked on the card, as in the original app)"),
    "benchmark_speed_test": ("Run Speed Test", "part of the Model Benchmark: the served model's speed at batch 1, 8, 16"),
    "stop_app": ("Stop the app when done", "after the upload the task ends and frees the agent; switch off to keep "
                 "looking at the charts and previews"),
}
FORBIDDEN_IN_NAME = '/\\:*?"<>|'


def experiment_name_for(project_name: str) -> str:
    """The project's name as an experiment (folder) name: characters a path cannot hold become "_"."""
    return "".join("_" if c in FORBIDDEN_IN_NAME else c for c in project_name).strip() or "unet"


def _label(dest: str) -> str:
    return LABELS.get(dest) or dest.replace("_", " ").capitalize()


def field_help(dest: str, action: argparse.Action) -> str:
    """The page's description of an option: its help as ``--help`` prints it (defaults filled in)."""
    return HELP.get(dest) or (action.help or "") % vars(action)


def _as_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else ("" if value is None else str(value))


def recipe_values(preset: str, model: str) -> dict:
    """Every option's value under a recipe for an architecture, as the engine resolves ``--preset``
    (the learning rates depend on the architecture)."""
    return parse_config(["--project-dir", ".", "--preset", preset, "--model", model]).as_dict()


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
                                    field_help(dest, action)))
            sections.append(Card(title, content=Container(fields), collapsable=True,
                                 widget_id=self.wid(f"section_{len(sections)}")))
        self.inputs["preset"].value_changed(self._use_recipe)
        self._filled = dict.fromkeys(MODEL_DEFAULTS, "")  # texts a recipe last put in: replaced while the user keeps them
        self.experiment = Input(self.session.experiment, widget_id=self.wid("experiment"))
        self._proposed_experiment = self.session.experiment
        self.after = {}
        if self.session.env.platform:
            self.after = {name: Switch(switched=True, widget_id=self.wid(name)) for name in AFTER_TRAINING}
            sections.append(Card("On the platform, after training", collapsable=True, widget_id=self.wid("section_after"),
                                 content=Container([Field(self.after[n], *AFTER_TRAINING[n]) for n in AFTER_TRAINING])))
        self.apply = Button("Check and use these settings", widget_id=self.wid("apply"))
        self.controls = [*self.inputs.values(), *self.after.values(), self.experiment, self.apply]
        self.action(self.apply)(self._apply)
        return [*sections, Field(self.experiment, "Experiment name", "names the results folder"), self.apply]

    def _widget(self, dest, action):
        wid = self.wid(dest)
        if dest == "gpu_id":  # several GPUs make a torchrun run (step 07)
            devices = list_devices()
            select = Select([Select.Item(value, label) for value, label in devices], multiple=True, widget_id=wid)
            select.set_value([devices[1][0] if len(devices) > 1 else "cpu"])  # the first GPU, as --gpu-id auto
            return select
        if isinstance(action, argparse.BooleanOptionalAction):
            return Switch(switched=bool(action.default), widget_id=wid)
        if action.choices is not None:
            labels = RECIPES if dest == "preset" else {}
            select = Select([Select.Item(c, labels.get(c, c)) for c in action.choices], widget_id=wid)
            select.set_value(action.default)
            return select
        return Input(_as_text(action.default), widget_id=wid)  # text, so that a typo reaches the check and gets a message

    def _show(self, dest, value):
        widget = self.inputs[dest]
        if isinstance(widget, Switch):
            widget.on() if value else widget.off()
        else:
            widget.set_value(value if isinstance(widget, Select) else _as_text(value))

    def _model(self) -> str:
        return self.session.settings().get("model") or build_parser().get_default("model")

    def _use_recipe(self, preset):
        if self.done or self.card.is_locked() or preset not in RECIPES:
            return
        values = recipe_values(preset, self._model())
        for dest in ORIGINAL_PRESET:  # the fields a recipe decides
            if dest in self.inputs:
                self._show(dest, values[dest])
        self._filled = {dest: _as_text(values[dest]) for dest in MODEL_DEFAULTS}

    def on_unlock(self):
        """Step 05 chose the architecture: show its default learning rates, unless the user typed others; the
        experiment is named after the project unless the user named it."""
        if self.session.project_name and self.experiment.get_value().strip() == self._proposed_experiment:
            self._proposed_experiment = experiment_name_for(self.session.project_name)
            self.experiment.set_value(self._proposed_experiment)
        values = recipe_values(self.inputs["preset"].get_value(), self._model())
        for dest in MODEL_DEFAULTS:
            if self.inputs[dest].get_value().strip() in ("", self._filled[dest]):
                self._filled[dest] = _as_text(values[dest])
                self._show(dest, self._filled[dest])

    def _check(self, dest):
        """(value, None) or (None, message) for one field."""
        widget = self.inputs[dest]
        if dest == "gpu_id":
            try:
                return plan_launch(widget.get_value()), None
            except ValueError as e:
                return None, str(e)
        return check_setting(dest, widget.is_switched() if isinstance(widget, Switch) else widget.get_value())

    def _apply(self):
        settings, bad = {}, 0
        for dest in self.inputs:
            value, message = self._check(dest)
            if message:
                bad += 1
                self.errors[dest].set(message, status="error")
                self.errors[dest].show()
            else:
                self.errors[dest].hide()
                settings[dest] = value
        experiment = self.experiment.get_value().strip()
        if not experiment or any(c in experiment for c in FORBIDDEN_IN_NAME):
            raise ValueError("enter an experiment name without / \\ : * ? \" < > |")
        if bad:
            raise ValueError(f"{bad} value(s) need fixing: see the messages under the fields")
        launch = settings["gpu_id"]
        settings["gpu_id"] = launch.gpu_id
        try:  # rules that involve several options (and everything earlier steps chose)
            parse_config(settings_to_argv({**self.session.settings(), **settings}))
        except ArgsError as e:
            raise ValueError(str(e)) from None
        self.session.settings_by_step[self.number] = settings
        self.session.experiment = experiment
        self.session.after_training = AfterTraining(**{name: w.is_switched() for name, w in self.after.items()})
        self.session.launch = launch
        where = (f"GPUs {', '.join(map(str, launch.torchrun_gpus))} (torchrun, batch per GPU)" if launch.distributed
                 else launch.gpu_id)
        self.wizard.complete(self, f"Settings checked: {settings['epochs']} epoch(s), batch {settings['batch_size']}, "
                                   f"input {settings['input_width']}x{settings['input_height']}, on {where}.")

    def reset(self):
        for error in self.errors.values():
            error.hide()
