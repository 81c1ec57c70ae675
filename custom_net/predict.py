"""Prediction with a trained run on PyTorch or ONNX Runtime; the CLI that writes annotations, masks and overlays.

    python custom_net/predict.py results/exp1 photo.jpg --output predictions
    python custom_net/predict.py results/exp1/checkpoints/model_010_best.pth images/ --output predictions --mode sliding

Writes ``meta.json`` (the model's classes), ``ann/<image name>.json`` (Supervisely annotation,
one bitmap per predicted class, ``__bg__`` left out), ``masks/<image stem>.png`` (class index per
pixel, the index of the class in ``meta.json``; ``__bg__`` is 0 in this app's runs, last in the original
app's) and ``overlays/<image stem>.png`` (class colours over the image).
The serving app predicts through the same ``Predictor``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import supervisely as sly
import torch

from custom_net.export import RUNTIMES, OnnxRuntimeModel, export_onnx
from custom_net.inference import (INFERENCE_MODES, StageTimes, TrainedModel, convert_prediction_to_sly_format,
                                  load_trained_model, predict_masks, prepare_fast_model)
from custom_net.quantize import quantize_trained
from custom_net.run_folder import resolve_checkpoint
from custom_net.preprocessing import ImageReadError, read_image_rgb
from custom_net.sly_seg_dataset import background_index
from custom_net.hardware import AMP_MODES, dtype_name, resolve_amp, select_device
from custom_net.visualize import overlay, save_png

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Predictor:
    """A trained run ready to predict: the network (PyTorch module or ONNX Runtime session) and where it runs."""
    trained: TrainedModel
    net: object
    device: torch.device
    amp_dtype: torch.dtype | None
    runtime: str

    @property
    def model_classes(self) -> list[sly.ObjClass]:
        return self.trained.model_classes

    @property
    def precision(self) -> str:
        if self.runtime == "int8":
            return "int8"
        return dtype_name(self.amp_dtype)

    def masks(self, images: list[np.ndarray], mode: str = "whole", overlap: float = 0.25,
              batch_size: int = 4, times: StageTimes | None = None) -> list[np.ndarray]:
        """Class-index masks at each image's size (see ``custom_net.inference.predict_masks``)."""
        return predict_masks(self.net, images, self.trained.input_height, self.trained.input_width, self.device,
                             self.amp_dtype, mode, overlap, batch_size, times)


def load_predictor(checkpoint: str | Path, device: str = "auto", runtime: str = "pytorch", amp: str = "auto",
                   onnx_path: str | Path | None = None) -> Predictor:
    """Load a checkpoint (or a run folder's best one) for prediction.

    ``runtime="onnx"`` exports the checkpoint (to ``onnx_path``, default beside it) and predicts with
    ONNX Runtime in float32; ``pytorch`` uses the engine's fast path (autocast ``amp``, channels_last);
    ``int8`` quantizes the model on the CPU with the run's calibration images (``custom_net.quantize``).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    checkpoint = resolve_checkpoint(checkpoint)
    if runtime == "int8" and device == "auto":
        device = "cpu"
    torch_device = select_device(device)
    trained = load_trained_model(checkpoint, torch_device)
    if runtime == "int8":
        return Predictor(trained, quantize_trained(trained), torch_device, None, runtime)
    if runtime == "onnx":
        path = export_onnx(checkpoint, onnx_path)
        return Predictor(trained, OnnxRuntimeModel(path, torch_device), torch_device, None, runtime)
    amp_dtype = resolve_amp(amp, torch_device)
    return Predictor(trained, prepare_fast_model(trained.model, torch_device, amp_dtype), torch_device, amp_dtype, runtime)


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such image or folder")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    return images


def write_prediction(output: Path, relative: Path, image: np.ndarray, mask: np.ndarray,
                     model_classes: list[sly.ObjClass]) -> Path:
    """Annotation, mask and overlay of one image; ``relative`` (its path under the input folder) keeps names apart."""
    paths = {"ann": output / "ann" / relative.parent / f"{relative.name}.json",
             "masks": output / "masks" / relative.with_suffix(".png"),
             "overlays": output / "overlays" / relative.with_suffix(".png")}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    ann = convert_prediction_to_sly_format(mask, model_classes)
    paths["ann"].write_text(json.dumps(ann.to_json()))
    cv2.imwrite(str(paths["masks"]), mask)
    save_png(paths["overlays"], overlay(image, mask, [c.color for c in model_classes],
                                        background=background_index([c.name for c in model_classes])))
    return paths["ann"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict images with a trained run: Supervisely annotation JSON, "
                                                 "class-index PNG masks and colour overlays.")
    parser.add_argument("checkpoint", help="a model_*.pth in <run>/checkpoints/, or the run folder (best checkpoint)")
    parser.add_argument("input", help="an image or a folder of images (searched recursively)")
    parser.add_argument("--output", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--mode", choices=INFERENCE_MODES, default="whole",
                        help="whole: resize to the training size; sliding: training-size tiles at full resolution")
    parser.add_argument("--overlap", type=float, default=0.25, help="tile overlap for --mode sliding, in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="images (whole) or tiles (sliding) per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--runtime", choices=RUNTIMES, default="pytorch",
                        help="pytorch (float, --amp); int8 (CPU, 1.2-1.8x the speed of bf16 there; needs the "
                             "calibration images training saves in the run); onnx (ONNX Runtime, float32)")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast dtype for the pytorch runtime")
    args = parser.parse_args(argv)
    try:
        images = list_images(Path(args.input))
        predictor = load_predictor(args.checkpoint, args.device, args.runtime, args.amp)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    root = Path(args.input) if Path(args.input).is_dir() else Path(args.input).parent
    meta = sly.ProjectMeta([c.clone(geometry_type=sly.Bitmap) for c in predictor.model_classes])
    (output / "meta.json").write_text(json.dumps(meta.to_json()))
    failed = 0
    for path in images:
        try:
            image = read_image_rgb(path)
        except ImageReadError as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        (mask,) = predictor.masks([image], args.mode, args.overlap, args.batch_size)
        written = write_prediction(output, path.relative_to(root), image, mask, predictor.model_classes)
        print(f"{path} -> {written}")
    print(f"{len(images) - failed} of {len(images)} image(s) predicted into {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
