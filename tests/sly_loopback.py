"""A Supervisely server on 127.0.0.1 for tests: answers the REST calls the SDK makes to download an
image project or single images by id, to write annotations and classes back to it, and to upload a
folder to Team Files, and records every call.

    with LoopbackPlatform(project_dir) as platform:
        api = sly.Api(platform.url, platform.token)
        sly.download_project(api, platform.project_id, "dest")
        api.file.upload_directory(platform.team_id, "local_dir", "/unet/1_exp/")
        platform.files            # {"/unet/1_exp/a.txt": b"..."}: what arrived in Team Files
        platform.stored           # ["/unet/1_exp/a.txt", ...]: every write, in order
        platform.calls            # [Call(method, query, body), ...] in order

Only what the SDK needs is implemented (methods named as in ``POST /public/api/v3/<method>``); an
unknown method answers 404 and is listed in ``platform.unknown``. Fault injection for other tests:
``platform.fail("images.bulk.download", status=500, times=2)`` answers the next two such calls
with that status; ``status="drop"`` closes the connection without an answer, ``status="timeout"`` holds
the request ``platform.stall_seconds`` and then drops it (a client with a shorter read timeout gives up
first); ``platform.handlers[method] = fn(platform, call) -> (status, body)`` replaces or adds a method.

The SDK's Model Benchmark also creates a workspace and projects (predictions, differences) and copies images
into them: ``platform.workspaces`` {id: {...}}, ``platform.projects`` {id: {"name", "meta", "workspace_id"}},
``platform.archived_projects`` (ids removed by ``projects.archive``).
"""
from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import supervisely as sly
from supervisely.api.dataset_api import DatasetApi
from supervisely.api.file_api import FileApi
from supervisely.api.image_api import ImageApi
from supervisely.api.project_api import ProjectApi
from supervisely.api.user_api import UserApi
from supervisely.api.workspace_api import WorkspaceApi

API_PREFIX = "/public/api/v3/"


@dataclass
class Call:
    method: str
    query: dict
    body: object  # parsed JSON, or {"fields": {...}, "files": {name: bytes}} for multipart
    headers: dict = field(default_factory=dict)


def _info(api_class, **values) -> dict:
    """An entity in the server's JSON form: every field the SDK's info type reads, then ``values``."""
    out: dict = {}
    for name in api_class.info_sequence():
        if isinstance(name, tuple):  # nested field: (("meta", "x"), "alias")
            path = name[0]
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node.setdefault(path[-1], None)
        else:
            out.setdefault(name, None)
    out.update(values)
    return out


def _filtered(entities: list[dict], filters) -> list[dict] | None:
    """The entities (JSON infos) meeting every ``{"field", "operator": "=" | "in", "value"}`` condition, as the
    platform's list methods filter; None for a condition the loopback does not know (the caller answers 400)."""
    tests = {"=": lambda value, wanted: value == wanted, "in": lambda value, wanted: value in wanted}
    for condition in filters or []:
        test = tests.get(condition.get("operator"))
        if test is None or "field" not in condition or "value" not in condition:
            return None
        entities = [e for e in entities if test(e.get(condition["field"]), condition["value"])]
    return entities


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, payload) of a multipart/form-data body, in order."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = []
    for part in message.iter_parts():
        params = dict(part.get_params(header="content-disposition")[1:])
        parts.append((params.get("name"), params.get("filename"), part.get_payload(decode=True)))
    return parts


class LoopbackPlatform:
    """A fake platform holding one image project (read from a local Supervisely project folder)
    and one team's Team Files (a dict path -> bytes)."""

    def __init__(self, project_dir: str | Path | None = None, *, team_id: int = 7, workspace_id: int = 8,
                 project_id: int = 10, token: str = "loopback-token", updated_at: str = "2026-01-01T00:00:00.000Z",
                 instance_version: str = "6.18.3"):  # the SDK's MINIMUM_INSTANCE_VERSION_FOR_SDK
        self.team_id, self.workspace_id, self.project_id, self.token = team_id, workspace_id, project_id, token
        self.instance_version = instance_version
        self.updated_at = updated_at
        self.calls: list[Call] = []
        self.unknown: list[str] = []
        self.files: dict[str, bytes] = {}
        self.stored: list[str] = []  # every Team Files path written, in order (a path twice: uploaded twice)
        self.task_outputs: list[dict] = []
        self.task_fields: list[dict] = []
        self.workflow: list[dict] = []  # workflow nodes added: {"direction": "input"|"output", **request body}
        self.project_settings: dict | None = None  # the last projects.settings.update
        self.workspaces = {workspace_id: {"name": "Main", "description": "", "hidden": False}}
        self.archived_projects: list[int] = []
        self._label_ids = itertools.count(1)  # the platform gives every stored label an id
        self._faults: dict[str, list[int | str]] = defaultdict(list)
        self.stall_seconds = 2.0
        self._lock = threading.Lock()
        self._load_project(project_dir)
        self.handlers = {
            "projects.info": self._projects_info, "projects.meta": self._projects_meta,
            "projects.meta.update": self._projects_meta_update, "projects.settings.update": self._projects_settings,
            "datasets.list": self._datasets_list, "datasets.info": self._datasets_info,
            "datasets.add": self._datasets_add,
            "images.list": self._images_list, "images.info": self._images_info, "images.bulk.add": self._images_copy,
            "images.download": self._images_download, "images.bulk.download": self._images_bulk_download,
            "annotations.bulk.info": self._annotations_bulk, "annotations.bulk.add": self._annotations_add,
            "file-storage.list": self._files_list, "file-storage.bulk.upload": self._files_upload,
            "file-storage.download": self._files_download,
            "tasks.output.set": self._task_output, "tasks.data.set": self._task_data, "tasks.info": self._task_info,
            "tasks.data.get": self._task_data_get, "tasks.app-v2.data.set": self._app_content,
            "tasks.meta.update": self._task_meta,
            "workflow.node.add-input": self._workflow_node("input"),
            "workflow.node.add-output": self._workflow_node("output"),
            # Model Benchmark (train_app.model_benchmark): its workspace, projects, the report's author
            "workspaces.list": self._workspaces_list, "workspaces.add": self._workspaces_add,
            "workspaces.visibility.set": self._workspaces_visibility, "projects.list": self._projects_list,
            "projects.add": self._projects_add, "projects.archive": self._projects_archive, "users.me": self._users_me,
            # asked by the SDK when a call fails, to word its error message
            "instance.version": lambda call: (200, {"version": self.instance_version}),
        }
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._request_handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "LoopbackPlatform":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, status: int | str = 500, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with ``status`` (an HTTP status, "drop" or "timeout")."""
        assert isinstance(status, int) or status in ("drop", "timeout"), status
        self._faults[method].extend([status] * times)

    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    # ---- the projects
    @property
    def meta_json(self) -> dict:
        """The meta of the project read from ``project_dir``."""
        return self.projects[self.project_id]["meta"]

    @meta_json.setter
    def meta_json(self, meta: dict) -> None:
        self.projects[self.project_id]["meta"] = meta

    def add_project(self, name: str, workspace_id: int | None = None) -> int:
        """An empty image project (for writes into another project); its id."""
        project_id = max(self.projects) + 1
        self.projects[project_id] = {"name": name, "meta": sly.ProjectMeta().to_json(),
                                     "workspace_id": workspace_id or self.workspace_id}
        return project_id

    def _load_project(self, project_dir) -> None:
        self.projects = {self.project_id: {"name": "empty", "meta": sly.ProjectMeta().to_json()}}
        self.datasets, self.images = [], {}
        if project_dir is None:
            return
        project = sly.Project(str(project_dir), sly.OpenMode.READ)
        self.projects[self.project_id] = {"name": project.name, "meta": project.meta.to_json()}
        next_image_id = 1000
        for ds_index, dataset in enumerate(sorted(project.datasets, key=lambda d: d.name)):
            if "/" in dataset.name:
                continue  # nested datasets: not needed by these tests
            ds_id = 100 + ds_index
            self.datasets.append({"id": ds_id, "name": dataset.name, "project_id": self.project_id})
            for name in sorted(dataset.get_items_names()):
                image_path = Path(dataset.get_img_path(name))
                ann_json = json.loads(Path(dataset.get_ann_path(name)).read_text(encoding="utf-8"))
                self.images[next_image_id] = {"dataset_id": ds_id, "name": name, "bytes": image_path.read_bytes(),
                                              "ann": ann_json, "size": ann_json["size"]}
                next_image_id += 1

    def _dataset_images(self, ds_id):
        return {i: img for i, img in self.images.items() if img["dataset_id"] == ds_id}

    def _project(self, call) -> dict | None:
        return self.projects.get(call.body.get("id"))

    def _projects_info(self, call):
        project_id = call.body.get("id")
        if project_id not in self.projects:
            return 404, {"error": "project not found"}
        return 200, self._project_info(project_id)

    def _project_info(self, project_id: int) -> dict:
        datasets = [ds["id"] for ds in self.datasets if ds["project_id"] == project_id]
        return _info(ProjectApi, id=project_id, name=self.projects[project_id]["name"], type="images",
                     workspaceId=self.projects[project_id].get("workspace_id", self.workspace_id), teamId=self.team_id,
                     imagesCount=sum(img["dataset_id"] in datasets for img in self.images.values()),
                     datasetsCount=len(datasets), updatedAt=self.updated_at, referenceImageUrl=next(
                         (f"{self.url}/previews/{i}.png" for i, img in self.images.items() if img["dataset_id"] in datasets),
                         None),
                     createdAt="2026-01-01T00:00:00.000Z", description="", readme="", customData={}, settings={})

    def _projects_meta(self, call):
        project = self._project(call)
        return (404, {"error": "project not found"}) if project is None else (200, project["meta"])

    def _projects_meta_update(self, call):
        project = self._project(call)
        if project is None:
            return 404, {"error": "project not found"}
        project["meta"] = call.body["meta"]
        return 200, project["meta"]

    def _projects_settings(self, call):  # the SDK sends the meta's project settings after each meta update
        if self._project(call) is None:
            return 404, {"error": "project not found"}
        self.project_settings = call.body.get("settings")
        return 200, {"success": True}

    def _dataset_info(self, ds):
        return _info(DatasetApi, id=ds["id"], name=ds["name"], projectId=ds["project_id"], parentId=None,
                     imagesCount=len(self._dataset_images(ds["id"])), itemsCount=len(self._dataset_images(ds["id"])),
                     description="", teamId=self.team_id, workspaceId=self.workspace_id,
                     createdAt="2026-01-01T00:00:00.000Z", updatedAt=self.updated_at)  # dict fields: unhashable

    def _datasets_list(self, call):
        """A project's datasets, filtered (``name`` / ``id``, ``=`` / ``in``)."""
        datasets = [ds for ds in self.datasets if ds["project_id"] == call.body.get("projectId", self.project_id)]
        entities = _filtered([self._dataset_info(ds) for ds in datasets], call.body.get("filter"))
        if entities is None:
            return 400, {"error": f"unsupported filter {call.body.get('filter')}"}
        return 200, {"total": len(entities), "perPage": 500, "pagesCount": 1, "entities": entities}

    def _datasets_add(self, call):
        if call.body.get("projectId") not in self.projects:
            return 404, {"error": "project not found"}
        ds = {"id": max(d["id"] for d in self.datasets) + 1 if self.datasets else 100, "name": call.body["name"],
              "project_id": call.body["projectId"]}
        self.datasets.append(ds)
        return 200, self._dataset_info(ds)

    def _datasets_info(self, call):
        ds = next((d for d in self.datasets if d["id"] == call.body.get("id")), None)
        return (404, {"error": "dataset not found"}) if ds is None else (200, self._dataset_info(ds))

    def _image_info(self, image_id, img):
        height, width = img["size"]["height"], img["size"]["width"]
        project_id = next(ds["project_id"] for ds in self.datasets if ds["id"] == img["dataset_id"])
        return _info(ImageApi, id=image_id, name=img["name"], datasetId=img["dataset_id"], projectId=project_id,
                     ext=Path(img["name"]).suffix.lstrip("."), mime="image/png", size=len(img["bytes"]),
                     width=width, height=height, labelsCount=len(img["ann"].get("objects", [])), tags=[],
                     hash=f"hash{image_id}", meta={}, createdAt="2026-01-01T00:00:00.000Z",
                     updatedAt=self.updated_at, fullStorageUrl=f"{self.url}/img/{image_id}")

    def _images_list(self, call):
        """A dataset's images, filtered (``name`` / ``id``, ``=`` / ``in``); one page (``after``: no next)."""
        images = self._dataset_images(call.body.get("datasetId"))
        entities = _filtered([self._image_info(i, img) for i, img in images.items()], call.body.get("filter"))
        if entities is None:
            return 400, {"error": f"unsupported filter {call.body.get('filter')}"}
        return 200, {"total": len(entities), "perPage": 500, "pagesCount": 1, "entities": entities, "after": None}

    def _images_info(self, call):
        image_id = call.body.get("id")
        if image_id not in self.images:
            return 404, {"error": f"image {image_id} not found"}
        return 200, self._image_info(image_id, self.images[image_id])

    def _images_copy(self, call):
        """Copies of existing images (``imageId``) into ``datasetId``, without their annotations."""
        if not any(ds["id"] == call.body.get("datasetId") for ds in self.datasets):
            return 404, {"error": "dataset not found"}
        added = []
        for item in call.body["images"]:
            source = self.images.get(item.get("imageId"))
            if source is None:
                return 400, {"error": f"image {item.get('imageId')} not found"}
            image_id = max(self.images) + 1
            self.images[image_id] = {**source, "dataset_id": call.body["datasetId"], "name": item["title"],
                                     "ann": {"size": source["size"], "tags": [], "objects": []}}
            added.append(self._image_info(image_id, self.images[image_id]))
        return 200, added

    def _images_download(self, call):
        image_id = call.body.get("id")
        return (200, self.images[image_id]["bytes"]) if image_id in self.images else (404, {"error": "image not found"})

    def _images_bulk_download(self, call):
        """multipart/mixed, one part per image, named by image id (as the platform answers)."""
        boundary = "loopbackboundary"
        chunks = []
        for image_id in call.body["imageIds"]:
            chunks.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{image_id}\"\r\n"
                          f"Content-Type: application/octet-stream\r\n\r\n".encode()
                          + self.images[image_id]["bytes"] + b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        return 200, (b"".join(chunks), f"multipart/form-data; boundary={boundary}")

    def _annotations(self, ids):
        return [{"imageId": i, "imageName": self.images[i]["name"], "datasetId": self.images[i]["dataset_id"],
                 "annotation": self.images[i]["ann"], "createdAt": "2026-01-01T00:00:00.000Z",
                 "updatedAt": self.updated_at} for i in ids]

    def _annotations_bulk(self, call):
        return 200, self._annotations(call.body["imageIds"])

    def _annotations_add(self, call):
        """Replaces the images' annotations, refused whole (as the platform does) when an image is not in
        ``datasetId``, a label's class is not in the project's meta or has another shape, or a size is wrong."""
        dataset = next((ds for ds in self.datasets if ds["id"] == call.body.get("datasetId")), None)
        if dataset is None:
            return 404, {"error": "dataset not found"}
        meta = self.projects[dataset["project_id"]]["meta"]
        classes = {c["title"]: c["shape"] for c in meta.get("classes", [])}
        for entry in call.body["annotations"]:
            img = self.images.get(entry["imageId"])
            if img is None or img["dataset_id"] != call.body.get("datasetId"):
                return 400, {"error": f"image {entry['imageId']} is not in dataset {call.body.get('datasetId')}"}
            ann = entry["annotation"]
            if ann.get("size") != img["size"]:
                return 400, {"error": f"image {entry['imageId']}: annotation size {ann.get('size')} != {img['size']}"}
            for label in ann.get("objects", []):
                shape = classes.get(label.get("classTitle"))
                if shape not in (label.get("geometryType"), "any"):
                    return 400, {"error": f"image {entry['imageId']}: class {label.get('classTitle')!r} "
                                          f"({label.get('geometryType')}) is not in the project's meta"}
        for entry in call.body["annotations"]:
            objects = [{**obj, "id": next(self._label_ids)} for obj in entry["annotation"].get("objects", [])]
            self.images[entry["imageId"]]["ann"] = {**entry["annotation"], "objects": objects}
        return 200, {"success": True}

    # ---- Model Benchmark: workspaces, projects the SDK creates and archives, the user
    def _page(self, entities: list) -> dict:
        return {"total": len(entities), "perPage": 500, "pagesCount": 1, "entities": entities}

    def _workspace_info(self, workspace_id: int) -> dict:
        ws = self.workspaces[workspace_id]
        return _info(WorkspaceApi, id=workspace_id, name=ws["name"], description=ws["description"], teamId=self.team_id,
                     createdAt="2026-01-01T00:00:00.000Z", updatedAt=self.updated_at)

    def _workspaces_list(self, call):
        if call.body.get("teamId") != self.team_id:
            return 404, {"error": f"team {call.body.get('teamId')} not found"}
        found = _filtered([self._workspace_info(i) for i in self.workspaces], call.body.get("filter"))
        return (400, {"error": "unsupported filter"}) if found is None else (200, self._page(found))

    def _workspaces_add(self, call):
        name = call.body.get("name")
        if call.body.get("teamId") != self.team_id:
            return 404, {"error": f"team {call.body.get('teamId')} not found"}
        if not name or any(ws["name"] == name for ws in self.workspaces.values()):
            return 400, {"error": f"workspace name {name!r} is empty or taken"}
        workspace_id = max(self.workspaces) + 1
        self.workspaces[workspace_id] = {"name": name, "description": call.body.get("description") or "", "hidden": False}
        return 200, self._workspace_info(workspace_id)

    def _workspaces_visibility(self, call):
        ws = self.workspaces.get(call.body.get("id"))
        if ws is None:
            return 404, {"error": "workspace not found"}
        if not isinstance(call.body.get("hidden"), bool):
            return 400, {"error": "hidden must be true or false"}
        ws["hidden"] = call.body["hidden"]
        return 200, {"success": True}

    def _projects_list(self, call):
        """The projects of ``workspaceId`` (or of the team, ``groupId``), filtered."""
        workspace_id, team_id = call.body.get("workspaceId"), call.body.get("groupId", self.team_id)
        if team_id != self.team_id or workspace_id not in (None, *self.workspaces):
            return 404, {"error": "workspace or team not found"}
        infos = [self._project_info(i) for i in self.projects]
        found = _filtered([i for i in infos if workspace_id in (None, i["workspaceId"])], call.body.get("filter"))
        return (400, {"error": "unsupported filter"}) if found is None else (200, self._page(found))

    def _projects_add(self, call):
        workspace_id, name = call.body.get("workspaceId"), call.body.get("name")
        if workspace_id not in self.workspaces:
            return 404, {"error": "workspace not found"}
        if call.body.get("type") != "images":
            return 400, {"error": f"project type {call.body.get('type')!r}: the loopback holds image projects"}
        if not name or any(p["name"] == name and p.get("workspace_id") == workspace_id for p in self.projects.values()):
            return 400, {"error": f"project name {name!r} is empty or taken in workspace {workspace_id}"}
        return 200, self._project_info(self.add_project(name, workspace_id))

    def _projects_archive(self, call):
        """``api.project.remove``: the project leaves the lists, with its datasets and images."""
        project_id = call.body.get("id")
        if project_id not in self.projects:
            return 404, {"error": "project not found"}
        del self.projects[project_id]
        gone = {ds["id"] for ds in self.datasets if ds["project_id"] == project_id}
        self.datasets[:] = [ds for ds in self.datasets if ds["id"] not in gone]
        for image_id in [i for i, img in self.images.items() if img["dataset_id"] in gone]:
            del self.images[image_id]
        self.archived_projects.append(project_id)
        return 200, {"success": True}

    def _users_me(self, call):
        return 200, _info(UserApi, id=1, login="loopback", name="Loopback", role="admin", email="", disabled=False)

    # ---- Team Files
    def _file_info(self, path: str) -> dict:
        return _info(FileApi, id=abs(hash(path)) % 10**6, name=Path(path).name, path=path, storagePath=path,
                     teamId=self.team_id, size=len(self.files[path]), mime="application/octet-stream",
                     ext=Path(path).suffix.lstrip("."), hash="", createdAt="2026-01-01T00:00:00.000Z",
                     updatedAt="2026-01-01T00:00:00.000Z", fullStorageUrl=f"{self.url}/files{path}",
                     userId=1, meta={"size": len(self.files[path])}, type="file")  # FileInfo.sizeb

    def _files_list(self, call):
        """Everything under ``path`` (recursive), files and their folders, as the platform lists them."""
        asked = call.body.get("path", "/")
        if asked in self.files:
            return 200, [self._file_info(asked)]
        prefix = asked.rstrip("/") + "/"
        entries, folders = [], set()
        for path in sorted(self.files):
            if not path.startswith(prefix):
                continue
            entries.append(self._file_info(path))
            parts = path[len(prefix):].split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folders.add(prefix + "/".join(parts[:depth]) + "/")
        entries += [_info(FileApi, id=0, name=Path(f).name, path=f, type="folder", teamId=self.team_id)
                    for f in sorted(folders)]
        return 200, entries

    def _files_download(self, call):
        path = call.body.get("path")
        return (200, self.files[path]) if path in self.files else (404, {"error": f"{path} not found"})

    def _files_upload(self, call):
        """Multipart: ``name`` and ``path`` (the folder) fields before each ``file`` part."""
        if int(call.query.get("teamId", [0])[0]) != self.team_id:
            return 400, {"error": "wrong teamId"}
        stored, fields = [], {}
        for name, _filename, payload in call.body["parts"]:
            if name == "file":
                path = "/" + (fields["path"].rstrip("/") + "/" + fields["name"]).lstrip("/")
                self.files[path] = payload
                self.stored.append(path)
                stored.append(self._file_info(path))
            else:
                fields[name] = payload.decode()
        return 200, stored

    def _task_output(self, call):
        """A folder (``general``) or an experiment (``experiment.data``: ExperimentInfo's fields, its files in
        Team Files) as the task's output."""
        output = call.body.get("output") or {}
        if not isinstance(call.body.get("taskId"), int) or not output:
            return 400, {"error": "taskId and output are required"}
        if "experiment" in output:
            problem = self._experiment_problem(output["experiment"].get("data") or {})
            if problem:
                return 400, {"error": f"experiment: {problem}"}
        self.task_outputs.append(call.body)
        return 200, {"success": True}

    def _experiment_problem(self, info: dict) -> str | None:
        """What the Experiments table could not show or serve: a missing field, a file not in Team Files."""
        from supervisely.nn.experiments import ExperimentInfo  # its dataclass fields are the table's columns
        required = [f for f, spec in ExperimentInfo.__dataclass_fields__.items()
                    if spec.default is dataclasses.MISSING]
        missing = [f for f in required if info.get(f) in (None, "")]
        if missing:
            return f"missing {', '.join(missing)}"
        root = info["artifacts_dir"].rstrip("/") + "/"
        files = [info["hyperparameters"], info["model_meta"], *info["checkpoints"], *info["model_files"].values()]
        absent = [f for f in files if root + f.lstrip("/") not in self.files]
        if absent:
            return f"not in Team Files under {root}: {', '.join(absent)}"
        if info["best_checkpoint"] not in {Path(c).name for c in info["checkpoints"]}:
            return f"best_checkpoint {info['best_checkpoint']} is not among the checkpoints"
        return None

    def _task_info(self, call):
        task_id = call.body.get("id")
        if not isinstance(task_id, int):
            return 400, {"error": "id is required"}
        return 200, {"id": task_id, "teamId": self.team_id, "workspaceId": self.workspace_id,
                     "startedAt": "2026-01-01T00:00:00.000Z", "status": "started",
                     "meta": {"app": {"id": 77, "name": "Train UNet", "version": "test"}}}

    def _workflow_node(self, direction: str):
        """workflow.node.add-input / add-output: a project, file or model weight of this team, for a task node."""
        def handle(call):
            body = call.body
            kind, node = body.get("type"), body.get("node") or {}
            if body.get("teamId") != self.team_id or node.get("type") != "task" or not isinstance(node.get("id"), int):
                return 400, {"error": "teamId and node {type: task, id} are required"}
            known = {"project": set(self.projects), "file": {self._file_info(p)["id"] for p in self.files}}
            known["model_weight"] = known["file"]
            if kind not in known or body.get("id") not in known[kind]:
                return 404, {"error": f"{kind} {body.get('id')} not found"}
            self.workflow.append({"direction": direction, **body})
            return 200, {"success": True}
        return handle

    def _task_data(self, call):
        self.task_fields.append(call.body)
        return 200, {"success": True}

    def _app_content(self, call):
        """tasks.app-v2.data.set: a production app's widget data patches and state, pushed to the page."""
        body = call.body
        if not isinstance(body.get("taskId"), int) or not isinstance(body.get("payload"), dict):
            return 400, {"error": "taskId and payload are required"}
        return 200, {"success": True}

    def _task_meta(self, call):
        """tasks.meta.update: what a production app records at shutdown (its page's files for offline viewing)."""
        if not isinstance(call.body.get("id"), int) or not isinstance(call.body.get("data"), dict):
            return 400, {"error": "id and data are required"}
        return 200, {"success": True}

    def _task_data_get(self, call):
        """The task's fields, as tasks.data.set left them (only the last value of each; nested paths not split)."""
        task_id, fields = call.body.get("taskId"), call.body.get("fields")
        if not isinstance(task_id, int) or not isinstance(fields, list):
            return 400, {"error": "taskId and fields are required"}
        values = {entry["field"]: entry.get("payload") for body in self.task_fields if body.get("taskId") == task_id
                  for entry in body.get("fields", [])}
        return 200, {field: values.get(field) for field in fields}

    # ---- HTTP
    def _request_handler(self):
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/"):
                    body = {"parts": _multipart(content_type, raw)}
                else:
                    try:
                        body = json.loads(raw) if raw else {}
                    except ValueError:
                        body = {"raw": raw}
                method = url.path[len(API_PREFIX):] if url.path.startswith(API_PREFIX) else url.path
                call = Call(method, parse_qs(url.query), body, dict(self.headers))
                with platform._lock:
                    platform.calls.append(call)
                    fault = platform._faults[method].pop(0) if platform._faults.get(method) else None
                if self.headers.get("x-api-key") != platform.token and url.path.startswith(API_PREFIX):
                    return self._send(401, {"error": "bad token"})
                if fault == "timeout":
                    time.sleep(platform.stall_seconds)
                if fault in ("drop", "timeout"):  # the request was read (and maybe processed): no answer
                    self.close_connection = True
                    return
                if fault is not None:
                    return self._send(fault, {"error": f"injected fault {fault}"})
                handler = platform.handlers.get(method)
                if handler is None:
                    platform.unknown.append(method)
                    return self._send(404, {"error": f"loopback: {method} is not implemented"})
                status, payload = handler(call)
                self._send(status, payload)

            def _send(self, status, payload):
                if isinstance(payload, tuple):
                    data, content_type = payload
                elif isinstance(payload, bytes):
                    data, content_type = payload, "application/octet-stream"
                else:
                    data, content_type = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = _handle

        return Handler
