"""02 Train / val splits: random percent, by tags, by datasets; counts shown, empty split refused."""
from __future__ import annotations

from supervisely.app.widgets import Button, Container, Field, Input, InputNumber, OneOf, RadioGroup, Select

from custom_net import sly_seg_dataset as data
from train_app.wizard import Step


class SplitsStep(Step):
    number, title = 2, "Train / val splits"
    description = "Which images train the model and which validate it"

    def build(self):
        self.val_percent = InputNumber(20, min=1, max=99, widget_id=self.wid("val_percent"))
        self.train_tag = Input("train", widget_id=self.wid("train_tag"))
        self.val_tag = Input("val", widget_id=self.wid("val_tag"))
        self.untagged = Select([Select.Item(v, f"untagged items: {v}") for v in ("ignore", "train", "val")],
                               widget_id=self.wid("untagged"))
        self.train_datasets = Select([], multiple=True, widget_id=self.wid("train_datasets"))
        self.val_datasets = Select([], multiple=True, widget_id=self.wid("val_datasets"))
        self.method = RadioGroup([
            RadioGroup.Item("random", "Random", Field(self.val_percent, "Validation share, %")),
            RadioGroup.Item("tags", "By image tags", Container([Field(self.train_tag, "Training tag"),
                                                                Field(self.val_tag, "Validation tag"), self.untagged])),
            RadioGroup.Item("datasets", "By datasets", Container([Field(self.train_datasets, "Training datasets"),
                                                                  Field(self.val_datasets, "Validation datasets")])),
        ], widget_id=self.wid("method"))
        self.apply = Button("Create splits", widget_id=self.wid("apply"))
        self.controls = [self.method, self.val_percent, self.train_tag, self.val_tag, self.untagged,
                         self.train_datasets, self.val_datasets, self.apply]
        self.action(self.apply)(self._apply)
        return [self.method, OneOf(self.method, widget_id=self.wid("method_options")), self.apply]

    def on_unlock(self):
        names = sorted({i.dataset_name for i in self.session.items})
        for select in (self.train_datasets, self.val_datasets):
            select.set([Select.Item(n) for n in names])
            select.set_value([])

    def _apply(self):
        items, method = self.session.items, self.method.get_value()
        if method == "random":
            percent = self.val_percent.get_value()
            train, val = data.split_random(items, float(percent), seed=0)  # counts do not depend on the seed
            settings = {"split": "random", "val_percent": float(percent)}
        elif method == "tags":
            train_tag, val_tag = self.train_tag.get_value().strip(), self.val_tag.get_value().strip()
            if not train_tag or not val_tag:
                raise ValueError("enter both the training and the validation tag")
            train, val = data.split_by_tags(items, self.session.project.meta, train_tag, val_tag,
                                            self.untagged.get_value())
            settings = {"split": "tags", "train_tag": train_tag, "val_tag": val_tag, "untagged": self.untagged.get_value()}
        else:
            train_ds, val_ds = self.train_datasets.get_value() or [], self.val_datasets.get_value() or []
            if not train_ds or not val_ds:
                raise ValueError("choose at least one training and one validation dataset")
            train, val = data.split_by_datasets(items, train_ds, val_ds)
            settings = {"split": "datasets", "train_datasets": list(train_ds), "val_datasets": list(val_ds)}
        self.session.settings_by_step[self.number] = settings
        self.wizard.complete(self, f"Training set: {len(train)} image(s), validation set: {len(val)} image(s).")
