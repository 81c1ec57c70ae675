"""int8 inference on the CPU: post-training static quantization of a trained model.

Activations are quantized with ranges observed on calibration images: up to
``MAX_CALIBRATION_IMAGES`` training images at the model's input size, which training saves as
``info/calibration_images.npz``. A quantized model is accepted only if its predictions on those
images agree with float32 ones (``MIN_CLASS_IOU``), so a backend kernel that computes something
else is caught at load time instead of in the user's masks.

Built on ``torch.ao.quantization`` (FX graph mode, the ``x86`` engine: with VNNI, int8 kernels do twice
the multiply-adds per instruction that bfloat16 ones do). That API is deprecated upstream; where a torch
no longer has it, loading says so and the float runtimes still work.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from custom_net.preprocessing import normalize_batch
from custom_net.hardware import cpu_has_fast_bf16, cpu_has_vnni
from custom_net.run_folder import RunFolder
from custom_net.storage import atomic_write

MAX_CALIBRATION_IMAGES = 16
CALIBRATION_PIXELS = 16 * 256 * 256  # about 3 MB in the run folder
# The load-time check: int8 vs float32 argmax on the calibration images, per class that covers at least
# MIN_CLASS_SHARE of the pixels, over the pixels where float32 is decisive (its top class leads the next by
# MIN_MARGIN in probability; near-ties flip under any rounding and say nothing of the kernels).
# Trained demo models scored 0.97 and more there; a faulty kernel scored 0.0-0.3.
MIN_CLASS_IOU = 0.9
MIN_CLASS_SHARE = 0.001
MIN_MARGIN = 0.2
_BATCH = 4
ENGINE = "x86"


class QuantizationError(ValueError):
    """The model cannot run in int8 here; the message says why and what to use instead."""


def pick_calibration_images(images: np.ndarray) -> np.ndarray:
    """Images spread evenly over ``images`` (N, H, W, 3) uint8, copied out of any memory map: up to
    MAX_CALIBRATION_IMAGES, and up to CALIBRATION_PIXELS in all (the file's size, the time to calibrate)."""
    count = min(len(images), MAX_CALIBRATION_IMAGES, max(1, CALIBRATION_PIXELS // (images.shape[1] * images.shape[2])))
    picked = np.linspace(0, len(images) - 1, count).round().astype(int)
    return np.ascontiguousarray(images[np.unique(picked)])


def save_calibration_images(path: Path, images: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, images=pick_calibration_images(images)))


def load_calibration_images(path: Path, height: int, width: int) -> np.ndarray:
    try:
        with np.load(path) as data:
            images = data["images"]
    except FileNotFoundError:
        raise QuantizationError(f"{path} not found: the int8 runtime calibrates on the training images this app's "
                                "training saves there (runs trained before it, or by the original app, have none); "
                                "use the pytorch runtime") from None
    except (OSError, ValueError, KeyError) as e:
        raise QuantizationError(f"{path}: not a calibration file ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3) or not len(images):
        raise QuantizationError(f"{path}: expected uint8 images of shape (N, {height}, {width}, 3), "
                                f"got {images.dtype} {images.shape}")
    return images


def _quantization_api():
    """``torch.ao.quantization`` and its FX module, or a QuantizationError saying why not."""
    try:
        from torch.ao import quantization
        from torch.ao.quantization import quantize_fx
    except ImportError as e:
        raise QuantizationError(f"this torch ({torch.__version__}) has no torch.ao.quantization ({e}); "
                                "use the pytorch runtime") from None
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise QuantizationError(f"this torch has no {ENGINE} int8 engine (engines: "
                                f"{', '.join(torch.backends.quantized.supported_engines)}); use the pytorch runtime")
    return quantization, quantize_fx


def _qconfig_mapping(keep_float: list[str]):
    """The engine's default int8 settings, with 8-bit activations where the CPU has VNNI (the default's
    7 bits guard older kernels against saturation, and double the rounding error), and the modules
    named in ``keep_float`` left unquantized."""
    quantization, _ = _quantization_api()
    mapping = quantization.get_default_qconfig_mapping(ENGINE)
    if cpu_has_vnni():
        def full_range(qconfig):
            partial = getattr(getattr(qconfig, "activation", None), "p", None)
            if partial is None or not partial.keywords.get("reduce_range"):
                return qconfig
            return quantization.QConfig(activation=qconfig.activation.with_args(reduce_range=False),
                                        weight=qconfig.weight)
        mapping.set_global(full_range(mapping.global_qconfig))
        for key, qconfig in list(mapping.object_type_qconfigs.items()):
            mapping.set_object_type(key, full_range(qconfig))
    for name in keep_float:
        mapping.set_module_name(name, None)
    return mapping


def _custom_layer_types(model: nn.Module) -> list[type]:
    """Subclasses of torch.nn layers (``EvenOutputConvTranspose2d``): FX must call them, not trace into them."""
    return sorted({type(m) for m in model.modules() if isinstance(m, nn.ConvTranspose2d)} - {nn.ConvTranspose2d},
                  key=lambda t: t.__qualname__)


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves: list[type]):
        super().__init__()
        self.leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _logits_layer(model: nn.Module, custom_types: list[type]) -> str:
    """The module whose output the model returns (through functions such as ``_match``)."""
    graph = _Tracer(custom_types).trace(model)
    node = next(n for n in graph.nodes if n.op == "output")
    while node.op != "call_module":
        node = node.all_input_nodes[0]
    return node.target


class _InBfloat16(nn.Module):
    """A layer the int8 model keeps in floating point, run in bfloat16 with its weights cast once: on a
    CPU with bf16 dot products, in about half the time of float32."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(torch.bfloat16)).float()


def _relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((other - reference).norm() / reference.norm().clamp_min(1e-12))


def _broken_deconvs(model: nn.Module) -> list[str]:
    """Transposed convolutions whose int8 kernel does not reproduce the float layer (in torch 2.14 the
    x86 engine computes garbage when input and output widths differ). Those stay in float32."""
    quantization, quantize_fx = _quantization_api()
    broken, verdicts = [], {}
    generator = torch.Generator().manual_seed(0)
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.ConvTranspose2d):
            continue
        config = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.output_padding, layer.dilation, layer.groups)
        if config not in verdicts:  # a plain nn.ConvTranspose2d of the same shape: what the engine would run
            plain = nn.ConvTranspose2d(*config[:2], config[2], config[3], config[4], config[5], groups=config[7],
                                       bias=layer.bias is not None, dilation=config[6])
            plain.load_state_dict(layer.state_dict())
            probe = nn.Sequential(plain).float().eval()
            sample = torch.randn(2, layer.in_channels, 9, 11, generator=generator).relu()
            prepared = quantize_fx.prepare_fx(probe, quantization.get_default_qconfig_mapping(ENGINE), (sample,))
            with torch.no_grad():
                prepared(sample)
                verdicts[config] = _relative_error(probe(sample), quantize_fx.convert_fx(prepared)(sample)) < 0.1
        if not verdicts[config]:
            broken.append(name)
    return broken


def _class_ious(reference: torch.Tensor, other: torch.Tensor, min_share: float) -> dict[int, float]:
    """IoU of ``other`` against ``reference`` (class-index maps) for each class that covers at least
    ``min_share`` of ``reference``'s pixels."""
    ious = {}
    for c in reference.unique().tolist():
        a, b = reference == c, other == c
        if int(a.sum()) >= min_share * reference.numel():
            ious[c] = int((a & b).sum()) / int((a | b).sum())
    return ious


def quantize_int8(model: nn.Module, calibration: np.ndarray, min_class_iou: float = MIN_CLASS_IOU) -> nn.Module:
    """An int8 copy of ``model`` (eval mode, BatchNorm folded or not) calibrated on ``calibration``,
    (N, H, W, 3) uint8 images at the model's input size. It takes the same float32 input and returns
    float32 logits, so ``predict_probabilities`` and the sliding window use it unchanged.
    Raises ``QuantizationError`` when int8 predictions on the calibration images disagree with float32
    (a class IoU under ``min_class_iou``)."""
    _, quantize_fx = _quantization_api()
    torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():  # deprecation notices of torch.ao.quantization, on every call
        warnings.simplefilter("ignore")
        model = copy.deepcopy(model).float().eval()
        inputs = normalize_batch(torch.as_tensor(calibration))
        # Left in floating point: the logits layer (cheap; rounding logits flips near-even classes), and
        # transposed convolutions the engine gets wrong or that are our own subclasses (those two in
        # bfloat16 where the CPU runs it fast).
        custom_types = _custom_layer_types(model)
        float_deconvs = sorted({*_broken_deconvs(model),
                                *(name for name, m in model.named_modules() if isinstance(m, tuple(custom_types)))})
        mapping = _qconfig_mapping([_logits_layer(model, custom_types), *float_deconvs])
        custom = quantize_fx.PrepareCustomConfig().set_non_traceable_module_classes(custom_types)
        prepared = quantize_fx.prepare_fx(model, mapping, (inputs[:1],), prepare_custom_config=custom)
        with torch.no_grad():
            probs, classes = zip(*(prepared(batch).softmax(1).topk(2, dim=1) for batch in inputs.split(_BATCH)))
            probs, classes = torch.cat(probs), torch.cat(classes)
            quantized = quantize_fx.convert_fx(prepared)
            if cpu_has_fast_bf16():
                for name in float_deconvs:
                    quantized.set_submodule(name, _InBfloat16(quantized.get_submodule(name)))
            inputs = inputs.contiguous(memory_format=torch.channels_last)  # as predict_probabilities feeds it
            got = torch.cat([quantized(batch).argmax(1) for batch in inputs.split(_BATCH)])
    decisive = probs[:, 0] - probs[:, 1] >= MIN_MARGIN
    ious = _class_ious(classes[:, 0][decisive], got[decisive], MIN_CLASS_SHARE)
    worst = min(ious, key=ious.get, default=None)
    if worst is not None and ious[worst] < min_class_iou:
        raise QuantizationError(f"int8 predictions disagree with float32 on the calibration images (class {worst}: "
                                f"IoU {ious[worst]:.3f} < {min_class_iou} where float32 is decisive); "
                                "use the pytorch runtime")
    return quantized


def quantize_trained(trained) -> nn.Module:
    """``quantize_int8`` of a loaded run (``custom_net.inference.TrainedModel``) with its own calibration images."""
    device = next(trained.model.parameters()).device
    if device.type != "cpu":
        raise QuantizationError(f"the int8 runtime runs on the CPU, not {device}: use --device cpu")
    calibration = load_calibration_images(RunFolder.of_checkpoint(trained.checkpoint).calibration,
                                          trained.input_height, trained.input_width)
    return quantize_int8(trained.model, calibration)
