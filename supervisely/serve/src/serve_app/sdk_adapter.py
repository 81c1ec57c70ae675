"""How the serving app changes the SDK's inference server (``sly.nn.inference.SemanticSegmentation``): every
override of its methods and routes is here, written for and tested with supervisely 6.74.51.

- the upload routes (``/inference_image``, ``/inference_batch``, ``/inference_batch_async``) and
  ``/inference_image_url`` are replaced by versions with the same fields that decode images with the engine's
  decoder (size limit, clear errors);
- every inference route's state is checked (``validate_inference_state``); the id routes also check their image
  ids, and an id the platform does not have is a 404; a rectangle must lie inside each image before the SDK
  crops with it;
- the polling routes (``REQUEST_ROUTES``) need a known ``inference_request_uuid`` (else 400 / 404);
- results by image id carry ``image_name``, and a refused write of predictions fails the request;
- the SDK's sliding window (``inference_mode: sliding_window``) is advertised and done by the model's own
  blended tiles instead of the SDK's cutting (``_inference_batched``).
"""
from __future__ import annotations

import os
import warnings
from importlib.metadata import version
from typing import List

import supervisely as sly
from fastapi import FastAPI, Form, HTTPException, Request, Response, UploadFile
from fastapi.routing import APIRoute

from custom_net.preprocessing import ImageReadError, decode_image_rgb
from serve_app.checks import (InvalidSettings, JsonBodyGuard, NotFound, bad_request, check_image_ids,
                              check_rectangle_fits, check_state, download_url_image, not_found, parse_state)

SDK_VERSION = "6.74.51"  # the SDK these overrides were written for; another one is warned about at start
# The SDK's routes that look up an inference request by the uuid an _async route answered
REQUEST_ROUTES = ("/get_inference_progress", "/pop_inference_results", "/get_inference_result", "/stop_inference",
                  "/clear_inference_request", "/get_preparing_progress", "/get_inference_status")


def _post_endpoint(server: FastAPI, path: str):
    return next(r.endpoint for r in server.router.routes if isinstance(r, APIRoute) and r.path == path)


def _replace_post_route(server: FastAPI, path: str, endpoint) -> None:
    """Serve ``endpoint`` at ``path`` instead of the SDK's handler (the first matching route answers)."""
    server.add_api_route(path, endpoint, methods=["POST"])
    routes = server.router.routes
    ours = routes.pop()
    index = next(i for i, r in enumerate(routes) if isinstance(r, APIRoute) and r.path == path)
    routes[index] = ours


class SdkAdapter(sly.nn.inference.SemanticSegmentation):
    """The SDK's server with the overrides above. The subclass provides ``config`` (``on_platform``,
    ``max_pixels``) and ``classes``."""

    def __init__(self, **kwargs):
        if version("supervisely") != SDK_VERSION:
            warnings.warn(f"the serving app was written for supervisely {SDK_VERSION}, this is {version('supervisely')}: "
                          "its request checks and route overrides may not fit")
        super().__init__(**kwargs)

    @property
    def api(self) -> sly.Api | None:
        # Local use has no platform: the SDK then skips what needs one (autostart, task fields).
        if not self.config.on_platform and not os.environ.get("SERVER_ADDRESS"):
            return None
        return super().api

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
        """Every inference of the SDK's routes but the speed test (which calls ``predict_batch`` itself) comes
        here, the model taking batches. The parent's decorators crop to the rectangle and, for ``inference_mode:
        sliding_window``, would cut each image into windows predicted as separate images, whose labels overlap:
        the SDK's window step is switched off and the model's ``predict_batch`` reads the window settings
        (``serve_app.checks.SdkWindow``)."""
        check_rectangle_fits(settings, source)  # before the SDK's crop
        settings = {**settings, "sliding_window_mode": "none"}
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
            server.add_exception_handler(error, bad_request)
        server.add_exception_handler(NotFound, not_found)
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
