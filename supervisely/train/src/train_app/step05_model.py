"""05 Model: an architecture from ``model_list``; from scratch, ImageNet encoder or custom weights."""
from __future__ import annotations

from pathlib import Path

from supervisely.app.widgets import Button, Field, Input, OneOf, RadioGroup, RadioTable

from custom_net.model import model_list
from train_app import platform_io
from train_app.wizard import Step


class ModelStep(Step):
    number, title = 5, "Model"
    description = "Architecture and initial weights"

    def build(self):
        env = self.session.env
        self.models = list(model_list)
        self.table = RadioTable(["Model", "Encoder", "Description"],
                                [[name, spec["pretrained_encoder"] or "-", spec["description"]]
                                 for name, spec in model_list.items()], widget_id=self.wid("model"))
        self.custom_path = Input("", placeholder="/path/in/team_files/model.pth" if env.platform else "/path/to/model.pth",
                                 widget_id=self.wid("custom_path"))
        self.weights = RadioGroup([
            RadioGroup.Item("none", "From scratch"),
            RadioGroup.Item("imagenet", "ImageNet encoder"),
            RadioGroup.Item("custom", "Custom weights", Field(
                self.custom_path, "A state dict (.pth), e.g. a model_NNN.pth of an earlier run",
                "Path in Team Files" if env.platform else "Path of a local file")),
        ], direction="vertical", widget_id=self.wid("weights"))
        self.apply = Button("Select model", widget_id=self.wid("apply"))
        self.controls = [self.table, self.weights, self.custom_path, self.apply]
        self.action(self.apply)(self._apply)
        return [self.table, Field(self.weights, "Initial weights"), OneOf(self.weights, widget_id=self.wid("weights_options")),
                self.apply]

    def _apply(self):
        index = self.table.get_selected_row_index()
        if index is None or not 0 <= int(index) < len(self.models):
            raise ValueError("choose a model")
        name, weights = self.models[int(index)], self.weights.get_value()
        settings = {"model": name, "encoder_weights": "none", "custom_weights": ""}
        if weights == "imagenet":
            if not model_list[name]["pretrained_encoder"]:
                raise ValueError(f"{name} has no pretrained encoder: train it from scratch or from custom weights")
            settings["encoder_weights"] = "imagenet"
        elif weights == "custom":
            path = self.custom_path.get_value().strip()
            if not path:
                raise ValueError("enter the path of the custom weights")
            local = platform_io.fetch_checkpoint(self.session.env, path) if self.session.env.platform else Path(path)
            if not local.is_file():
                raise FileNotFoundError(f"custom weights {path} not found")
            settings["custom_weights"] = str(local)
        self.session.settings_by_step[self.number] = settings
        self.session.weights_source = self.custom_path.get_value().strip() if weights == "custom" else None
        self.wizard.complete(self, f"{name}, {dict(none='from scratch', imagenet='ImageNet encoder', custom='custom weights')[weights]}.")
