"""The serving app on a platform: its checkpoint and the images to predict come from a loopback Supervisely
server, and requests name images by id (what the platform's apps send), by URL, or upload them for later;
predictions of a whole project can be written back into it.

Predictions are checked against the engine's ``Predictor`` on the same image bytes; bad request states must get
a 4xx that says what is wrong (the SDK's own code answered 500 to most of them).
"""
from __future__ import annotations

import copy
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import supervisely as sly
from hypothesis import HealthCheck, given, settings, strategies as st
from supervisely.annotation.label import LabelingStatus
from supervisely.nn.model.model_api import ModelAPI

from custom_net.preprocessing import decode_image_rgb
from tests.sly_loopback import LoopbackPlatform
from custom_net.predict import load_predictor
from tests.helpers import assert_agrees, make_run, mask_of, Server

pytestmark = pytest.mark.slow  # starts processes or servers

REMOTE_RUN = "/unet/3_tiny/"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_platform") / "run"
    make_run(root)
    return root


@pytest.fixture(scope="module")
def predictor(run):
    return load_predictor(run, "cpu")  # what the server loads: best checkpoint, default fast path


@pytest.fixture(scope="module")
def platform(tiny_project, run):
    with LoopbackPlatform(tiny_project) as platform:
        for path in run.rglob("*"):
            if path.is_file():
                platform.files[REMOTE_RUN + path.relative_to(run).as_posix()] = path.read_bytes()
        yield platform


@pytest.fixture
def writable_platform(platform):
    """The module's platform, put back as it was after a test that writes to it (labels, classes, projects)."""
    meta, anns = copy.deepcopy(platform.meta_json), {i: img["ann"] for i, img in platform.images.items()}
    datasets, projects = list(platform.datasets), set(platform.projects)
    yield platform
    platform.meta_json = meta
    for image_id in set(platform.images) - set(anns):
        del platform.images[image_id]
    for image_id, ann in anns.items():
        platform.images[image_id]["ann"] = ann
    platform.datasets[:] = datasets
    for project_id in set(platform.projects) - projects:
        del platform.projects[project_id]


@pytest.fixture(scope="module")
def server(platform, run, tmp_path_factory):
    checkpoint = next((run / "checkpoints").iterdir()).name
    server = Server(None, tmp_path_factory.mktemp("platform_app"), {
        "SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token, "TEAM_ID": str(platform.team_id),
        "modal.state.slyFile": f"{REMOTE_RUN}checkpoints/{checkpoint}", "modal.state.device": "cpu"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def meta(server) -> sly.ProjectMeta:
    return sly.ProjectMeta.from_json(server.post("get_output_classes_and_tags").json())


def _expected_mask(platform, predictor, image_id: int):
    image = decode_image_rgb(platform.images[image_id]["bytes"], platform.images[image_id]["name"])
    return predictor.masks([image])[0]


def _rectangle(left, top, right, bottom):
    return {"points": {"exterior": [[left, top], [right, bottom]], "interior": []}}


def _finish(server, uuid: str, timeout_s: float = 120) -> dict:
    """Poll a scheduled request until it ends; its last progress answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        progress = server.post("get_inference_progress", json={"state": {"inference_request_uuid": uuid}}).json()
        if progress["finished"]:
            return progress
        assert time.monotonic() < deadline, "the scheduled request never finished"
        time.sleep(0.2)


def test_the_sdk_session_client_predicts_platform_images_and_projects_like_the_engine(server, platform, predictor):
    """``sly.nn.inference.Session``, the SDK's client that platform apps use, against the served app."""
    session = sly.nn.inference.Session(sly.Api(platform.url, platform.token), session_url=server.url)
    info = session.get_session_info()
    assert info["model_name"] == "UNet"
    deployed = server.post("get_deploy_info").json()
    assert deployed["checkpoint_name"] == info["checkpoint_name"] and deployed["model_name"] == "UNet"
    assert deployed["custom_checkpoint_path"] == f"{REMOTE_RUN}checkpoints/{info['checkpoint_name']}"
    assert deployed["model_precision"] == {"bfloat16": "BF16", "float32": "FP32"}[info["precision"]]
    assert deployed["device"] == "cpu" and deployed["runtime"] == "pytorch"
    ids = sorted(platform.images)
    one = session.inference_image_id(ids[0])
    many = session.inference_image_ids(ids)  # the async id route, polled and collected by the client
    assert len(many) == len(ids)
    infos = list(session.inference_image_ids_async(ids[:2]))  # results with the images' names
    assert [(i.image_id, i.image_name) for i in infos] == [(i, platform.images[i]["name"]) for i in ids[:2]]
    for image_id, ann in [(ids[0], one), *zip(ids, many)]:
        size = platform.images[image_id]["size"]
        assert ann.img_size == (size["height"], size["width"])
        assert_agrees(mask_of(ann.to_json(), session.get_model_meta()), _expected_mask(platform, predictor, image_id))
    project = list(session.inference_project_id_async(platform.project_id))  # what "Apply NN" to a project asks
    assert sorted(result.image_id for result in project) == ids
    for result in project:
        assert_agrees(mask_of(result.annotation, session.get_model_meta()),
                       _expected_mask(platform, predictor, result.image_id))
    downloads = [c for c in platform.calls if c.method == "images.download"]
    assert {c.body["id"] for c in downloads} == set(ids)
    assert all(c.headers.get("x-api-key") == platform.token for c in downloads)


def test_the_sdks_model_api_predicts_by_id_dataset_project_and_file(server, platform, predictor, tmp_path):
    """``ModelAPI.predict``, the SDK's newer client, copies its own arguments (``show_progress``, ``recursive``,
    ``conf``, ``img_size`` ...) into the settings: accepted and ignored, where every request used to get a 400."""
    model = ModelAPI(api=sly.Api(platform.url, platform.token), url=server.url)
    model_meta = model.get_model_meta()
    ids = sorted(platform.images)
    first_dataset = platform.datasets[0]["id"]
    cases = [(ids[:3], model.predict(image_id=ids[:3], show_progress=False)),
             ([i for i in ids if platform.images[i]["dataset_id"] == first_dataset],
              model.predict(dataset_id=first_dataset, show_progress=False)),
             (ids, model.predict(project_id=platform.project_id, conf=0.5, img_size=640, batch_size=4))]
    for expected_ids, predictions in cases:
        assert sorted(p.image_id for p in predictions) == expected_ids
        for prediction in predictions:
            assert_agrees(mask_of(prediction.annotation.to_json(), model_meta),
                           _expected_mask(platform, predictor, prediction.image_id))
    path = tmp_path / platform.images[ids[0]]["name"]
    path.write_bytes(platform.images[ids[0]]["bytes"])
    kept = model_meta.obj_classes.keys()[1]
    [prediction] = model.predict(input=str(path), classes=[kept])  # uploaded by the client
    expected = _expected_mask(platform, predictor, ids[0])
    assert_agrees(mask_of(prediction.annotation.to_json(), model_meta), np.where(expected == 1, expected, 0))
    assert {label.obj_class.name for label in prediction.annotation.labels} <= {kept}
    # What the client adds for a video (frame range, stride) reaches the settings too.
    video_arguments = {"start_frame": 0, "start_frame_index": 0, "num_frames": 5, "frames_count": 5, "end_frame": 4,
                       "stride": 2, "step": 2, "duration": 1.5, "direction": "forward"}
    response = server.post("inference_image_id", json={"state": {"image_id": ids[0], "settings": video_arguments}})
    assert response.status_code == 200, response.text[:300]


def test_the_served_checkpoint_is_the_sessions_workflow_input(server, platform, run, tmp_path):
    """As the original Serve UNet records it, on a platform with workflow; in development mode (the module's
    server: ENV unset) not a single workflow call."""
    assert not [m for m in platform.methods() if m.startswith("workflow.")]
    checkpoint = f"{REMOTE_RUN}checkpoints/{next((run / 'checkpoints').iterdir()).name}"
    production = Server(None, tmp_path, {
        "SERVER_ADDRESS": platform.url, "API_TOKEN": platform.token, "TEAM_ID": str(platform.team_id),
        "TASK_ID": "31", "ENV": "production", "modal.state.slyFile": checkpoint, "modal.state.device": "cpu"})
    production.stop()
    node = next(n for n in platform.workflow if n["node"] == {"type": "task", "id": 31})
    assert node["direction"] == "input" and node["type"] == "model_weight"
    assert node["id"] == platform._file_info(checkpoint)["id"]
    assert node["meta"]["customNodeSettings"]["title"] == "<h4>Serve Custom Model</h4>"


def test_the_speedtest_route_times_batches_of_platform_images(server, platform):
    """``/run_speedtest`` (the platform's model benchmark): warm-up, then one timing per batch, split into
    preprocess (resize), inference (the network) and postprocess (probabilities back to size, argmax)."""
    session = sly.nn.inference.Session(sly.Api(platform.url, platform.token), session_url=server.url)
    timings = list(session.run_speedtest(platform.project_id, batch_size=2, num_iterations=3, num_warmup=1))
    assert len(timings) == 3, timings
    for t in timings:
        stages = [t["preprocess"], t["inference"], t["postprocess"]]
        assert all(s > 0 for s in stages) and sum(stages) <= t["total"], t


def test_a_rectangle_crops_the_platform_image_and_the_answer_keeps_its_size(server, platform, meta, predictor):
    image_id = sorted(platform.images)[0]
    image = decode_image_rgb(platform.images[image_id]["bytes"])
    response = server.post("inference_image_id", json={"state": {"image_id": image_id,
                                                                  "rectangle": _rectangle(8, 4, 40, 30)}})
    assert response.status_code == 200, response.text[:300]
    mask = mask_of(response.json()["annotation"], meta)
    assert mask.shape == image.shape[:2]
    assert not mask[:4].any() and not mask[31:].any() and not mask[:, :8].any() and not mask[:, 41:].any()
    assert_agrees(mask[4:31, 8:41], predictor.masks([image[4:31, 8:41]])[0])


BAD_ID_STATES = [  # state, status, what the message must say
    ({}, 400, 'no image ids in the request state: give "image_id"'),
    ({"batch_ids": None, "image_id": "first"}, 400, '"batch_ids" is null'),  # the SDK reads batch_ids first
    ({"image_id": "abc"}, 400, '"image_id" must be a positive integer image id'),
    ({"batch_ids": []}, 400, '"batch_ids" must be a positive integer image id or a non-empty list'),
    ({"image_id": 99999}, 404, "Image (id: 99999) is either archived, doesn't exist"),
    ({"image_id": "first", "rectangle": 5}, 400, "rectangle must be null or a Supervisely rectangle"),
    ({"image_id": "first", "settings": {"rectangle": {"points": []}}}, 400, "settings.rectangle must be null or"),
    ({"image_id": "first", "rectangle": _rectangle(100, 100, 200, 200)}, 400,
     "rectangle (left 100, top 100, right 200, bottom 200) does not lie inside a 64x48 image"),
    ({"image_id": "first", "settings": []}, 400, '"settings" must be a JSON object'),
    ({"image_id": "first", "settings": {"confidence": 0.5}}, 400, "unknown inference setting(s) 'confidence'"),
    ({"image_id": "first", "settings": {"mode": "tiles"}}, 400, "mode must be one of whole, sliding"),
    ({"image_id": "first", "settings": {"classes": False}}, 400, 'classes must be "all" or a list of class names'),
    ({"image_id": "first", "settings": {"classes": ["kiwii"]}}, 400, "unknown class(es) 'kiwii' in \"classes\""),
    ({"image_id": "first", "batch_size": 0}, 400, "batch_size must be a positive integer"),
    (None, 400, 'the request needs a JSON body with a "state" object'),
]


@pytest.mark.parametrize("state, status, message", BAD_ID_STATES)
def test_bad_id_requests_get_a_4xx_with_a_message(server, platform, state, status, message):
    if state is not None and state.get("image_id") == "first":
        state = {**state, "image_id": sorted(platform.images)[0]}
    for route in ("inference_image_id", "inference_batch_ids"):
        response = server.post(route, json={} if state is None else {"state": state})
        assert response.status_code == status, (route, response.text[:300])
        assert message in response.json()["message"], response.text[:300]


@pytest.mark.parametrize("state", [{"rectangle": None}, {"settings": {"rectangle": None}}, {"settings": None}])
def test_null_rectangle_and_settings_mean_none(server, platform, state):
    image_id = sorted(platform.images)[0]
    response = server.post("inference_image_id", json={"state": {"image_id": image_id, **state}})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["annotation"]["size"] == platform.images[image_id]["size"]


@pytest.fixture(scope="module")
def web(tiny_project):
    """A plain web server on 127.0.0.1 holding the project's files: where ``image_url`` points."""
    web = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tiny_project)))
    web.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{web.server_port}"
    web.shutdown()


def test_image_url_route(server, web, tiny_project, meta, predictor):
    path = sorted((tiny_project / "ds_a" / "img").iterdir())[0]
    response = server.post("inference_image_url", json={"state": {"image_url": f"{web}/ds_a/img/{path.name}"}})
    assert response.status_code == 200, response.text[:300]
    assert_agrees(mask_of(response.json()["annotation"], meta),
                   predictor.masks([decode_image_rgb(path.read_bytes())])[0])
    for state, message in [({"image_url": f"{web}/ds_a/img/missing.png"}, "cannot download (404"),
                           ({"image_url": f"{web}/meta.json"}, "meta.json: not a readable image"),
                           ({"image_url": "file:///etc/passwd"}, '"image_url" must be an http(s) URL'),
                           ({}, '"image_url" must be an http(s) URL, got null')]:
        response = server.post("inference_image_url", json={"state": state})
        assert response.status_code == 400 and message in response.json()["message"], response.text[:300]


def test_async_upload_route_decodes_and_checks_before_scheduling(server, tiny_project, meta, predictor):
    path = sorted((tiny_project / "ds_b" / "img").iterdir())[0]
    response = server.post("inference_batch_async", files=[("files", (path.name, path.read_bytes()))])
    assert response.status_code == 200, response.text[:300]
    uuid = response.json()["inference_request_uuid"]
    _finish(server, uuid, timeout_s=60)
    results = server.post("pop_inference_results", json={"state": {"inference_request_uuid": uuid}}).json()
    [result] = results["pending_results"]
    assert_agrees(mask_of(result["annotation"], meta), predictor.masks([decode_image_rgb(path.read_bytes())])[0])
    for files, form, message in [([("files", ("junk.png", b"junk"))], {}, "junk.png: not a readable image"),
                                 ([("files", (path.name, path.read_bytes()))], {"settings": '{"mode": "x"}'},
                                  "unknown request key(s) 'mode'")]:
        response = server.post("inference_batch_async", files=files, data=form)
        assert response.status_code == 400 and message in response.json()["message"], response.text[:300]


@pytest.mark.parametrize("upload_mode", ["append", "replace", "iou_merge"])
def test_predictions_are_written_back_to_the_platform_project(server, writable_platform, predictor, upload_mode):
    """A project inferred with ``upload_mode`` and no output project (what "Apply NN" does to label the project
    itself): each image gets one label per predicted class, after its own labels (append, iou_merge: the SDK drops
    predictions whose box overlaps an own label of the class) or instead of them (replace). The model's classes
    join the project's meta, as ``<name>_nn`` where the project has the name with another shape."""
    platform = writable_platform
    saved_meta, saved_anns = copy.deepcopy(platform.meta_json), {i: img["ann"] for i, img in platform.images.items()}
    response = server.post("inference_project_id_async",
                           json={"state": {"projectId": platform.project_id, "upload_mode": upload_mode}})
    assert response.status_code == 200, response.text[:300]
    progress = _finish(server, response.json()["inference_request_uuid"])
    assert progress["exception"] is None and not platform.unknown, (progress["exception"], platform.unknown)
    assert progress["pending_results"] == len(platform.images), progress  # one (empty) result per image
    model_classes = [c["title"] for c in server.post("get_output_classes_and_tags").json()["classes"]]
    project_meta = sly.ProjectMeta.from_json(platform.meta_json)
    shapes = {c["title"]: c["shape"] for c in saved_meta["classes"]}
    for name in model_classes[1:]:  # after __bg__
        renamed = name if shapes.get(name, "bitmap") == "bitmap" else name + "_nn"
        assert project_meta.get_obj_class(renamed).geometry_type == sly.Bitmap, (name, renamed)
    for image_id, img in platform.images.items():
        ann = sly.Annotation.from_json(img["ann"], project_meta)
        predicted = {label.obj_class.name.removesuffix("_nn"): label for label in ann.labels
                     if label.status == LabelingStatus.AUTO}
        own = [label for label in ann.labels if label.status != LabelingStatus.AUTO]
        assert len(own) == (0 if upload_mode == "replace" else len(saved_anns[image_id]["objects"]))
        expected = _expected_mask(platform, predictor, image_id)
        present = {model_classes[i] for i in np.unique(expected) if i}
        assert len(predicted) == len([lb for lb in ann.labels if lb.status == LabelingStatus.AUTO])  # one per class
        assert set(predicted) <= present and (upload_mode == "iou_merge" or set(predicted) == present)
        for name, label in predicted.items():
            drawn = np.zeros(ann.img_size, np.uint8)
            label.geometry.draw(drawn, 1)
            assert ((drawn == 1) == (expected == model_classes.index(name))).mean() >= 0.999, (image_id, name)


@pytest.mark.parametrize("extra, message", [
    ({"upload_mode": "apend"}, 'upload_mode must be one of append, replace, iou_merge, create, got "apend"'),
    ({"upload_mode": "append", "output_project_id": "new"}, 'output_project_id must be a positive integer, got "new"'),
    ({"upload_mode": "iou_merge", "settings": {"existing_objects_iou_thresh": 2}},
     "existing_objects_iou_thresh must be a number in [0, 1], got 2"),
])
def test_bad_write_back_requests_are_refused_before_any_label_changes(server, platform, extra, message):
    """An upload_mode the SDK does not know would make it replace every image's own labels (a typo erases them)."""
    before = copy.deepcopy({i: img["ann"] for i, img in platform.images.items()})
    response = server.post("inference_project_id_async", json={"state": {"projectId": platform.project_id, **extra}})
    assert response.status_code == 400 and message in response.json()["message"], response.text[:300]
    assert {i: img["ann"] for i, img in platform.images.items()} == before


def test_a_refused_write_of_predictions_fails_the_request(server, writable_platform):
    """The platform refuses the annotations: the client gets the error (the SDK's worker thread dropped it,
    and the request used to finish as a success with no results)."""
    platform = writable_platform
    platform.fail("annotations.bulk.add", status=400)
    model = ModelAPI(api=sly.Api(platform.url, platform.token), url=server.url)
    with pytest.raises(RuntimeError, match=r"writing the predictions to the platform failed: 400 Client Error.*"
                                           r"annotations\.bulk\.add.*injected fault 400"):
        model.predict(project_id=platform.project_id, upload_mode="append", show_progress=False)


def test_predictions_go_into_another_project_when_asked(server, writable_platform, predictor):
    """``output_project_id`` (Apply NN into a new project): the SDK copies each image into a dataset of the same
    name there and uploads the predicted labels; the model's classes become that project's; the source is untouched."""
    platform = writable_platform
    source_anns = {i: copy.deepcopy(img["ann"]) for i, img in platform.images.items()}
    datasets_before = list(platform.datasets)
    target = platform.add_project("predictions")
    model = ModelAPI(api=sly.Api(platform.url, platform.token), url=server.url)
    predictions = model.predict(project_id=platform.project_id, output_project_id=target, show_progress=False)
    assert sorted(p.image_id for p in predictions) == sorted(source_anns)
    assert {i: img["ann"] for i, img in platform.images.items() if i in source_anns} == source_anns
    copied = [ds for ds in platform.datasets if ds["project_id"] == target]
    assert sorted(ds["name"] for ds in copied) == sorted(ds["name"] for ds in datasets_before)
    target_meta = sly.ProjectMeta.from_json(platform.projects[target]["meta"])
    model_meta = model.get_model_meta()
    assert {(c.name, c.geometry_type) for c in target_meta.obj_classes} <= \
        {(c.name, sly.Bitmap) for c in model_meta.obj_classes if c.name != "__bg__"}
    for source_id in source_anns:
        source = platform.images[source_id]
        source_dataset = next(ds["name"] for ds in datasets_before if ds["id"] == source["dataset_id"])
        [copy_id] = [i for i, img in platform.images.items() if img["name"] == source["name"]
                     and img["dataset_id"] in {ds["id"] for ds in copied if ds["name"] == source_dataset}]
        assert platform.images[copy_id]["bytes"] == source["bytes"]
        ann = sly.Annotation.from_json(platform.images[copy_id]["ann"], target_meta)
        assert all(label.status == LabelingStatus.AUTO for label in ann.labels)
        assert_agrees(mask_of(ann.to_json(), model_meta), _expected_mask(platform, predictor, source_id))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
rectangles = st.builds(_rectangle, st.integers(-5, 80), st.integers(-5, 60), st.integers(-5, 80), st.integers(-5, 60))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(route=st.sampled_from(["inference_image_id", "inference_batch_ids"]), data=st.data())
def test_fuzzed_id_requests_never_crash_the_server(server, platform, route, data):
    ids = st.sampled_from(sorted(platform.images)) | st.integers(-2, 10**6) | json_values
    state = data.draw(st.fixed_dictionaries({}, optional={
        "image_id": ids, "batch_ids": st.lists(ids, max_size=3) | json_values, "batch_size": json_values,
        "rectangle": rectangles | json_values,
        "settings": json_values | st.fixed_dictionaries({}, optional={
            "mode": st.sampled_from(["whole", "sliding"]) | json_values, "overlap": json_values,
            "tile_batch_size": st.integers(-1, 300) | json_values, "rectangle": rectangles | json_values,
            "classes": st.just(["kiwi"]) | json_values})}))
    body = json.dumps({"state": state})  # NaN and Infinity included, as Python clients send them
    response = server.post(route, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (route, state, response.text[:500])
    if response.status_code >= 400:
        assert response.json().get("message"), (route, state, response.text[:500])
