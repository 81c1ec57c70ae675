"""03 Classes: shape, colour, images and labels per class; only classes with an area can be chosen."""
from __future__ import annotations

import supervisely as sly
from supervisely.app.widgets import Button, ClassesTable, Text

from custom_net import sly_seg_dataset as data
from train_app.wizard import Step

AREA_TYPES = [sly.Bitmap, sly.AlphaMask, sly.Polygon, sly.Rectangle, sly.AnyGeometry]


class ClassesStep(Step):
    number, title = 3, "Classes"
    description = "Classes to segment; pixels of no selected class are background"

    def build(self):
        self.table = ClassesTable(allowed_types=AREA_TYPES, widget_id=self.wid("table"))
        self.notes = Text("", status="info", widget_id=self.wid("notes"))
        self.apply = Button("Use selected classes", widget_id=self.wid("apply"))
        self.controls = [self.table, self.apply]
        self.action(self.apply)(self._apply)
        return [self.table, self.notes, self.apply]

    def on_unlock(self):
        project = self.session.project
        self.table.read_project(project)
        self.table.select_all()
        without_area = [f"{c.name} ({c.geometry_type.geometry_name()})" for c in project.meta.obj_classes
                        if not data.has_area(c)]
        note = f"A background class <b>{data.BG_CLASS}</b> is added as class 0."
        if without_area:
            note += " Not selectable, no area: " + ", ".join(without_area) + "."
        self.notes.set(note, status="info")

    def _apply(self):
        chosen = set(self.table.get_selected_classes())
        if not chosen:
            raise ValueError("select at least one class")
        # meta.json order, not the table's (sorted by label count): class ids follow it
        names = [c.name for c in self.session.project.meta.obj_classes if c.name in chosen]
        data.build_model_classes(self.session.project.meta, names)  # the engine's own check
        self.session.settings_by_step[self.number] = {"classes": names}
        self.wizard.complete(self, f"{len(names)} class(es) + {data.BG_CLASS}: {', '.join(names)}.")
