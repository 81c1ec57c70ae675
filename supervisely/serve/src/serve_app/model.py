"""The UNet inference service: the engine's ``Predictor`` behind the SDK's server (with this app's request
checks and overrides, ``serve_app.sdk_adapter``)."""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

import numpy as np
import supervisely as sly
import torch
from supervisely.nn.inference.inference import get_hardware_info
from supervisely.nn.utils import CheckpointInfo, ModelPrecision

from custom_net.inference import (INFERENCE_MODES, StageTimes, convert_prediction_to_sly_format, predict_image,
                                  resize_probabilities)
from custom_net.predict import Predictor, load_predictor
from custom_net.preprocessing import read_image_rgb, resize_image
from custom_net.run_folder import RunFolder
from custom_net.sly_integration import workflow_supported
from serve_app.checks import DEFAULT_SETTINGS, InferenceSettings, parse_settings
from serve_app.sdk_adapter import SdkAdapter

SDK_PRECISIONS = {"float32": ModelPrecision.FP32, "float16": ModelPrecision.FP16, "int8": ModelPrecision.INT8,
                  "bfloat16": "BF16"}  # (the SDK names no bfloat16)


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


class UNetModel(SdkAdapter):
    def __init__(self, config: DeployConfig):
        self.config = config
        self.predictor: Predictor | None = None
        self.default_settings = dict(DEFAULT_SETTINGS)  # what /get_custom_inference_settings answers
        # "basic": the SDK's sliding window is advertised (get_info's "sliding_window_support") and accepted;
        # our blended tiles compute it (predict_batch), not the SDK's cutting (see SdkAdapter._inference_batched).
        super().__init__(model_dir=config.model_dir, custom_inference_settings=self.default_settings,
                         sliding_window_mode="basic", use_gui=False)

    def _record_workflow_input(self) -> None:
        """The served Team Files checkpoint as this session's workflow input, as the original Serve UNet records it."""
        if not workflow_supported(self.api):
            return
        node = sly.WorkflowMeta(node_settings=sly.WorkflowSettings(title="Serve Custom Model"))
        self.api.app.workflow.add_input_file(self.config.checkpoint, model_weight=True, meta=node,
                                             task_id=sly.env.task_id(raise_not_found=False))

    def load_on_device(self, model_dir: str, device: str = "auto") -> None:
        checkpoint = self.config.checkpoint
        if self.config.on_platform:
            checkpoint = download_run_files(self.api, sly.env.team_id(), checkpoint, Path(model_dir) / "run")
            self._record_workflow_input()
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
        # The SDK's sliding window by default = our "sliding" by default: windows of the training size, overlap 0.25.
        self.default_settings["sliding_window_params"] = {
            "windowHeight": trained.input_height, "windowWidth": trained.input_width,
            "overlapY": round(trained.input_height * DEFAULT_SETTINGS["overlap"]),
            "overlapX": round(trained.input_width * DEFAULT_SETTINGS["overlap"]), "borderStrategy": "shift_window"}

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
        if options.window is None:
            masks = self.predictor.masks(list(images_np), options.mode, options.overlap, options.tile_batch_size, times)
        else:
            stage = nullcontext() if times is None else times.stage("inference", self.predictor.device)
            with stage:  # all of it "inference", as the engine times its own sliding window
                masks = [self._mask_in_sdk_windows(image, options) for image in images_np]
        return [[sly.nn.PredictionSegmentation(mask)] for mask in masks]

    def _mask_in_sdk_windows(self, image: np.ndarray, options: InferenceSettings) -> np.ndarray:
        """The SDK's sliding window computed by ours: the image scaled so that a window is one model tile (none
        when the window is the training size), tiles blended, probabilities scaled back as in ``whole``."""
        trained, predictor = self.predictor.trained, self.predictor
        height, width = image.shape[:2]
        scaled_h, scaled_w, overlap = options.window.on_image(height, width, trained.input_height,
                                                               trained.input_width, self.config.max_pixels)
        probs = predict_image(predictor.net, resize_image(image, scaled_h, scaled_w), trained.input_height,
                              trained.input_width, predictor.device, predictor.amp_dtype, "sliding", overlap,
                              options.tile_batch_size)
        probs = resize_probabilities(probs, height, width) if (scaled_h, scaled_w) != (height, width) else probs
        return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()

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
