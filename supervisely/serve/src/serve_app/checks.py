"""Checks of the serving app's requests, in front of the SDK's code: a bad request is a 4xx with a message
naming what is wrong, never the SDK's 500.

- inference settings (``parse_settings``) and request states (``check_state``): settings (the SDK's sliding
  window among them, ``SdkWindow``), rectangle, batch size, upload mode; image ids (``check_image_ids``); an
  image URL (``download_url_image``);
- ``JsonBodyGuard``, an ASGI middleware that reads a JSON body whatever its declared type and refuses one the
  SDK's middleware cannot read (not an object, not JSON).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import requests
import supervisely as sly
from fastapi import Request
from fastapi.responses import JSONResponse

from custom_net.inference import INFERENCE_MODES
from custom_net.preprocessing import decode_image_rgb

DEFAULT_SETTINGS = {
    "mode": "whole",         # whole: resized to the training size; sliding: training-size tiles at full resolution
    "overlap": 0.25,         # sliding: fraction of a tile shared with its neighbour, in [0, 1)
    "tile_batch_size": 4,    # images (whole) or tiles (sliding) per forward pass
    # The SDK's names: listed so that its client (Session.update_inference_settings) may send them. The model
    # adds its "sliding_window_params" (windows of its training size) once loaded.
    "inference_mode": "full_image",
}
# Keys the SDK itself or the platform's apps put into settings; accepted, the rest is rejected.
SDK_SETTINGS = {"classes", "rectangle", "sliding_window_mode", "sliding_window_params", "existing_objects_iou_thresh"}
SDK_INFERENCE_MODES = ("full_image", "sliding_window")
# The SDK's sliding_window_params (supervisely.decorators.inference) and its SlidingWindowBorderStrategy values.
SDK_WINDOW_KEYS = ("windowHeight", "windowWidth", "overlapY", "overlapX", "borderStrategy")
SDK_BORDER_STRATEGIES = ("shift_window", "add_padding", "change_size")
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


class InvalidSettings(ValueError):
    """Inference settings or request state the service cannot honour; answered with 400."""


class NotFound(LookupError):
    """A request names an image the platform does not have (or does not show this token), or an inference
    request this server does not know; answered with 404."""


@dataclass(frozen=True)
class SdkWindow:
    """The SDK's sliding window (``inference_mode: sliding_window``) in pixels; a size left out is the image's,
    as in the SDK. Our blended sliding window reproduces it: the image is scaled so that a window becomes one
    model tile, and the overlap becomes a fraction of the window."""
    height: int | None
    width: int | None
    overlap_y: int = 0
    overlap_x: int = 0

    def on_image(self, height: int, width: int, tile_height: int, tile_width: int,
                 max_pixels: int) -> tuple[int, int, float]:
        """The size to scale an image to, and our overlap fraction: the larger of the two axes' (the SDK's
        overlaps are minimums, and our tiles share one fraction)."""
        window_h, window_w = self.height or height, self.width or width
        for key, overlap, size, dimension in (("overlapY", self.overlap_y, window_h, "height"),
                                              ("overlapX", self.overlap_x, window_w, "width")):
            if overlap >= size:  # only a size left out gets here: a given one was checked with the request
                raise InvalidSettings(f"sliding_window_params.{key} ({overlap}) must be less than the window's "
                                      f"{dimension}, here the image's ({size}) as none is given")
        scaled_h = max(1, round(height * tile_height / window_h))
        scaled_w = max(1, round(width * tile_width / window_w))
        if scaled_h * scaled_w > max_pixels:  # a small window on a large image: the model would see a huge one
            raise InvalidSettings(f"sliding_window_params: {window_w}x{window_h} windows predicted at the model's "
                                  f"{tile_width}x{tile_height} scale this {width}x{height} image to "
                                  f"{scaled_w}x{scaled_h} pixels, more than the limit of {max_pixels}; "
                                  "use larger windows")
        return scaled_h, scaled_w, max(self.overlap_y / window_h, self.overlap_x / window_w)


@dataclass(frozen=True)
class InferenceSettings:
    mode: str
    overlap: float
    tile_batch_size: int
    window: SdkWindow | None = None  # the SDK's sliding window, which then replaces mode and overlap


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json(value: Any) -> str:
    return json.dumps(value)[:80]


def parse_sdk_window(settings: Dict[str, Any]) -> SdkWindow | None:
    """The SDK's ``inference_mode`` and ``sliding_window_params`` checked: None for the whole image."""
    inference_mode = settings.get("inference_mode", "full_image")
    if inference_mode not in SDK_INFERENCE_MODES:
        raise InvalidSettings(f"inference_mode must be one of {', '.join(SDK_INFERENCE_MODES)}, "
                              f"got {_json(inference_mode)}")
    if inference_mode == "full_image":
        return None
    params = settings.get("sliding_window_params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise InvalidSettings(f"sliding_window_params must be a JSON object, got {_json(params)}")
    unknown = sorted(set(params) - set(SDK_WINDOW_KEYS))
    if unknown:
        raise InvalidSettings(f"unknown key(s) {', '.join(map(repr, unknown))} in sliding_window_params; "
                              f"valid keys: {', '.join(SDK_WINDOW_KEYS)}")
    for key in ("windowHeight", "windowWidth"):
        if key in params and not (_is_int(params[key]) and params[key] >= 1):
            raise InvalidSettings(f"sliding_window_params.{key} must be a positive integer (pixels), "
                                  f"got {_json(params[key])}")
    for key, size_key in (("overlapY", "windowHeight"), ("overlapX", "windowWidth")):
        overlap = params.get(key, 0)
        if not (_is_int(overlap) and overlap >= 0):
            raise InvalidSettings(f"sliding_window_params.{key} must be a non-negative integer (pixels), "
                                  f"got {_json(overlap)}")
        if size_key in params and overlap >= params[size_key]:
            raise InvalidSettings(f"sliding_window_params.{key} ({overlap}) must be less than "
                                  f"sliding_window_params.{size_key} ({params[size_key]})")
    strategy = params.get("borderStrategy", "shift_window")
    if strategy not in SDK_BORDER_STRATEGIES:
        raise InvalidSettings(f"sliding_window_params.borderStrategy must be one of "
                              f"{', '.join(SDK_BORDER_STRATEGIES)}, got {_json(strategy)}")
    return SdkWindow(params.get("windowHeight"), params.get("windowWidth"), params.get("overlapY", 0),
                     params.get("overlapX", 0))


def parse_settings(settings: Dict[str, Any], class_names: List[str] | None = None) -> InferenceSettings:
    """Validate settings (the defaults merged with the request's); the message lists what is accepted.
    With ``class_names`` (the model's), the ``classes`` to answer must be among them."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS) - SDK_SETTINGS - CLIENT_SETTINGS)
    if unknown:
        raise InvalidSettings(f"unknown inference setting(s) {', '.join(map(repr, unknown))}; "
                              f"valid settings: {', '.join(DEFAULT_SETTINGS)}")
    window = parse_sdk_window(settings)
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
    return InferenceSettings(mode, float(overlap), tile_batch, window)


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


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, "message": message, "success": False})


def bad_request(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc))


def not_found(request: Request, exc: Exception) -> JSONResponse:
    return error_response(404, str(exc))


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
                return await error_response(413, problem)(scope, receive, send)
        body = b"".join(chunks) or b"{}"
        problem = _json_body_problem(body)
        if problem is not None:
            if b"application/json" not in content_type:
                problem = ("the request body must be a JSON object (Content-Type: application/json), "
                           "or multipart/form-data for the upload routes")
                return await error_response(415, problem)(scope, receive, send)
            return await error_response(400, problem)(scope, receive, send)
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
