"""04 Augmentations: none, a shipped template, or a custom JSON; preview on a random image."""
from __future__ import annotations

import random

from supervisely.app.widgets import Button, Field, Flexbox, Image, Input, OneOf, RadioGroup, Select

from custom_net import augs, sly_seg_dataset as data
from custom_net.preprocessing import resize_image, resize_mask
from custom_net.visualize import overlay
from train_app import platform_io
from train_app.images import data_url, fit
from train_app.wizard import Step

PREVIEW_SIDE = 320


class AugsStep(Step):
    number, title = 4, "Augmentations"
    description = "Random changes to training images (image and mask together)"

    def build(self):
        env = self.session.env
        templates = list(augs.list_templates())
        self.template = Select([Select.Item(t) for t in templates], widget_id=self.wid("template"))
        self.template.set_value(templates[-1] if templates else None)
        self.custom_path = Input("", placeholder="/path/in/team_files/augs.json" if env.platform else "/path/to/augs.json",
                                 widget_id=self.wid("custom_path"))
        self.mode = RadioGroup([
            RadioGroup.Item("none", "No augmentations"),
            RadioGroup.Item("template", "Template", Field(self.template, "Shipped template")),
            RadioGroup.Item("custom", "Custom config", Field(
                self.custom_path, "Supervisely / ImgAug Studio JSON",
                "Path in Team Files" if env.platform else "Path of a local file")),
        ], widget_id=self.wid("mode"))
        self.mode.set_value("template")
        self.original = Image(widget_id=self.wid("original"))
        self.augmented = Image(widget_id=self.wid("augmented"))
        self.overlay = Image(widget_id=self.wid("overlay"))
        self.preview = Button("Preview on a random image", button_type="info", plain=True,
                              icon="zmdi zmdi-refresh", widget_id=self.wid("preview"))
        self.apply = Button("Use these augmentations", widget_id=self.wid("apply"))
        self.controls = [self.mode, self.template, self.custom_path, self.apply]
        self.action(self.preview, requires_open=False)(self._preview)
        self.action(self.apply)(self._apply)
        pictures = Flexbox([Field(self.original, "Original"), Field(self.augmented, "Augmented"),
                            Field(self.overlay, "Augmented mask")])
        return [self.mode, OneOf(self.mode, widget_id=self.wid("mode_options")), self.preview, pictures, self.apply]

    def _config(self) -> tuple[str, dict | None]:
        """(value for --sly-augs-path, loaded config); the engine's loader validates it."""
        mode = self.mode.get_value()
        if mode == "none":
            return "", None
        if mode == "template":
            name = self.template.get_value()
            return name, augs.load_augs_config(name)
        path = self.custom_path.get_value().strip()
        if not path:
            raise ValueError("enter the path of the augmentation config")
        if self.session.env.platform:
            path = str(platform_io.fetch_team_file(self.session.env, path))
        return path, augs.load_augs_config(path)

    def _preview(self):
        _, config = self._config()
        meta, classes = self.session.project.meta, self.session.settings().get("classes", [])
        class_to_index = {name: i for i, name in enumerate([data.BG_CLASS, *classes], start=0)}
        rng = random.Random()  # a new image and augmentation on every click: that is the re-roll
        candidates = list(self.session.items)
        rng.shuffle(candidates)
        for item in candidates:  # the first image that shows a selected class
            if any(label.obj_class.name in classes for label in data.load_annotation(item, meta).labels):
                break
        image, mask = data.load_item(item, meta, class_to_index)
        height, width = fit(image, PREVIEW_SIDE)
        image, mask = resize_image(image, height, width), resize_mask(mask, height, width)
        aug_image, aug_mask = image, mask
        if config is not None:
            aug_image, aug_mask = augs.augment(augs.build_augmenter(config), image, mask, rng.randrange(2**31))
        colors = [data.BG_COLOR] + [meta.obj_classes.get(name).color for name in classes]
        self.original.set(data_url(image))
        self.augmented.set(data_url(aug_image))
        self.overlay.set(data_url(overlay(aug_image, aug_mask, colors)))
        self.info(f"Preview: {item.dataset_name}/{item.item_name}")

    def _apply(self):
        path, config = self._config()
        self.session.settings_by_step[self.number] = {"sly_augs_path": path}
        steps = f"{len(config['pipeline'])} augmentation step(s)" if config else "no augmentations"
        self.wizard.complete(self, f"Augmentations: {path or 'none'} ({steps}).")
