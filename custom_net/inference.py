"""Loading a trained run, prediction (whole image or sliding window) and conversion to Supervisely annotations."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import supervisely as sly
import torch
import torch.nn.functional as F

from custom_net.hardware import synchronize
from custom_net.model import build_model, fold_batchnorm
from custom_net.preprocessing import normalize_batch, resize_image
from custom_net.run_folder import RunFolder

INFERENCE_MODES = ("whole", "sliding")


@dataclass
class TrainedModel:
    """A checkpoint with what its run folder says about it: everything needed to predict."""
    model: torch.nn.Module
    model_name: str
    model_classes: list[sly.ObjClass]
    input_height: int
    input_width: int
    checkpoint: Path


def load_trained_model(checkpoint: str | Path, device=torch.device("cpu"), fold_bn: bool = True) -> TrainedModel:
    """Build the architecture named in the run folder and load the plain state dict strictly.

    Works for this project's runs and the original app's (same tree, same state-dict layout).
    The model is for inference: in eval mode and, with ``fold_bn``, with its BatchNorm layers merged
    into the convolutions before them (``fold_batchnorm``).
    """
    folder = RunFolder.of_checkpoint(checkpoint)
    try:
        ui_state, model_classes = folder.read_ui_state(), folder.read_model_classes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{checkpoint}: {e}") from None
    model = build_model(ui_state["selectedModel"], len(model_classes), "none")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise ValueError(f"{checkpoint}: cannot load into {ui_state['selectedModel']} "
                         f"with {len(model_classes)} classes ({e})") from None
    model.to(device).eval()
    if fold_bn:
        model = fold_batchnorm(model)
    size = ui_state["imgSize"]
    return TrainedModel(model, ui_state["selectedModel"], model_classes, int(size["height"]), int(size["width"]),
                        Path(checkpoint))


def _uses_channels_last(device, amp_dtype) -> bool:
    """Where the fast path runs channels_last: on the CPU (oneDNN), and on a GPU with mixed precision."""
    return device.type == "cpu" or amp_dtype is not None


def prepare_fast_model(model: torch.nn.Module, device, amp_dtype=None) -> torch.nn.Module:
    """The serving form of a loaded model, converted in place: channels_last on the CPU or with mixed
    precision, and its weights stored in ``amp_dtype`` once (autocast would cast every weight again on
    every call)."""
    if _uses_channels_last(device, amp_dtype):
        model.to(memory_format=torch.channels_last)  # matches the channels_last inputs of predict_probabilities
    if amp_dtype is not None:
        model.to(amp_dtype)
    return model


@torch.inference_mode()
def predict_probabilities(model, images: np.ndarray | torch.Tensor, device, amp_dtype=None) -> torch.Tensor:
    """Softmax probabilities (N, C, H, W) float32 for a uint8 batch (N, H, W, 3) at the model's input size.

    With ``amp_dtype`` a float32 model runs under autocast; one already in that dtype
    (``prepare_fast_model``) takes inputs of that dtype instead."""
    model.eval()
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    inputs = normalize_batch(batch)
    if _uses_channels_last(device, amp_dtype):
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    first_weight = next(model.parameters(), None) if amp_dtype is not None else None  # (an ONNX session has none)
    cast_once = first_weight is not None and first_weight.dtype == amp_dtype
    if cast_once:
        inputs = inputs.to(amp_dtype)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None and not cast_once):
        logits = model(inputs)
    return logits.float().softmax(dim=1)


class StageTimes(dict):
    """Milliseconds per stage of prediction (preprocess, inference, postprocess), summed over calls:
    what the platform's speed test reports."""

    @contextmanager
    def stage(self, name: str, device: torch.device):
        start = time.perf_counter()
        yield
        synchronize(device)  # the GPU's work is queued: wait for it, or it counts in a later stage
        self[name] = self.get(name, 0.0) + (time.perf_counter() - start) * 1000


def _stage(times: StageTimes | None, name: str, device: torch.device):
    return nullcontext() if times is None else times.stage(name, device)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]  # the last tile ends flush with the border


def _blend_window(height: int, width: int, device) -> torch.Tensor:
    """Weights that fall towards tile borders (never to 0), so overlapping tiles blend without seams."""
    def ramp(n):
        x = torch.linspace(0, 1, n, device=device)
        return (1 - (2 * x - 1).abs()).clamp_min(0.1)
    return ramp(height)[:, None] * ramp(width)[None, :]


@torch.inference_mode()
def predict_sliding_window(model, image: np.ndarray, tile_height: int, tile_width: int, device,
                           amp_dtype=None, overlap: float = 0.25, batch_size: int = 4) -> torch.Tensor:
    """Probabilities (C, H, W) for an image larger than the training size, at full resolution.

    Tiles of the training size cover the image with the given overlap; their probabilities are
    blended with weights that favour tile centres. Images smaller than a tile are padded.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    height, width = image.shape[:2]
    pad_h, pad_w = max(0, tile_height - height), max(0, tile_width - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect" if min(height, width) > 1 else "edge")
    full_h, full_w = image.shape[:2]
    stride_h = max(1, int(tile_height * (1 - overlap)))
    stride_w = max(1, int(tile_width * (1 - overlap)))
    corners = [(y, x) for y in _tile_starts(full_h, tile_height, stride_h)
               for x in _tile_starts(full_w, tile_width, stride_w)]
    window = _blend_window(tile_height, tile_width, device)
    total = None
    weight = torch.zeros(full_h, full_w, device=device)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        tiles = np.stack([image[y:y + tile_height, x:x + tile_width] for y, x in chunk])
        probs = predict_probabilities(model, tiles, device, amp_dtype)
        if total is None:
            total = torch.zeros(probs.shape[1], full_h, full_w, device=device)
        for (y, x), tile_probs in zip(chunk, probs):
            total[:, y:y + tile_height, x:x + tile_width] += tile_probs * window
            weight[y:y + tile_height, x:x + tile_width] += window
    return (total / weight)[:, :height, :width]


@torch.inference_mode()
def predict_image(model, image: np.ndarray, input_height: int, input_width: int, device=torch.device("cpu"),
                  amp_dtype=None, mode: str = "whole", overlap: float = 0.25, batch_size: int = 4) -> torch.Tensor:
    """Probabilities (C, H, W) at the image's own size.

    ``whole``: the image is resized to the training size, as in training (and as the original
    app served); probabilities are resized back bilinearly. ``sliding``: tiles of the training
    size at full resolution, for images much larger than what the model was trained on.
    """
    if mode == "sliding":
        return predict_sliding_window(model, image, input_height, input_width, device, amp_dtype, overlap, batch_size)
    if mode != "whole":
        raise ValueError(f"unknown inference mode {mode!r}; choose from {', '.join(INFERENCE_MODES)}")
    return _whole_image_probabilities(model, [image], input_height, input_width, device, amp_dtype)[0]


def _whole_image_probabilities(model, images: list[np.ndarray], input_height: int, input_width: int, device,
                               amp_dtype, times: StageTimes | None = None) -> list[torch.Tensor]:
    """Probabilities (C, H, W) at each image's own size; the images, resized to the training size, share one pass."""
    with _stage(times, "preprocess", device):
        batch = np.stack([resize_image(image, input_height, input_width) for image in images])
    with _stage(times, "inference", device):
        probs = predict_probabilities(model, batch, device, amp_dtype)
    with _stage(times, "postprocess", device):
        return [resize_probabilities(p, *image.shape[:2]) for image, p in zip(images, probs)]


def resize_probabilities(probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (C, h, w) probabilities to (C, height, width).

    On the CPU OpenCV does it about 5x faster than torch for a few channels; the result is an
    (H, W, C) array seen as (C, H, W), which argmax over dim 0 reads as it is.
    """
    if probs.device.type != "cpu" or probs.shape[0] > 512:  # cv2.resize takes at most 512 channels
        return F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    hwc = probs.permute(1, 2, 0).contiguous().numpy()
    resized = cv2.resize(hwc, (width, height), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized.reshape(height, width, -1)).permute(2, 0, 1)


@torch.inference_mode()
def predict_masks(model, images: list[np.ndarray], input_height: int, input_width: int, device=torch.device("cpu"),
                  amp_dtype=None, mode: str = "whole", overlap: float = 0.25, batch_size: int = 4,
                  times: StageTimes | None = None) -> list[np.ndarray]:
    """Class-index masks (H, W) uint8 for RGB images of any sizes, as ``inference`` computes them one by one.

    In ``whole`` mode the images share forward passes of up to ``batch_size`` images. ``times`` collects the
    milliseconds per stage (in ``sliding`` mode tiling and blending are all ``inference``).
    """
    if mode != "whole":
        with _stage(times, "inference", device):
            return [inference(model, image, input_height, input_width, device, amp_dtype, mode, overlap, batch_size)
                    for image in images]
    masks = []
    for first in range(0, len(images), batch_size):
        chunk = images[first:first + batch_size]
        for probs in _whole_image_probabilities(model, chunk, input_height, input_width, device, amp_dtype, times):
            with _stage(times, "postprocess", device):
                masks.append(probs.argmax(dim=0).to(torch.uint8).cpu().numpy())
    return masks


def inference(model, image: np.ndarray, input_height: int, input_width: int, device=torch.device("cpu"),
              amp_dtype=None, mode: str = "whole", overlap: float = 0.25, batch_size: int = 4) -> np.ndarray:
    """Class-index mask (H, W) uint8 for an RGB image of any size (see ``predict_image``)."""
    probs = predict_image(model, image, input_height, input_width, device, amp_dtype, mode, overlap, batch_size)
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()


def convert_prediction_to_sly_format(mask: np.ndarray, model_classes: list[sly.ObjClass],
                                     skip_background: bool = True) -> sly.Annotation:
    """One Bitmap label per predicted class; ``__bg__`` is left out unless asked for.

    Predicted classes are bitmaps whatever shape the class was labelled with (polygon,
    rectangle...), so each class is re-declared with the Bitmap geometry.
    """
    labels = []
    for index in np.unique(mask).tolist():
        obj_class = model_classes[index]
        if skip_background and obj_class.name == "__bg__":
            continue
        if obj_class.geometry_type is not sly.Bitmap:
            obj_class = obj_class.clone(geometry_type=sly.Bitmap)
        labels.append(sly.Label(sly.Bitmap(mask == index), obj_class))
    return sly.Annotation(img_size=mask.shape[:2], labels=labels)
