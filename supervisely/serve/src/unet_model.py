"""The UNet inference service: ``sly.nn.inference.SemanticSegmentation`` over the engine's ``Predictor``.

Requests go through the SDK's routes and request manager, with the checks the SDK lacks, so that a bad
request is a 4xx with a message instead of a 500:
- the upload routes (``/inference_image``, ``/inference_batch``, ``/inference_batch_async``) and
  ``/inference_image_url`` are replaced by versions with the same fields that decode the image with the
  engine's decoder (size limit, clear errors);
- every inference route's state is checked (``validate_inference_state``): settings, rectangle, batch size;
  the id routes also check their image ids, and an id the platform does not have is a 404;
- a rectangle that does not lie inside an image is refused before the SDK crops with it;
- the polling routes (``REQUEST_ROUTES``) need a known ``inference_request_uuid`` (else 400 / 404);
- ``JsonBodyGuard`` reads a JSON body whatever its declared type and refuses one the SDK's middleware
  cannot read (not an object, not JSON).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

import numpy as np
import requests
import supervisely as sly
from fastapi import FastAPI, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from supervisely.nn.inference.inference import get_hardware_info
from supervisely.nn.utils import CheckpointInfo, ModelPrecision

from custom_net.inference import INFERENCE_MODES, StageTimes, convert_prediction_to_sly_format
from custom_net.predict import Predictor, load_predictor
from custom_net.preprocessing import ImageReadError, decode_image_rgb, read_image_rgb
from custom_net.run_folder import RunFolder

DEFAULT_SETTINGS = {
    "mode": "whole",         # whole: resized to the training size; sliding: training-size tiles at full resolution
    "overlap": 0.25,         # sliding: fraction of a tile shared with its neighbour, in [0, 1)
    "tile_batch_size": 4,    # images (whole) or tiles (sliding) per forward pass
}
# Keys the SDK itself or the platform's apps put into settings; accepted, the rest is rejected.
SDK_SETTINGS = {"classes", "rectangle", "sliding_window_mode", "inference_mode", "sliding_window_params",
                "existing_objects_iou_thresh"}
# The SDK's client (ModelAPI.predict, PredictionSession) copies each of its scalar arguments into settings,
# even those that only steer the client, go to the request state (video frames) or have no meaning for
# semantic segmentation: accepted and ignored.
CLIENT_SETTINGS = {"show_progress", "recursive", "batch_size", "conf", "img_size", "upload_mode", "tracking",
                   "output_project_id", "model_prediction_suffix", "iou_merge_threshold", "cache_project_on_model",
                   "start_frame", "start_frame_index", "num_frames", "frames_count", "end_frame", "stride", "step",
                   "duration", "direction"}
STATE_KEYS = {"settings", "batch_size", "rectangle", "model_prediction_suffix"}
UPLOAD_MODES = ("append", "replace", "iou_merge", "create")  # writing predictions to the platform (the SDK's)
IMAGE_ID_KEYS = ("batch_ids", "image_ids", "images_ids", "imageIds", "image_id", "imageId")  # the SDK's, in its order
MAX_URL_IMAGE_BYTES = 512 * 1024 * 1024
MAX_TILE_BATCH = 256
SDK_PRECISIONS = {"float32": ModelPrecision.FP32, "float16": ModelPrecision.FP16, "int8": ModelPrecision.INT8,
                  "bfloat16": "BF16"}  # (the SDK names no bfloat16)
# The SDK's routes that look up an inference request by the uuid an _async route answered
REQUEST_ROUTES = ("/get_inference_progress", "/pop_inference_results", "/get_inference_result", "/stop_inference",
                  "/clear_inference_request", "/get_preparing_progress", "/get_inference_status")


class InvalidSettings(ValueError):
    """Inference settings or request state the service cannot honour; answered with 400."""


class NotFound(LookupError):
    """A request names an image the platform does not have (or does not show this token), or an inference
    request this server does not know; answered with 404."""


@dataclass(frozen=True)
class InferenceSettings:
    mode: str
    overlap: float
    tile_batch_size: int


def parse_settings(settings: Dict[str, Any], class_names: List[str] | None = None) -> InferenceSettings:
    """Validate settings (the defaults merged with the request's); the message lists what is accepted.
    With ``class_names`` (the model's), the ``classes`` to answer must be among them."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS) - SDK_SETTINGS - CLIENT_SETTINGS)
    if unknown:
        raise InvalidSettings(f"unknown inference setting(s) {', '.join(map(repr, unknown))}; "
                              f"valid settings: {', '.join(DEFAULT_SETTINGS)}")
    if settings.get("inference_mode", "full_image") != "full_image":
        raise InvalidSettings(f"inference_mode {settings['inference_mode']!r} is not supported; "
                              "for sliding window use the setting \"mode\": \"sliding\"")
    mode = settings.get("mode", DEFAULT_SETTINGS["mode"])
    if mode not in INFERENCE_MODES:
        raise InvalidSettings(f"mode must be one of {', '.join(INFERENCE_MODES)}, got {mode!r}")
    overlap = settings.get("overlap", DEFAULT_SETTINGS["overlap"])
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise InvalidSettings(f"overlap must be a number in [0, 1), got {overlap!r}")
    tile_batch = settings.get("tile_batch_size", DEFAULT_SETTINGS["tile_batch_size"])
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or not 1 <= tile_batch <= MAX_TILE_BATCH:
        raise InvalidSettings(f"tile_batch_size must be an integer from 1 to {MAX_TILE_BATCH}, got {tile_batch!r}")
    classes = settings.get("classes")
    if classes not in (None, "all") and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise InvalidSettings(f"classes must be \"all\" or a list of class names, got {json.dumps(classes)[:80]}")
    iou = settings.get("existing_objects_iou_thresh")
    if iou is not None and (isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0 <= iou <= 1):
        raise InvalidSettings(f"existing_objects_iou_thresh must be a number in [0, 1], got {json.dumps(iou)[:80]}")
    unknown = sorted(set(classes) - set(class_names)) if isinstance(classes, list) and class_names is not None else []
    if unknown:
        raise InvalidSettings(f"unknown class(es) {', '.join(map(repr, unknown))} in \"classes\"; "
                              f"the model predicts {', '.join(class_names)}")
    return InferenceSettings(mode, float(overlap), tile_batch)


def _without_null_rectangle(fields: dict, where: str) -> dict:
    """``fields`` without a null ``rectangle`` (no crop); any other rectangle must be one the SDK can crop with."""
    if "rectangle" not in fields:
        return fields
    rectangle = fields["rectangle"]
    if rectangle is None:
        return {k: v for k, v in fields.items() if k != "rectangle"}
    try:
        sly.Rectangle.from_json(rectangle)
    except Exception:  # the SDK's parser raises anything from KeyError to TypeError on malformed JSON
        raise InvalidSettings(f"{where}rectangle must be null or a Supervisely rectangle "
                              "{\"points\": {\"exterior\": [[left, top], [right, bottom]], \"interior\": []}}, "
                              f"got {json.dumps(rectangle)[:80]}") from None
    return fields


def check_rectangle_fits(settings: dict, images: list) -> None:
    """The SDK crops every image to the settings' rectangle and fails on one that does not lie inside an image."""
    if settings.get("rectangle") is None:
        return
    rect = sly.Rectangle.from_json(settings["rectangle"])
    for image in images:
        if not sly.Rectangle.from_array(image).contains(rect):
            raise InvalidSettings(f"rectangle (left {rect.left}, top {rect.top}, right {rect.right}, bottom {rect.bottom}) "
                                  f"does not lie inside a {image.shape[1]}x{image.shape[0]} image of the request")


def check_state(state: dict, class_names: List[str] | None = None) -> dict:
    """A request state's inference fields checked (settings, rectangle, batch_size); returned with a null
    rectangle left out and null settings as {}, which is what the SDK's code expects."""
    state = _without_null_rectangle(state, "")
    settings = {} if state.get("settings") is None else state["settings"]
    if not isinstance(settings, dict):
        raise InvalidSettings(f"\"settings\" must be a JSON object, got {json.dumps(settings)[:80]}")
    settings = _without_null_rectangle(settings, "settings.")
    parse_settings({**DEFAULT_SETTINGS, **settings}, class_names)
    for key in ("batch_size", "output_project_id"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidSettings(f"{key} must be a positive integer, got {json.dumps(value)[:80]}")
    # The SDK replaces an image's own labels for any upload_mode it does not know: a typo would erase them.
    if state.get("upload_mode") not in (None, *UPLOAD_MODES):
        raise InvalidSettings(f"upload_mode must be one of {', '.join(UPLOAD_MODES)}, "
                              f"got {json.dumps(state['upload_mode'])[:80]}")
    return {**state, "settings": settings}


def parse_state(text: str, class_names: List[str] | None = None) -> dict:
    """The form field ``settings`` (or ``state``) of an upload: ``{"settings": {...}, "batch_size": N}``."""
    try:
        state = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise InvalidSettings(f"settings is not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise InvalidSettings(f"settings must be a JSON object, got {type(state).__name__}")
    unknown = sorted(set(state) - STATE_KEYS)
    if unknown:
        raise InvalidSettings(f"unknown request key(s) {', '.join(map(repr, unknown))}; accepted: "
                              f"{', '.join(sorted(STATE_KEYS))} (inference settings go inside \"settings\")")
    return check_state(state, class_names)


@dataclass(frozen=True)
class DeployConfig:
    """What to serve and how. On the platform the modal's state arrives as ``modal.state.*`` variables."""
    checkpoint: str          # a Team Files path (platform) or a local .pth / run folder
    on_platform: bool
    device: str = "auto"
    runtime: str = "pytorch"
    amp: str = "auto"
    max_pixels: int = 50_000_000
    model_dir: str = ""

    @classmethod
    def from_env(cls, env=os.environ) -> "DeployConfig":
        remote = env.get("modal.state.slyFile")
        local = env.get("UNET_CHECKPOINT")
        if not remote and not local:
            raise ValueError("nothing to serve: set UNET_CHECKPOINT to a run folder or a .pth (local use), "
                             "or open the app on a checkpoint in Team Files (modal.state.slyFile)")
        model_dir = env.get("UNET_MODEL_DIR") or os.path.join(env.get("SLY_APP_DATA_DIR", "/tmp/unet_serve"), "models")
        try:
            max_pixels = int(env.get("UNET_MAX_PIXELS", cls.max_pixels))
        except ValueError:
            raise ValueError(f"UNET_MAX_PIXELS must be an integer, got {env['UNET_MAX_PIXELS']!r}") from None
        return cls(checkpoint=remote or local, on_platform=bool(remote),
                   device=env.get("modal.state.device") or env.get("UNET_DEVICE", "auto"),
                   runtime=env.get("modal.state.runtime") or env.get("UNET_RUNTIME", "pytorch"),
                   amp=env.get("UNET_AMP", "auto"), max_pixels=max_pixels, model_dir=model_dir)


def download_run_files(api: sly.Api, team_id: int, remote_checkpoint: str, local_dir: Path) -> Path:
    """Copy a Team Files checkpoint and what serving reads of its run (ui_state, model classes, calibration
    images if any) into ``local_dir``, keeping the run's layout that ``load_trained_model`` reads."""
    remote = PurePosixPath(remote_checkpoint)
    run, local = RunFolder.of_checkpoint(remote), RunFolder(local_dir)
    files = {remote: local.checkpoints / remote.name, run.ui_state: local.ui_state, run.model_classes: local.model_classes}
    for remote_path, local_path in files.items():
        if not api.file.exists(team_id, str(remote_path)):
            raise FileNotFoundError(f"Team Files (team {team_id}): {remote_path} not found; a checkpoint must sit in "
                                    "<run>/checkpoints/ beside <run>/info/ as the training app uploads it")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        api.file.download(team_id, str(remote_path), str(local_path))
    if api.file.exists(team_id, str(run.calibration)):  # optional: only int8 reads it, and older runs lack it
        api.file.download(team_id, str(run.calibration), str(local.calibration))
    return files[remote]


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, "message": message, "success": False})


def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(400, str(exc))


def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(404, str(exc))


def check_image_ids(state: dict) -> None:
    """The image ids of an id route's state: one id or a non-empty list of them, under one of the SDK's keys."""
    key = next((k for k in IMAGE_ID_KEYS if k in state), None)  # the SDK reads the first one present, even a null
    if key is None or state[key] is None:
        raise InvalidSettings("no image ids in the request state: give \"image_id\" (one) or \"batch_ids\" (a list)"
                              + (f"; \"{key}\" is null" if key else ""))
    ids = state[key] if isinstance(state[key], list) else [state[key]]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise InvalidSettings(f"\"{key}\" must be a positive integer image id or a non-empty list of them, "
                              f"got {json.dumps(state[key])[:80]}")


def download_url_image(url: Any, max_pixels: int) -> np.ndarray:
    """The image at ``url`` (http or https), decoded like an upload; anything that goes wrong is a 400."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise InvalidSettings(f"\"image_url\" must be an http(s) URL, got {json.dumps(url)[:80]}")
    chunks, size = [], 0
    try:
        with requests.get(url, stream=True, timeout=(10, 60)) as response:
            response.raise_for_status()
            for chunk in response.iter_content(1024 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_URL_IMAGE_BYTES:
                    raise InvalidSettings(f"image_url {url}: larger than {MAX_URL_IMAGE_BYTES} bytes")
    except requests.RequestException as e:
        raise InvalidSettings(f"image_url {url}: cannot download ({e})") from None
    return decode_image_rgb(b"".join(chunks), url, max_pixels)


MAX_JSON_BODY = 16 * 1024 * 1024  # a JSON request (ids, urls, settings) is small; uploads are multipart


def _json_body_problem(body: bytes) -> str | None:
    """Why a JSON request body cannot be served, or None. The SDK's middleware reads "context" and "state"
    from every JSON body and fails with a 500 on anything but an object (an empty body, ``[]``, bad UTF-8)."""
    try:
        content = json.loads(body)
    except (ValueError, RecursionError) as e:
        return f"request body is not valid JSON ({e})"
    if not isinstance(content, dict):
        return f"request body must be a JSON object, got {type(content).__name__}"
    for key in ("context", "state"):
        if content.get(key) is not None and not isinstance(content[key], dict):
            return f"\"{key}\" must be a JSON object, got {type(content[key]).__name__}"
    for where, key in ((content, "api_token"), (content, "server_address"), (content.get("context") or {}, "apiToken")):
        if where.get(key) is not None and not isinstance(where[key], str):  # the SDK builds an Api from them
            return f"\"{key}\" must be a string, got {type(where[key]).__name__}"
    return None


class JsonBodyGuard:
    """ASGI middleware in front of the SDK's, for every POST but multipart uploads. The SDK reads a request's
    "state" only from a body declared as JSON and answers 500 to anything it cannot read; here a body that is
    JSON is read as JSON whatever its declared type (``curl -d`` sends it as a form), an empty one as ``{}``,
    and any other gets a 4xx with a message."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"")
        if content_type.startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_JSON_BODY:
                problem = f"JSON request body larger than {MAX_JSON_BODY} bytes"
                return await _error_response(413, problem)(scope, receive, send)
        body = b"".join(chunks) or b"{}"
        problem = _json_body_problem(body)
        if problem is not None:
            if b"application/json" not in content_type:
                problem = ("the request body must be a JSON object (Content-Type: application/json), "
                           "or multipart/form-data for the upload routes")
                return await _error_response(415, problem)(scope, receive, send)
            return await _error_response(400, problem)(scope, receive, send)
        headers[b"content-length"] = str(len(body)).encode()
        if b"application/json" not in content_type:
            headers[b"content-type"] = b"application/json"
        scope = {**scope, "headers": list(headers.items())}
        replayed = False

        async def replay():  # the body once, then whatever the connection says next
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _post_endpoint(server: FastAPI, path: str):
    return next(r.endpoint for r in server.router.routes if isinstance(r, APIRoute) and r.path == path)


def _replace_post_route(server: FastAPI, path: str, endpoint) -> None:
    """Serve ``endpoint`` at ``path`` instead of the SDK's handler (the first matching route answers)."""
    server.add_api_route(path, endpoint, methods=["POST"])
    routes = server.router.routes
    ours = routes.pop()
    index = next(i for i, r in enumerate(routes) if isinstance(r, APIRoute) and r.path == path)
    routes[index] = ours


class UNetModel(sly.nn.inference.SemanticSegmentation):
    def __init__(self, config: DeployConfig):
        self.config = config
        self.predictor: Predictor | None = None
        # The SDK's own sliding window cuts images into separate predictions; ours blends tiles ("mode": "sliding").
        super().__init__(model_dir=config.model_dir, custom_inference_settings=dict(DEFAULT_SETTINGS),
                         sliding_window_mode="none", use_gui=False)

    @property
    def api(self) -> sly.Api | None:
        # Local use has no platform: the SDK then skips what needs one (autostart, task fields).
        if not self.config.on_platform and not os.environ.get("SERVER_ADDRESS"):
            return None
        return super().api

    def load_on_device(self, model_dir: str, device: str = "auto") -> None:
        checkpoint = self.config.checkpoint
        if self.config.on_platform:
            checkpoint = download_run_files(self.api, sly.env.team_id(), checkpoint, Path(model_dir) / "run")
        self.predictor = load_predictor(checkpoint, device, self.config.runtime, self.config.amp,
                                        onnx_path=Path(model_dir) / "model.onnx")
        self.device = str(self.predictor.device)
        self.runtime = self.config.runtime
        classes = self.predictor.model_classes
        self.classes = [c.name for c in classes]
        # The run's own colours, every class a Bitmap (what a prediction is, whatever shape it was labelled with).
        self._model_meta = sly.ProjectMeta([c.clone(geometry_type=sly.Bitmap) for c in classes])
        self._get_confidence_tag_meta()
        # What the SDK's /get_deploy_info reports. (Its deploy params stay unset: with them, the SDK would
        # reload the model through its own loader when it idles on a GPU.)
        trained = self.predictor.trained
        self.checkpoint_info = CheckpointInfo(
            checkpoint_name=trained.checkpoint.name, model_name=trained.model_name, architecture="UNet",
            custom_checkpoint_path=self.config.checkpoint if self.config.on_platform else None,
            model_source="Custom models")
        self.model_precision = SDK_PRECISIONS.get(self.predictor.precision, self.predictor.precision)
        self._hardware = get_hardware_info(self.device)

    def get_classes(self) -> List[str]:
        return self.classes

    def get_info(self) -> dict:
        info = super().get_info()
        trained = self.predictor.trained
        info.update({
            "model_name": trained.model_name,
            "checkpoint_name": trained.checkpoint.name,
            "pretrained_on_dataset": "custom",
            "device": self.device,
            "runtime": self.runtime,
            "amp": str(self.predictor.amp_dtype).replace("torch.", "") if self.predictor.amp_dtype else "off",
            "precision": self.predictor.precision,
            "input_size": {"height": trained.input_height, "width": trained.input_width},
            "inference_modes": list(INFERENCE_MODES),
            "max_image_pixels": self.config.max_pixels,
        })
        return info

    def predict(self, image_path: str, settings: Dict[str, Any]) -> List[sly.nn.PredictionSegmentation]:
        return self.predict_batch([read_image_rgb(image_path)], settings)[0]

    def predict_batch(self, images_np: List, settings: Dict[str, Any],
                      times: StageTimes | None = None) -> List[List[sly.nn.PredictionSegmentation]]:
        options = parse_settings(settings, self.classes)
        masks = self.predictor.masks(list(images_np), options.mode, options.overlap, options.tile_batch_size, times)
        return [[sly.nn.PredictionSegmentation(mask)] for mask in masks]

    def predict_benchmark(self, images_np: List, settings: Dict[str, Any]):
        """Predictions and the milliseconds of preprocess, inference and postprocess (the platform's speed test;
        only it pays for the timing, which on a GPU waits for the device after each stage)."""
        times = StageTimes()
        return self.predict_batch(images_np, settings, times), times

    def _create_label(self, dto: sly.nn.PredictionSegmentation, classes_whitelist=None) -> List[sly.Label]:
        # The engine's conversion (``__bg__`` left out), so the service and custom_net/predict.py agree.
        labels = convert_prediction_to_sly_format(dto.mask, self.predictor.model_classes).labels
        if classes_whitelist in (None, "all"):
            return labels
        return [label for label in labels if label.obj_class.name in classes_whitelist]

    def validate_inference_state(self, state, log_error=True):
        """Every inference route of the SDK calls this first. A JSON route then goes on with this same dict,
        so the checked state (no null rectangle, settings a dict) replaces its content."""
        if state is None:
            raise InvalidSettings("the request needs a JSON body with a \"state\" object, "
                                  "e.g. {\"state\": {\"image_id\": 1, \"settings\": {}}}")
        if isinstance(state, dict):
            checked = check_state(state, self.classes)
            state.clear()
            state.update(checked)
        super().validate_inference_state(state, log_error)

    def api_from_request(self, request) -> sly.Api:
        api = super().api_from_request(request)
        if api is None:  # served locally, and the request brings no platform of its own
            raise InvalidSettings("image ids need a Supervisely platform: serve the app on one (SERVER_ADDRESS and "
                                  "API_TOKEN), or send \"server_address\" and \"api_token\" in the request body")
        return api

    def _inference_image_ids(self, api, state, inference_request):
        check_image_ids(state)
        try:
            return super()._inference_image_ids(api, state, inference_request)
        except KeyError as e:  # how the SDK says the platform has no such image
            if "Image (id:" in str(e):
                raise NotFound(e.args[0]) from None
            raise

    def _inference_batched(self, source, settings, data_to_return):
        check_rectangle_fits(settings, source)  # before the SDK's crop (a decorator of the parent's method)
        return super()._inference_batched(source=source, settings=settings, data_to_return=data_to_return)

    def _format_output(self, predictions) -> List[dict]:
        """Results as the SDK writes them, with ``image_name`` (the image's name) where it has only ``name``:
        the SDK's client ``Session.inference_image_ids_async`` reads ``image_name``, which the SDK's own
        image-id route leaves out, so that client failed on every result."""
        results = super()._format_output(predictions)
        for result in results:
            if result.get("image_id") is not None:
                result.setdefault("image_name", result.get("name"))
        return results

    def upload_predictions(self, predictions, api, upload_mode, *args, **kwargs):
        """Writing predictions to the platform (``upload_mode``, ``output_project_id``). The SDK runs this in a
        worker thread and drops an error raised after the last batch was handed over: the client then saw a
        finished request with no results. The request records the error, so the client gets it."""
        try:
            return super().upload_predictions(predictions, api, upload_mode, *args, **kwargs)
        except Exception as e:
            request = kwargs.get("inference_request")
            if request is not None and request.exception is None:
                request.exception = RuntimeError(f"writing the predictions to the platform failed: {e} "
                                                 "(images written before it keep their new labels)")
            raise

    def _decode_uploads(self, files: List[UploadFile]) -> list:
        images = []
        for number, upload in enumerate(files, 1):
            name = upload.filename or f"file {number}"
            images.append(decode_image_rgb(upload.file.read(), name, self.config.max_pixels))
        return images

    def serve(self) -> None:
        super().serve()
        server = self._app.get_server()
        for error in (InvalidSettings, ImageReadError):
            server.add_exception_handler(error, _bad_request)
        server.add_exception_handler(NotFound, _not_found)
        server.add_middleware(JsonBodyGuard)  # outermost: runs before the SDK's middleware

        def upload_state(settings: str, state: str) -> dict:
            return parse_state(settings if state in ("", "{}") else state, self.classes)  # the SDK's rule: "state" wins

        def inference_image(files: List[UploadFile], settings: str = Form("{}"), state: str = Form("{}")):
            request_state = upload_state(settings, state)
            if len(files) != 1:
                raise HTTPException(status_code=400, detail=f"Only one file expected but got {len(files)}")
            images = self._decode_uploads(files)
            results = self.inference_requests_manager.run(self._inference_images, images, request_state)
            return self._get_single_inference_result(results)

        def inference_batch(files: List[UploadFile], settings: str = Form("{}"), state: str = Form("{}")):
            request_state = upload_state(settings, state)
            return self.inference_requests_manager.run(self._inference_images, self._decode_uploads(files),
                                                       request_state)

        def inference_batch_async(files: List[UploadFile], settings: str = Form("{}"), state: str = Form("{}")):
            request_state = upload_state(settings, state)
            inference_request, _ = self.inference_requests_manager.schedule_task(
                self._inference_images, self._decode_uploads(files), request_state)
            return {"message": "Scheduled inference task.", "inference_request_uuid": inference_request.uuid}

        def inference_image_url(request: Request):
            state = getattr(request.state, "state", None)  # unset when the body was not JSON
            self.validate_inference_state(state)
            image = download_url_image(state.get("image_url"), self.config.max_pixels)
            results = self.inference_requests_manager.run(self._inference_images, [image], state)
            return self._get_single_inference_result(results)

        for path, endpoint in (("/inference_image", inference_image), ("/inference_batch", inference_batch),
                               ("/inference_batch_async", inference_batch_async),
                               ("/inference_image_url", inference_image_url)):
            _replace_post_route(server, path, endpoint)
        for path in REQUEST_ROUTES:
            _replace_post_route(server, path, self._checking_request_uuid(_post_endpoint(server, path)))

    def _checking_request_uuid(self, sdk_endpoint):
        """``sdk_endpoint`` (one of REQUEST_ROUTES), called only for a request state that names a known
        inference request: the SDK's code answers 500 to a missing or unknown uuid."""
        def endpoint(response: Response, request: Request):
            state = getattr(request.state, "state", None)
            uuid = state.get("inference_request_uuid") if isinstance(state, dict) else None
            if not isinstance(uuid, str):
                raise InvalidSettings("the request state needs \"inference_request_uuid\": the string that an "
                                      "_async inference route answered")
            if uuid not in self._inference_requests:  # the SDK keeps old-style requests here, the rest in its manager
                try:
                    self.inference_requests_manager.get(uuid)
                except RuntimeError:
                    raise NotFound(f"no inference request {uuid} on this server (finished ones are "
                                   "kept for a while, then removed)") from None
            return sdk_endpoint(response=response, request=request)
        return endpoint
