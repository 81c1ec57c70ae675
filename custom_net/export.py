"""ONNX export of a trained checkpoint, and an ONNX Runtime model that predicts through the engine's functions.

    python custom_net/export.py results/exp1                  # the run's best checkpoint -> model_NNN_best.onnx
    python custom_net/export.py CKPT.pth --output model.onnx

The ONNX model takes the normalised batch ``input`` (N, 3, H, W) float32 and returns ``logits``
(N, C, H, W); batch, height and width are dynamic (height and width multiples of 32, as in training).
Preprocessing stays the engine's ``normalize_batch``: ``OnnxRuntimeModel`` is called by
``predict_probabilities`` exactly like the PyTorch model, so whole-image and sliding-window
prediction work unchanged on either runtime.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from custom_net.inference import load_trained_model
from custom_net.run_folder import RunFolder, resolve_checkpoint

RUNTIMES = ("pytorch", "int8", "onnx")  # int8: custom_net.quantize, on the CPU
OPSET = 17
# Traced at odd multiples of 32: there the decoders resize upsampled maps to the skip connection's
# size, so the tracer records that resize (computed from the input's shape). Traced at even
# multiples the resize is a no-op the tracer leaves out, and odd sizes would then fail in ONNX.
TRACE_HEIGHT, TRACE_WIDTH = 96, 160


def export_onnx(checkpoint: str | Path, output: str | Path | None = None, opset: int = OPSET) -> Path:
    """Write the checkpoint as ONNX (default: beside it, ``.onnx``); returns the path written."""
    checkpoint = resolve_checkpoint(checkpoint)
    output = Path(output) if output else RunFolder.onnx_for(checkpoint)
    trained = load_trained_model(checkpoint, torch.device("cpu"))
    dummy = torch.zeros(1, 3, TRACE_HEIGHT, TRACE_WIDTH)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape comparisons in the decoders, see above
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter; the dynamo one needs onnxscript
        torch.onnx.export(trained.model, (dummy,), str(partial), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": dynamic, "logits": dynamic})
    os.replace(partial, output)  # never leave a half-written model under the final name
    return output


class OnnxRuntimeModel:
    """An ONNX Runtime session with the calling convention of the PyTorch model: normalised batch -> logits."""

    def __init__(self, path: str | Path, device: torch.device = torch.device("cpu"), threads: int | None = None):
        import onnxruntime as ort  # only needed for this runtime

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            raise ValueError(f"{path}: cannot load the ONNX model ({e})") from None
        self.path = Path(path)

    def eval(self) -> "OnnxRuntimeModel":
        return self

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().float().cpu().contiguous().numpy()  # ORT takes plain NCHW float32
        (logits,) = self.session.run(["logits"], {"input": array})
        return torch.from_numpy(logits).to(inputs.device)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export a trained checkpoint to ONNX (dynamic batch and size).")
    parser.add_argument("checkpoint", help="a model_*.pth in <run>/checkpoints/, or the run folder (best checkpoint)")
    parser.add_argument("--output", help="where to write the .onnx (default: beside the checkpoint)")
    parser.add_argument("--opset", type=int, default=OPSET)
    args = parser.parse_args(argv)
    try:
        path = export_onnx(args.checkpoint, args.output, args.opset)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(path)
    return path


if __name__ == "__main__":
    main()
