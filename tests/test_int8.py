"""int8 inference (custom_net.quantize): the float function within quantization error for every
architecture and input size, engine faults kept out, and the load-time check. The runtime through
predict.py, on a trained run, is in test_train_e2e.py."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from custom_net import quantize
from custom_net.inference import load_trained_model, predict_masks
from custom_net.model import model_list
from custom_net.preprocessing import normalize_batch
from custom_net.quantize import QuantizationError, load_calibration_images, quantize_int8
from tests.helpers import make_run


def _images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth, high-contrast random pictures: activations with the spread of real ones."""
    rng = np.random.default_rng(seed)
    images = np.stack([cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 2)
                       for _ in range(count)]).astype(np.float32)
    return ((images - images.mean()) * 3 + 128).clip(0, 255).astype(np.uint8)


def _relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((other - reference).norm() / reference.norm())


@pytest.mark.parametrize("name", list(model_list))
def test_int8_computes_the_float_function(tmp_path, name):
    # Calibrated and run at the training size, as predict and serve run it (whole images are resized to
    # it, sliding windows are tiles of it): 64x64, and 80x112 where the decoders must resize to the skips.
    for height, width in ((64, 64), (80, 112)):
        trained = load_trained_model(make_run(tmp_path / f"run{height}", name, height, width))
        # The load-time check is off: an untrained network's class scores differ by a few units on top of
        # a shared ~100, so rounding flips them anywhere. The closeness of the logits is what this measures;
        # the check runs on a trained model in test_train_e2e.py.
        quantized = quantize_int8(trained.model, _images(8, height, width), min_class_iou=0)
        x = normalize_batch(torch.as_tensor(_images(6, height, width, seed=1)))
        with torch.no_grad():
            expected, got = trained.model(x), quantized(x.contiguous(memory_format=torch.channels_last))
        assert got.dtype == torch.float32 and got.shape == expected.shape == (6, 3, height, width)
        assert _relative_error(expected, got) < 0.15
        assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.95
    masks = predict_masks(quantized, list(_images(2, 90, 130, seed=2)), height, width, mode="sliding")
    assert [m.shape for m in masks] == [(90, 130)] * 2 and masks[0].dtype == np.uint8


def _deconv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 3, stride=2), nn.ReLU(),  # like LinkNet34's head
                         nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1), nn.ReLU(),  # like its decoder blocks
                         nn.Conv2d(8, 3, 1)).eval()


def test_transposed_convolutions_come_out_right():
    net = _deconv_net()
    quantized = quantize_int8(net, _images(8, 24, 24), min_class_iou=0)
    x = normalize_batch(torch.as_tensor(_images(4, 24, 24, seed=1)))
    with torch.no_grad():
        assert _relative_error(net(x), quantized(x)) < 0.1


def test_engine_faults_are_found_per_layer():
    broken = quantize._broken_deconvs(_deconv_net())
    if not broken:
        pytest.skip("this torch's int8 kernels get both transposed convolutions right")
    assert broken == ["2"]  # in torch 2.14 the x86 engine gets a transposed convolution wrong when its
    # input and output widths differ: 16 -> 8 here; the 8 -> 8 layer quantizes fine


def test_a_disagreeing_int8_model_is_refused(tmp_path, monkeypatch):
    net = _deconv_net()
    if not quantize._broken_deconvs(net):
        pytest.skip("no int8 kernel of this torch computes a wrong result to be caught")
    images = _images(8, 24, 24)
    with torch.no_grad():  # every class somewhere, with decisive scores (the check judges only those pixels)
        net[-1].bias -= net(normalize_batch(torch.as_tensor(images))).mean(dim=(0, 2, 3))
        net[-1].weight *= 20
        net[-1].bias *= 20
    quantize_int8(net, images)  # accepted with the faulty layer in float32
    monkeypatch.setattr(quantize, "_broken_deconvs", lambda model: [])  # let the faulty kernel through
    with pytest.raises(QuantizationError, match=r"disagree with float32 .*class \d+: IoU 0\.\d+ < 0\.9 where float32 is decisive\).*pytorch runtime"):
        quantize_int8(net, images)


def test_calibration_file_must_match_the_model(tmp_path):
    path = tmp_path / "calibration_images.npz"
    quantize.save_calibration_images(path, _images(40, 32, 48))
    images = load_calibration_images(path, 32, 48)
    assert images.shape == (quantize.MAX_CALIBRATION_IMAGES, 32, 48, 3)
    assert np.array_equal(images[0], _images(40, 32, 48)[0])  # spread over the set, the first included
    large = np.zeros((20, 1024, 512, 3), np.uint8)  # a large training size: fewer images, a bounded file
    assert quantize.pick_calibration_images(large).shape == (2, 1024, 512, 3)
    with pytest.raises(QuantizationError, match=r"calibration_images.npz: expected uint8 images of shape \(N, 64, 48, 3\)"):
        load_calibration_images(path, 64, 48)
    path.write_bytes(b"not a zip")
    with pytest.raises(QuantizationError, match="calibration_images.npz: not a calibration file"):
        load_calibration_images(path, 32, 48)


def test_transposed_convolutions_left_in_floating_point_run_in_bf16_where_fast(tmp_path):
    from custom_net.model import EvenOutputConvTranspose2d
    from custom_net.hardware import cpu_has_fast_bf16
    trained = load_trained_model(make_run(tmp_path / "run", "LinkNet34"))
    quantized = quantize_int8(trained.model, _images(8, 64, 64), min_class_iou=0)
    layer = quantized.get_submodule("finaldeconv1")
    if cpu_has_fast_bf16():
        assert isinstance(layer, quantize._InBfloat16) and layer.layer.weight.dtype == torch.bfloat16
        layer = layer.layer
    assert isinstance(layer, EvenOutputConvTranspose2d)  # called as a layer, not traced into
    assert type(quantized.get_submodule("decoder1.deconv2")).__module__.startswith("torch.ao.nn.quantized")
