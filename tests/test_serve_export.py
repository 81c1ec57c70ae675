"""ONNX export and ONNX Runtime against PyTorch, the predict CLI, image decoding limits, run-folder resolution.

Models here are fixed-seed (untrained) networks in a run folder laid out as training writes it;
``make_run`` is shared with tests/test_serve_http.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervisely as sly
import torch

from custom_net.export import OnnxRuntimeModel, export_onnx
from custom_net.inference import StageTimes, load_trained_model
from custom_net.run_folder import resolve_checkpoint
from custom_net.predict import load_predictor, main as predict_main
from custom_net.preprocessing import ImageReadError, decode_image_rgb, normalize_batch, read_image_rgb, resize_image
from tests.helpers import CLASSES, REPO, lemons_images, make_run, png_declaring


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory) -> Path:
    """UNet with a 256x320 training size, exported once by the command a user runs."""
    checkpoint = make_run(tmp_path_factory.mktemp("onnx") / "run", height=256, width=320)
    result = subprocess.run([sys.executable, str(REPO / "custom_net" / "export.py"), str(checkpoint.parent.parent)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()) == checkpoint.with_suffix(".onnx")  # the run's best checkpoint, beside it
    return checkpoint


# UNet and AlbuNet: AlbuNet's decoder resizes to the skip's size at odd multiples of 32 (UNet11, UNet16
# and LinkNet34 export the same way; checked by hand, left out to keep the suite short).
@pytest.mark.parametrize("model_name", ["UNet", "AlbuNet"])
def test_architecture_exports_with_dynamic_batch_and_size(model_name, tmp_path):
    checkpoint = make_run(tmp_path / "run", model_name)
    path = export_onnx(checkpoint, tmp_path / "model.onnx")
    model = load_trained_model(checkpoint).model
    session = OnnxRuntimeModel(path)
    # 64x64 is an even multiple of 32, 96x160 / 160x96 odd ones: the decoders' resize-to-skip must be in the graph.
    for shape in [(1, 3, 64, 64), (2, 3, 96, 160), (3, 3, 160, 96)]:
        inputs = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            expected = model(inputs)
        got = session(inputs)
        assert got.shape == expected.shape == (shape[0], len(CLASSES), shape[2], shape[3])
        scale = max(1.0, expected.abs().max().item())  # float32 rounding grows with the logits' magnitude
        torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.slow
def test_onnx_runtime_agrees_with_pytorch_on_lemons(onnx_run):
    images = [read_image_rgb(p) for p in lemons_images()]
    trained = load_trained_model(onnx_run)
    session = OnnxRuntimeModel(onnx_run.with_suffix(".onnx"))
    batch = normalize_batch(torch.as_tensor(np.stack([resize_image(i, 256, 320) for i in images])))
    with torch.inference_mode():
        expected = trained.model(batch)
    got = session(batch)
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.999, f"argmax agreement {agreement:.5f}"
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() < 1e-4 * scale  # speed: bench/serve_bench.py


@pytest.mark.slow
def test_predictors_on_both_runtimes_give_the_same_masks(onnx_run, tmp_path):
    image = read_image_rgb(lemons_images()[0])
    onnx = load_predictor(onnx_run, "cpu", "onnx", onnx_path=tmp_path / "m.onnx")
    torch_fp32 = load_predictor(onnx_run, "cpu", "pytorch", amp="off")
    # whole: the full image resized; sliding: a 300x420 crop in 256x320 tiles (4 tiles, blended)
    for mode, part in (("whole", image), ("sliding", image[100:400, 200:620])):
        (a,), (b,) = onnx.masks([part], mode), torch_fp32.masks([part], mode)
        assert a.shape == b.shape == part.shape[:2]
        assert (a == b).mean() >= 0.999, mode


def test_export_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope not found \\(no such checkpoint or run folder\\)"):
        export_onnx(tmp_path / "nope")
    checkpoint = make_run(tmp_path / "run")
    (tmp_path / "run" / "info" / "ui_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="the run folder has no .*ui_state.json"):
        export_onnx(checkpoint)


def test_resolve_checkpoint_prefers_best_then_last(tmp_path):
    run = tmp_path / "run"
    make_run(run, epoch=3)
    (run / "checkpoints" / "model_012_best.pth").write_bytes(b"")
    (run / "checkpoints" / "model_015_last.pth").write_bytes(b"")
    assert resolve_checkpoint(run).name == "model_012_best.pth"
    for best in (run / "checkpoints").glob("*_best.pth"):
        best.unlink()
    assert resolve_checkpoint(run).name == "model_015_last.pth"
    with pytest.raises(FileNotFoundError, match="no checkpoints/model_"):
        resolve_checkpoint(tmp_path)


def test_decode_refuses_absurd_sizes_truncated_and_empty_files():
    with pytest.raises(ImageReadError, match="big.png: image of 100000x90000 pixels is larger than the limit"):
        decode_image_rgb(png_declaring(100_000, 90_000), "big.png", max_pixels=50_000_000)
    with pytest.raises(ImageReadError, match="huge.png: not a readable image"):  # no limit given: OpenCV's own
        decode_image_rgb(png_declaring(1_000_000, 1_000_000), "huge.png")
    jpeg = cv2.imencode(".jpg", np.full((64, 80, 3), 120, np.uint8))[1].tobytes()
    assert decode_image_rgb(jpeg, "ok.jpg", max_pixels=64 * 80).shape == (64, 80, 3)
    with pytest.raises(ImageReadError, match="cut.jpg: truncated JPEG"):
        decode_image_rgb(jpeg[: len(jpeg) // 2], "cut.jpg")
    with pytest.raises(ImageReadError, match="empty.png: empty file"):
        decode_image_rgb(b"", "empty.png")


def test_predict_cli_writes_annotations_masks_and_overlays(tmp_path):
    images = lemons_images()
    make_run(tmp_path / "run")
    out = tmp_path / "pred"
    assert predict_main([str(tmp_path / "run"), str(images[0].parent), "--output", str(out), "--device", "cpu"]) == 0
    meta = sly.ProjectMeta.from_json(json.loads((out / "meta.json").read_text()))
    assert [c.name for c in meta.obj_classes] == [name for name, _, _ in CLASSES]
    for path in images:
        image = cv2.imread(str(path))
        mask = cv2.imread(str(out / "masks" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and mask.max() < len(CLASSES)
        assert cv2.imread(str(out / "overlays" / f"{path.stem}.png")).shape == image.shape
        ann = sly.Annotation.from_json(json.loads((out / "ann" / f"{path.name}.json").read_text()), meta)
        assert ann.img_size == image.shape[:2]
        painted = np.zeros(image.shape[:2], np.uint8)
        for label in ann.labels:
            label.geometry.draw(painted, meta.obj_classes.keys().index(label.obj_class.name))
        np.testing.assert_array_equal(painted, mask)  # annotation and mask say the same thing


def test_predict_cli_reports_bad_input(tmp_path, capsys):
    make_run(tmp_path / "run")
    assert predict_main([str(tmp_path / "run"), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg: no such image or folder" in capsys.readouterr().err
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(tmp_path / "images" / "fine.png"), np.zeros((40, 50, 3), np.uint8))
    assert predict_main([str(tmp_path / "run"), str(tmp_path / "images"), "--output", str(tmp_path / "out")]) == 1
    assert "broken.jpg: not a readable image" in capsys.readouterr().err
    assert (tmp_path / "out" / "masks" / "fine.png").is_file()


def test_batched_whole_image_masks_match_one_image_at_a_time(tmp_path):
    from custom_net.inference import inference

    predictor = load_predictor(make_run(tmp_path / "run"), "cpu", amp="off")
    images = [np.random.default_rng(i).integers(0, 256, (50 + 30 * i, 70 + 20 * i, 3), np.uint8) for i in range(5)]
    masks = predictor.masks(images, batch_size=2)  # batches of 2, 2 and 1 images of different sizes
    for image, mask in zip(images, masks):
        np.testing.assert_array_equal(mask, inference(predictor.net, image, 64, 64, predictor.device))
    # Timed by stage (the platform's speed test), the same masks.
    for mode, stages in (("whole", {"preprocess", "inference", "postprocess"}), ("sliding", {"inference"})):
        times = StageTimes()
        timed = predictor.masks(images, mode, batch_size=2, times=times)
        assert set(times) == stages and all(ms > 0 for ms in times.values()), times
        for a, b in zip(timed, masks if mode == "whole" else predictor.masks(images, mode, batch_size=2)):
            np.testing.assert_array_equal(a, b)
