"""01 Input project: download it from the platform (cached) or open the local folder."""
from __future__ import annotations

from supervisely.app.widgets import Button, Progress, Text

from custom_net import sly_seg_dataset as data
from train_app import platform_io
from train_app.progress import counting
from train_app.wizard import Step


class InputStep(Step):
    number, title = 1, "Input project"
    description = "The Supervisely project to train on"

    def build(self):
        env = self.session.env
        where = f"project id {env.project_id}" if env.platform else f"folder {env.project_dir or '(UNET_PROJECT_DIR is not set)'}"
        self.source = Text(f"Source: {where}", widget_id=self.wid("source"))
        self.summary = Text("", widget_id=self.wid("summary"))
        self.progress = Progress(message="Downloading images", show_percents=True, widget_id=self.wid("progress"))
        self.load = Button("Download project" if env.platform else "Open project", widget_id=self.wid("load"))
        self.controls = [self.load]
        self.action(self.load)(self._load)
        return [self.source, self.load, self.progress, self.summary]

    def _load(self):
        env = self.session.env
        note = ""
        if env.platform:
            with counting(self.progress, message="Downloading images") as progress:
                folder, downloaded, name = platform_io.download_project(env, progress)
            note = "downloaded" if downloaded else "the cached copy is current: download skipped"
        else:
            if env.project_dir is None:
                raise ValueError("set UNET_PROJECT_DIR to a Supervisely project folder and restart the app")
            folder, name = env.project_dir, None
        project = data.open_project(folder)
        items = data.list_items(project)
        self.session.project, self.session.project_dir, self.session.items = project, folder, items
        self.session.project_name = name or project.name  # the download's folder is named by the project's id
        self.session.settings_by_step[self.number] = {"project_dir": str(folder)}
        datasets = sorted({i.dataset_name for i in items})
        self.summary.set(
            f"Project <b>{self.session.project_name}</b>: {len(datasets)} dataset(s) ({', '.join(datasets)}), "
            f"{len(items)} image(s), {len(project.meta.obj_classes)} class(es) "
            f"({', '.join(c.name for c in project.meta.obj_classes)})", status="text")
        self.wizard.complete(self, f"Project ready{': ' + note if note else ''}.")

    def reset(self):
        self.session.project, self.session.items, self.session.project_name = None, [], None
        self.summary.set("", status="text")
