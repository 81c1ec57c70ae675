"""The serving app over real HTTP: uvicorn in a subprocess on a free 127.0.0.1 port, started once for the module.

Predictions are checked against the engine's ``Predictor`` in this process (same checkpoint, same
fast path), so a wrong resize, class order or mask placement in the service shows up as a mismatch.
"""
from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import supervisely as sly

from custom_net.inference import predict_image, resize_probabilities
from custom_net.predict import load_predictor
from custom_net.preprocessing import read_image_rgb, resize_image
from tests.helpers import CLASSES, TINY_TRAIN_ARGS, assert_agrees, lemons_images, make_run, mask_of, png_declaring, Server

pytestmark = pytest.mark.slow  # starts processes or servers


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "run"
    make_run(root)
    return root


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    server = Server(run, tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def predictor(run):
    return load_predictor(run, "cpu")  # what the server loads: best checkpoint, default fast path


@pytest.fixture(scope="module")
def meta(server) -> sly.ProjectMeta:
    return sly.ProjectMeta.from_json(server.post("get_output_classes_and_tags").json())


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def _synthetic(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth blobs rather than noise: a model's output then has regions, not salt and pepper."""
    small = np.random.default_rng(seed).integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def test_session_info_and_classes(server, run):
    info = server.post("get_session_info").json()
    assert info["model_name"] == "UNet" and info["checkpoint_name"] == "model_001_best.pth"
    assert info["number_of_classes"] == len(CLASSES) and info["task type"] == "semantic segmentation"
    assert info["input_size"] == {"height": 64, "width": 64} and info["device"] == "cpu"
    assert info["batch_inference_support"] is True and info["inference_modes"] == ["whole", "sliding"]
    assert info["sliding_window_support"] == "basic"  # what the SDK's apps read to offer their sliding window
    classes = server.post("get_output_classes_and_tags").json()["classes"]
    # the run's class order and colours, every class a bitmap
    assert [(c["title"], c["shape"], c["color"]) for c in classes] == [
        (name, "bitmap", sly.color.rgb2hex(color)) for name, _, color in CLASSES]
    assert server.post("get_custom_inference_settings").json()["settings"] == {
        "mode": "whole", "overlap": 0.25, "tile_batch_size": 4, "inference_mode": "full_image",
        "sliding_window_params": {"windowHeight": 64, "windowWidth": 64, "overlapY": 16, "overlapX": 16,
                                  "borderStrategy": "shift_window"}}


def test_every_lemons_image_is_predicted_at_its_size(server, meta, predictor):
    for path in lemons_images():
        response = server.post("inference_image", files={"files": (path.name, path.read_bytes())})
        assert response.status_code == 200, response.text
        image = read_image_rgb(path)
        ann = response.json()["annotation"]
        assert (ann["size"]["height"], ann["size"]["width"]) == image.shape[:2]
        for obj in ann["objects"]:  # every bitmap lies inside the image
            origin_x, origin_y = obj["bitmap"]["origin"]
            bitmap = sly.Bitmap.base64_2_data(obj["bitmap"]["data"])
            assert origin_y + bitmap.shape[0] <= image.shape[0] and origin_x + bitmap.shape[1] <= image.shape[1]
        assert_agrees(mask_of(ann, meta), predictor.masks([image])[0])


def test_batch_route_answers_each_image_like_the_single_route(server, meta):
    images = [_synthetic(90, 130, 1), _synthetic(64, 64, 2), _synthetic(200, 150, 3)]
    files = [("files", (f"{i}.png", _png(image))) for i, image in enumerate(images)]
    response = server.post("inference_batch", files=files, data={"settings": json.dumps({"batch_size": 2})})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == len(images)
    for image, result in zip(images, results):
        single = server.infer(_png(image)).json()["annotation"]
        assert result["annotation"]["size"] == {"height": image.shape[0], "width": image.shape[1]}
        assert_agrees(mask_of(result["annotation"], meta), mask_of(single, meta))


def test_sliding_window_on_a_large_image(server, meta, predictor):
    image = _synthetic(200, 330, 4)  # 3 x 5 training sizes: 4 x 7 tiles of 64x64 at full resolution
    settings = {"mode": "sliding", "overlap": 0.3, "tile_batch_size": 16}
    response = server.infer(_png(image), settings=settings)
    assert response.status_code == 200, response.text
    sliding = mask_of(response.json()["annotation"], meta)
    assert sliding.shape == image.shape[:2]
    assert_agrees(sliding, predictor.masks([image], "sliding", overlap=0.3)[0])
    whole = mask_of(server.infer(_png(image)).json()["annotation"], meta)
    assert (whole != sliding).any()  # the setting reached the model: a different computation


def test_the_sdk_session_client_asks_for_the_sdks_sliding_window(server, meta, predictor, tmp_path):
    """``sly.nn.inference.Session``, as the platform's apps use it, with the SDK's own sliding window settings:
    the same masks as our ``mode: sliding`` with the equivalent settings, not the SDK's cut-up windows."""
    image = _synthetic(200, 330, 4)
    path = tmp_path / "large.png"
    path.write_bytes(_png(image))
    api = sly.Api(server.url, "x" * 128, ignore_task_id=True)  # the client needs one; uploads never use it
    session = sly.nn.inference.Session(api, session_url=server.url)
    window = {"windowHeight": 64, "windowWidth": 64, "overlapY": 20, "overlapX": 12, "borderStrategy": "shift_window"}
    session.update_inference_settings(inference_mode="sliding_window", sliding_window_params=window, tile_batch_size=8)
    answer = session.inference_image_path(str(path))
    assert isinstance(answer, sly.Annotation) and answer.img_size == image.shape[:2]
    # windows of the training size: our tiles, the larger overlap as a fraction (the SDK's are minimums)
    ours = server.infer(_png(image), settings={"mode": "sliding", "overlap": 20 / 64, "tile_batch_size": 8})
    assert_agrees(mask_of(answer.to_json(), meta), mask_of(ours.json()["annotation"], meta))
    assert_agrees(mask_of(answer.to_json(), meta), predictor.masks([image], "sliding", overlap=20 / 64)[0])

    # windows twice the training size: the image at half scale in our tiles, the answer at the image's size
    session.update_inference_settings(sliding_window_params={"windowHeight": 128, "windowWidth": 128,
                                                             "overlapY": 32, "overlapX": 32})
    answer = mask_of(session.inference_image_path(str(path)).to_json(), meta)
    half = predict_image(predictor.net, resize_image(image, 100, 165), 64, 64, predictor.device, predictor.amp_dtype,
                         "sliding", overlap=0.25)  # our sliding at 32 px overlap of 128 px windows
    assert_agrees(answer, resize_probabilities(half, *image.shape[:2]).argmax(dim=0).numpy())
    assert (answer != predictor.masks([image], "sliding", overlap=0.25)[0]).mean() > 0.05  # the scale reached it


def test_the_sdks_inference_modes_without_window_settings(server, meta, predictor):
    """``full_image`` is the whole image; ``sliding_window`` alone uses the advertised windows (the training
    size, overlap 16 px), i.e. our ``sliding`` at its defaults."""
    image = _synthetic(150, 230, 11)
    full = server.infer(_png(image), settings={"inference_mode": "full_image"}).json()["annotation"]
    assert_agrees(mask_of(full, meta), predictor.masks([image])[0])
    sliding = server.infer(_png(image), settings={"inference_mode": "sliding_window"}).json()["annotation"]
    assert_agrees(mask_of(sliding, meta), predictor.masks([image], "sliding", overlap=0.25)[0])


def _truncated_jpeg() -> bytes:
    data = cv2.imencode(".jpg", _synthetic(120, 160, 5))[1].tobytes()
    return data[: len(data) * 2 // 3]


def _sdk_window(params) -> dict:
    return {"settings": {"inference_mode": "sliding_window", "sliding_window_params": params}}


BAD_REQUESTS = {
    "not an image": ({"files": ("notes.txt", b"just some text, no pixels")}, {}, "notes.txt: not a readable image"),
    "empty file": ({"files": ("empty.jpg", b"")}, {}, "empty.jpg: empty file"),
    "truncated jpeg": ({"files": ("cut.jpg", _truncated_jpeg())}, {}, "cut.jpg: truncated JPEG"),
    "absurd dimensions": ({"files": ("huge.png", png_declaring(200_000, 150_000))}, {},
                          "huge.png: image of 200000x150000 pixels is larger than the limit"),
    "unknown setting": (None, {"settings": {"confidence": 0.5}}, "unknown inference setting(s) 'confidence'"),
    "bad mode": (None, {"settings": {"mode": "tiles"}}, "mode must be one of whole, sliding"),
    "unknown class": (None, {"settings": {"classes": ["plum"]}}, "unknown class(es) 'plum' in \"classes\""),
    "bad overlap": (None, {"settings": {"mode": "sliding", "overlap": 1.5}}, "overlap must be a number in [0, 1)"),
    "settings outside 'settings'": (None, {"mode": "sliding"}, "unknown request key(s) 'mode'"),
    "unknown inference_mode": (None, {"settings": {"inference_mode": "tiles"}},
                               "inference_mode must be one of full_image, sliding_window, got \"tiles\""),
    "sliding window: zero window": (None, _sdk_window({"windowHeight": 0}),
                                    "sliding_window_params.windowHeight must be a positive integer"),
    "sliding window: fractional window": (None, _sdk_window({"windowWidth": 64.5}),
                                          "sliding_window_params.windowWidth must be a positive integer"),
    "sliding window: negative overlap": (None, _sdk_window({"overlapX": -1}),
                                         "sliding_window_params.overlapX must be a non-negative integer"),
    "sliding window: overlap = window": (
        None, _sdk_window({"windowHeight": 32, "overlapY": 32}),
        "sliding_window_params.overlapY (32) must be less than sliding_window_params.windowHeight (32)"),
    "sliding window: overlap = image": (  # no windowHeight: the image's 48, as in the SDK
        None, _sdk_window({"overlapY": 48}),
        "sliding_window_params.overlapY (48) must be less than the window's height, here the image's (48)"),
    "sliding window: border strategy": (
        None, _sdk_window({"borderStrategy": "mirror"}),
        "sliding_window_params.borderStrategy must be one of shift_window, add_padding, change_size"),
    "sliding window: unknown key": (None, _sdk_window({"windowSize": 64}),
                                    "unknown key(s) 'windowSize' in sliding_window_params"),
    "sliding window: not an object": (None, _sdk_window([64, 64]), "sliding_window_params must be a JSON object"),
    "sliding window: tiny windows": (  # the model would see a 12800x12800 image
        {"files": ("big.png", _png(_synthetic(200, 200, 12)))}, _sdk_window({"windowHeight": 1, "windowWidth": 1}),
        "sliding_window_params: 1x1 windows predicted at the model's 64x64 scale this 200x200 image to 12800x12800"),
    "settings not json": (None, "{mode: sliding", "settings is not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving(server, case):
    files, state, message = BAD_REQUESTS[case]
    files = files or {"files": ("fine.png", _png(_synthetic(48, 48, 6)))}
    form = {"settings": state if isinstance(state, str) else json.dumps(state)}
    for route in ("inference_image", "inference_batch"):
        response = server.post(route, files=files, data=form)
        assert response.status_code == 400, (route, response.status_code, response.text[:500])
        assert message in response.json()["message"], response.text
    assert server.infer(_png(_synthetic(48, 48, 7))).status_code == 200


def test_two_files_for_the_single_image_route(server):
    image = _png(_synthetic(48, 48, 8))
    response = server.post("inference_image", files=[("files", ("a.png", image)), ("files", ("b.png", image))])
    assert response.status_code == 400 and "Only one file expected" in response.json()["message"]


def test_eight_concurrent_clients(server, meta):
    images = [_synthetic(60 + 20 * i, 90 + 10 * i, 10 + i) for i in range(8)]
    payloads = [_png(image) for image in images]
    expected = [mask_of(server.infer(p).json()["annotation"], meta) for p in payloads]

    def client(number: int) -> list[tuple[int, int, np.ndarray]]:
        answers = []
        with requests.Session() as session:
            for request in range(10):
                which = (number + request) % len(images)
                response = session.post(f"{server.url}/inference_image", timeout=120,
                                        files={"files": (f"{which}.png", payloads[which])})
                assert response.status_code == 200, response.text
                answers.append((which, mask_of(response.json()["annotation"], meta)))
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [a for client_answers in pool.map(client, range(8)) for a in client_answers]
    assert len(answers) == 80
    for which, mask in answers:
        assert_agrees(mask, expected[which])


def test_only_the_requested_classes_are_answered(server, meta):
    image = _png(_synthetic(120, 160, 9))
    everything = server.infer(image).json()["annotation"]
    assert {o["classTitle"] for o in everything["objects"]} == {"lemon", "kiwi"}
    only_kiwi = server.infer(image, settings={"classes": ["kiwi"]}).json()["annotation"]
    assert [o["classTitle"] for o in only_kiwi["objects"]] == ["kiwi"]
    assert only_kiwi["objects"] == [o for o in everything["objects"] if o["classTitle"] == "kiwi"]


class TeamFiles(ThreadingHTTPServer):
    """Loopback stand-in for the platform's Team Files API: the two calls the app makes
    (``file-storage.list`` for existence, ``file-storage.download``), answered from a local folder."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            method = self.path.split("/public/api/v3/")[-1]
            self.server.calls.append((method, body.get("teamId"), body.get("path")))
            local = self.server.root / body.get("path", "").lstrip("/")
            if method == "file-storage.list":
                found = [{"path": body["path"], "name": local.name}] if local.is_file() else []
                self._answer(json.dumps(found).encode(), "application/json")
            elif method == "file-storage.download" and local.is_file():
                self._answer(local.read_bytes(), "application/octet-stream")
            else:
                self.send_error(404)

        def _answer(self, data: bytes, content_type: str):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


def test_on_the_platform_the_checkpoint_and_run_info_come_from_team_files(run, tmp_path):
    storage = tmp_path / "storage"
    shutil.copytree(run, storage / "unet" / "7_lemons")
    team_files = TeamFiles(storage)
    remote = "/unet/7_lemons/checkpoints/model_001_best.pth"
    platform = {"SERVER_ADDRESS": f"http://127.0.0.1:{team_files.server_port}", "API_TOKEN": "token",
                "TEAM_ID": "5", "modal.state.slyFile": remote, "modal.state.device": "cpu"}
    server = Server(None, tmp_path / "app", platform)
    try:
        assert server.post("get_session_info").json()["checkpoint_name"] == "model_001_best.pth"
        assert [c["title"] for c in server.post("get_output_classes_and_tags").json()["classes"]] == [
            name for name, _, _ in CLASSES]
        downloads = {path for method, team, path in team_files.calls if method == "file-storage.download"}
        assert downloads == {remote, "/unet/7_lemons/info/ui_state.json", "/unet/7_lemons/info/model_classes.json"}
        assert all(team == 5 for _, team, _ in team_files.calls)
    finally:
        server.stop()
    (storage / "unet" / "7_lemons" / "info" / "model_classes.json").unlink()
    with pytest.raises(pytest.fail.Exception, match="/unet/7_lemons/info/model_classes.json not found"):
        Server(None, tmp_path / "app2", platform)
    team_files.shutdown()


def test_int8_runtime_on_the_platform_with_the_runs_calibration_images(tiny_project, tmp_path):
    from custom_net.train import main as train

    run = tmp_path / "run"
    train([*TINY_TRAIN_ARGS, "--project-dir", str(tiny_project), "--epochs", "4", "--amp", "off", "--no-eval",
           "--output", str(run)])
    storage = tmp_path / "storage"
    shutil.copytree(run, storage / "unet" / "8_demo")
    team_files = TeamFiles(storage)
    best = next((run / "checkpoints").glob("model_*_best.pth")).name
    platform = {"SERVER_ADDRESS": f"http://127.0.0.1:{team_files.server_port}", "API_TOKEN": "token",
                "TEAM_ID": "5", "modal.state.slyFile": f"/unet/8_demo/checkpoints/{best}",
                "modal.state.device": "cpu", "modal.state.runtime": "int8"}
    server = Server(None, tmp_path / "app", platform)
    try:
        info = server.post("get_session_info").json()
        assert info["runtime"] == "int8" and info["precision"] == "int8" and info["device"] == "cpu"
        downloads = {path for method, _, path in team_files.calls if method == "file-storage.download"}
        assert "/unet/8_demo/info/calibration_images.npz" in downloads
        meta = sly.ProjectMeta.from_json(server.post("get_output_classes_and_tags").json())
        local = load_predictor(run, "cpu", "int8")  # the same quantization in this process
        for image_path in sorted((tiny_project / "ds_a" / "img").iterdir())[:3]:
            image = read_image_rgb(image_path)
            got = mask_of(server.infer(image_path.read_bytes(), image_path.name).json()["annotation"], meta)
            np.testing.assert_array_equal(got, local.masks([image])[0])
    finally:
        server.stop()
        team_files.shutdown()
