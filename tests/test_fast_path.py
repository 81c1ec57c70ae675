"""The fast path computes what the plain path computes; the recipe levers do what they say.

Speed itself is measured in bench/, never here.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from custom_net import sly_seg_dataset as data
from custom_net.inference import predict_probabilities, prepare_fast_model
from custom_net.model import build_model, encoder_parameters, fold_batchnorm, model_list, scale_to_data
from custom_net.preprocessing import resize_image, resize_mask
from custom_net.config import ArgsError, build_parser, parse_config
from custom_net.train import main
from custom_net.run_folder import RunFolder
from custom_net.trainer import COLLAPSE_ROUNDS, FEW_STEPS, collapse_warning
from custom_net.epoch import forward_batch, NonFiniteLoss, train_one_epoch
from custom_net.hardware import resolve_num_workers
from custom_net.optim import SCHEDULE_OPTIONS, build_optimizer, build_scheduler, parameter_groups, set_bn_momentum
from custom_net.validation import ConfusionMatrix, collapsed_class
from tests.helpers import TINY_TRAIN_ARGS, RecordingReporter as Messages

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prepared(tiny_project):
    project = data.open_project(tiny_project)
    items = data.list_items(project)
    names = [c.name for c in data.build_model_classes(project.meta, None)]
    result = data.PreparedData(items, project.meta, names, 48, 64, num_threads=2)
    yield project, items, names, result
    result.close()


def test_cache_equals_fresh_decoding_and_rasterisation(prepared):
    project, items, names, cache = prepared
    index_of = {n: i for i, n in enumerate(names)}
    for i, item in enumerate(items):
        image, mask = data.load_item(item, project.meta, index_of)
        assert np.array_equal(cache.images[i], resize_image(image, 48, 64)), item.key
        assert np.array_equal(cache.masks[i], resize_mask(mask, 48, 64)), item.key


def test_numpy_collate_matches_torch_collate(prepared):
    dataset = data.SlySegDataset(prepared[3])
    samples = [dataset[i] for i in range(5)]
    images, masks = data.collate_batch(samples)
    expected_images, expected_masks = default_collate(samples)
    assert images.dtype == torch.uint8 and masks.dtype == torch.uint8 and images.shape == (5, 48, 64, 3)
    assert torch.equal(images, expected_images) and torch.equal(masks, expected_masks)
    # Masks travel as uint8 and become int64 class indices on the device.
    _, device_masks = forward_batch(torch.nn.Conv2d(3, 2, 1), images, masks, torch.device("cpu"))
    assert device_masks.dtype == torch.int64 and torch.equal(device_masks, expected_masks.long())


@pytest.mark.parametrize("name", sorted(model_list))
def test_bf16_channels_last_agrees_with_float32(name):
    torch.manual_seed(0)
    model = build_model(name, 3, "none").eval()
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        plain, _ = forward_batch(model, images, masks, cpu)
        model.to(memory_format=torch.channels_last)
        fast, _ = forward_batch(model, images, masks, cpu, torch.bfloat16, torch.channels_last)
    fast = fast.float()
    assert fast.shape == plain.shape
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their spread, and so do the labels.
    assert (fast - plain).abs().mean() <= 0.03 * plain.std()
    assert (fast.argmax(1) == plain.argmax(1)).float().mean() > 0.98


@pytest.mark.parametrize("name", sorted(model_list))
def test_weights_cast_once_predict_like_autocast(name):
    """Serving stores the weights in bf16 once instead of autocasting every call: the same probabilities."""
    torch.manual_seed(0)
    model = fold_batchnorm(build_model(name, 3, "none").eval())
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    autocast = predict_probabilities(model, images, cpu, torch.bfloat16)
    fast = prepare_fast_model(copy.deepcopy(model), cpu, torch.bfloat16)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    cast_once = predict_probabilities(fast, images, cpu, torch.bfloat16)
    assert cast_once.dtype == torch.float32 and cast_once.shape == autocast.shape == (2, 3, 64, 64)
    assert (cast_once - autocast).abs().max() < 0.05
    assert (cast_once.argmax(1) == autocast.argmax(1)).float().mean() > 0.98


def test_num_workers_auto():
    assert resolve_num_workers("auto", torch.device("cpu")) == 0
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    assert resolve_num_workers("auto", torch.device("cuda")) >= 1
    assert parse_config(["--demo", "--num-workers", "2"]).num_workers == 2
    with pytest.raises(ValueError, match="--num-workers"):
        parse_config(["--demo", "--num-workers", "-1"])


# ---- the recipe ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(model_list))
def test_he_init_keeps_the_signal_alive_from_scratch(name):
    """Default conv init shrinks activations layer by layer; the untrained logits are then nearly equal."""
    x = torch.randn(2, 3, 64, 64)
    stds = {}
    for init in ("he", "original"):
        torch.manual_seed(0)
        with torch.no_grad():
            stds[init] = build_model(name, 2, "none", init)(x).std().item()
    assert stds["he"] > 5 * stds["original"], stds


@pytest.mark.parametrize("name", sorted(model_list))
def test_lsuv_scales_batchnorm_free_models_to_unit_variance(name):
    """On the batch it scaled on, every untrained conv of a BatchNorm-free model outputs unit deviation;
    kept (pretrained) layers and models with BatchNorm are left as they were."""
    torch.manual_seed(0)
    model = build_model(name, 3, "none", "lsuv")
    before = copy.deepcopy(model.state_dict())
    keep = encoder_parameters(model)  # as when an ImageNet encoder was loaded
    x = torch.randn(2, 3, 64, 64) * 0.6 + 0.3
    with_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert scale_to_data(model, x, keep) == (not with_bn) == (name in ("UNet", "UNet11", "UNet16"))
    after = copy.deepcopy(model.state_dict())
    parameters = dict(model.named_parameters())
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    stds = {}
    for conv in convs:
        conv.register_forward_hook(lambda m, i, o: stds.update({m: o.std().item()}))  # None: output kept
    with torch.no_grad():
        model(x)
    for key, value in before.items():
        if with_bn or (key in parameters and id(parameters[key]) in keep):
            assert torch.equal(after[key], value), key
    scaled = [conv for conv in convs if not with_bn and id(conv.weight) not in keep]
    assert scaled or with_bn
    for conv in scaled:
        assert stds[conv] == pytest.approx(1.0, rel=1e-3)


def test_lsuv_runs_on_fresh_models_only(tiny_project, tmp_path):
    """The default --init lsuv scales a new UNet11 trained without BatchNorm on training images; weights a
    run starts from (--custom-weights), --init he, the architectures model_list leaves out and a model that
    trains with BatchNorm (--train-batchnorm, on by default from scratch) are not scaled."""
    def scaled(flags):
        reporter = Messages()
        main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--epochs", "1", "--model", "UNet11",
                                "--train-batchnorm", "off", *flags], reporter=reporter)
        return any("--init lsuv" in text for _, text in reporter.messages)

    assert scaled(["--output", str(tmp_path / "fresh")])
    assert not scaled(["--output", str(tmp_path / "normalised"), "--train-batchnorm", "auto"])
    assert json.loads(RunFolder(tmp_path / "fresh").train_args.read_text())["init"] == "lsuv"
    weights = next((tmp_path / "fresh" / "checkpoints").glob("model_*_best.pth"))
    assert not scaled(["--output", str(tmp_path / "custom"), "--custom-weights", str(weights)])
    assert not scaled(["--output", str(tmp_path / "he"), "--init", "he"])
    assert not scaled(["--output", str(tmp_path / "unet16"), "--model", "UNet16"])


def test_learning_rates_are_the_architectures(tmp_path):
    """AlbuNet's BatchNorm-free decoder diverges at the lr its ResNet encoder learns best with
    (bench/RESULTS.md): its decoder trains at 0.33x. Given flags, the original preset and a
    train_args.json still decide; train_args.json records the resolved values."""
    resolved = {name: (args.lr, args.decoder_lr_factor)
                for name in model_list for args in [parse_config(["--demo", "--model", name])]}
    assert resolved["AlbuNet"][1] < 1  # its decoder slower than its encoder
    assert all(factor == 1 for name, (_, factor) in resolved.items() if name != "AlbuNet")
    assert resolved["AlbuNet"][0] == resolved["LinkNet34"][0]  # the same ResNet34 encoder, the same rate
    given = parse_config(["--demo", "--model", "AlbuNet", "--lr", "0.01", "--decoder-lr-factor", "0.5"])
    assert (given.lr, given.decoder_lr_factor) == (0.01, 0.5)
    original = parse_config(["--demo", "--model", "AlbuNet", "--preset", "original"])
    assert (original.lr, original.decoder_lr_factor) == (1e-3, 1.0)
    recorded = tmp_path / "train_args.json"

    def from_file(values):
        recorded.write_text(json.dumps({"model": "AlbuNet", "project_dir": ".", **values}))
        args = parse_config(["--train-args", str(recorded)])
        return args.lr, args.decoder_lr_factor

    assert from_file({"lr": 0.02, "decoder_lr_factor": 0.1}) == (0.02, 0.1)
    assert from_file({}) == resolved["AlbuNet"]
    with pytest.raises(ArgsError, match="--decoder-lr-factor"):
        parse_config(["--demo", "--decoder-lr-factor", "0"])


def test_help_prints_the_per_architecture_defaults():
    text = " ".join(build_parser().format_help().split())  # it once broke on a bare % in a help string
    assert "(default: the architecture's, 0.003)" in text and "(default: the architecture's, 1; AlbuNet 0.33)" in text
    assert "(default: 30% of --epochs)" in text


def test_resuming_a_run_from_before_the_decoder_factor_keeps_its_optimizer(tmp_path):
    """A run folder whose train_args.json predates --decoder-lr-factor (and --bn-momentum) resumes as it
    started: one parameter group, PyTorch's BatchNorm momentum."""
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "train_args.json").write_text(json.dumps({"model": "AlbuNet", "lr": 1e-3, "project_dir": "."}))
    args = parse_config(["--resume", str(run)])
    assert (args.lr, args.decoder_lr_factor, args.bn_momentum) == (1e-3, 1.0, 0.1)


def test_decoder_parameter_groups_scale_through_the_schedule():
    model = build_model("AlbuNet", 2, None)
    groups = parameter_groups(model, 3e-3, 0.33)
    encoder = {id(p) for p in model.encoder.parameters()}
    assert [len(g["params"]) for g in groups] == [len(encoder), len(list(model.parameters())) - len(encoder)]
    assert all(id(p) in encoder for p in groups[0]["params"]) and not any(id(p) in encoder for p in groups[1]["params"])
    args = parse_config(["--demo", "--model", "AlbuNet", "--epochs", "2"])
    optimizer = build_optimizer("Adam", groups, 3e-3, 0.9, 0.0, False)
    scheduler, _ = build_scheduler(args.lr_schedule, optimizer, 5, **{k: getattr(args, k) for k in SCHEDULE_OPTIONS})
    for _ in range(7):  # through warmup into the decay: the decoder stays at 0.33x the encoder
        optimizer.step()
        scheduler.step()
        encoder_lr, decoder_lr = (g["lr"] for g in optimizer.param_groups)
        assert decoder_lr == pytest.approx(0.33 * encoder_lr)
    assert len(parameter_groups(model, 3e-3, 1.0)) == 1  # the layout of runs without the factor
    unet = parameter_groups(build_model("UNet", 2, None), 3e-3, 0.5)  # no encoder: all of it is decoder
    assert len(unet) == 1 and unet[0]["lr"] == pytest.approx(1.5e-3)


@pytest.mark.parametrize("order, expected", [("after", [1e-3, 1e-4, 1e-5]), ("before", [1e-4, 1e-5, 1e-6])])
def test_scheduler_order(tiny_project, tmp_path, order, expected):
    """The original stepped its epoch schedule before each epoch: every decay came an epoch early."""
    out = tmp_path / order
    main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--epochs", "3", "--lr", "1e-3",
                            "--lr-schedule", "StepLR", "--step-size", "1", "--scheduler-order", order,
                            "--val-interval", "3", "--output", str(out)])
    lrs = [json.loads(line)["lr"] for line in (out / "info" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx(expected)


def test_collapse_detection_on_known_matrices():
    names = ["__bg__", "thin"]
    matrix = ConfusionMatrix(2)
    matrix.update(torch.tensor([0] * 95 + [1] * 5), torch.zeros(100, dtype=torch.long))
    assert collapsed_class(matrix.matrix, names) == "__bg__"
    matrix.update(torch.tensor([1] * 5), torch.ones(5, dtype=torch.long))  # some thin pixels found
    assert collapsed_class(matrix.matrix, names) is None
    only_bg = ConfusionMatrix(2)
    only_bg.update(torch.zeros(50, dtype=torch.long), torch.zeros(50, dtype=torch.long))
    assert collapsed_class(only_bg.matrix, names) is None  # right answer, not a collapse


def test_collapse_warning_once_after_several_rounds():
    def history(flags):
        return [{"val_loss": 1.0, "collapsed_to": "__bg__" if f else None} for f in flags]
    assert not collapse_warning(history([True] * (COLLAPSE_ROUNDS - 1)), last_epoch=False)
    assert collapse_warning(history([True] * COLLAPSE_ROUNDS), last_epoch=False)
    assert not collapse_warning(history([True] * (COLLAPSE_ROUNDS + 1)), last_epoch=False)  # said already
    assert not collapse_warning(history([True, True, False]), last_epoch=True)
    assert collapse_warning(history([True]), last_epoch=True)  # a short run ending collapsed


def test_short_run_warns_how_many_epochs_it_needs(tiny_project, tmp_path):
    reporter = Messages()
    main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--epochs", "1", "--output", str(tmp_path / "run")],
         reporter=reporter)
    warnings = [text for level, text in reporter.messages if level == "warning" and "optimizer steps" in text]
    assert len(warnings) == 1
    steps = int(warnings[0].split("only ")[1].split()[0])
    assert 0 < steps < FEW_STEPS and f"--epochs to {-(-FEW_STEPS // steps)}" in warnings[0]


def test_collapsed_run_warns_with_advice(tiny_project, tmp_path):
    """Class weights that all but ignore the objects drive the original recipe onto the background;
    the run says so and what to try."""
    reporter = Messages()
    summary = main(TINY_TRAIN_ARGS + ["--project-dir", str(tiny_project), "--preset", "original", "--epochs", "2",
                                      "--jaccard-weight", "0", "--class-weights", "1", "1e-4", "1e-4", "1e-4",
                                      "--output", str(tmp_path / "run")], reporter=reporter)
    assert summary["final"]["collapsed_to"] == "__bg__"
    advice = [text for level, text in reporter.messages if level == "warning" and "collapsed" in text]
    assert len(advice) == 1
    # --jaccard-weight 0 switched the log-Jaccard term off; the original init and no clipping are the preset's.
    for tip in ("--jaccard-weight 0.5", "--init lsuv", "--class-weights", "--epochs", "--clip-grad-norm"):
        assert tip in advice[0], tip


# ---- the bench compares like with like ---------------------------------------------------

def _bench_module(name: str = "run"):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quality_guard_row_averages_seeds():
    bench = _bench_module()
    quality = {"seeds": [0, 1], "difference": 0.02, "difference_se": 0.001, "peak_rss_mb": 1.0,
               "ours": {"mean_fg_iou": 0.61, "per_seed": [0.6, 0.62], "seed_stdev": 0.014, "seconds": 5.0},
               "baseline": {"mean_fg_iou": 0.59, "per_seed": [0.58, 0.60], "seed_stdev": 0.014, "seconds": 9.0}}
    text = bench.table({"quality": quality})
    assert "demo mean fg IoU, mean of 2 seed(s) | 0.6100 (5 s/run) | 0.5900 (9 s/run) | Δ 0.0200 ± 0.0010 (1 SE) | < 0.01 ❌" in text
    assert "0.600, 0.620 (stdev 0.014)" in text and "0.580, 0.600 (stdev 0.014)" in text
    assert "int8" not in text  # results from before the int8 runtime
    quality["epochs"] = 8
    assert "demo mean fg IoU after 8 epochs, mean of 2 seed(s) |" in bench.table({"quality": quality})
    assert "mean of 2 seed(s) (10–11) |" in bench.table({"quality": {**quality, "seeds": [10, 11]}})
    quality["int8"] = [{"int8": 0.6, "float32": 0.62}, {"int8": 0.5, "float32": 0.5}, {"refused": "class 2: IoU 0.5"}]
    text = bench.table({"quality": quality})
    assert "best checkpoints (2 of 3): demo mean fg IoU | 0.5500 (int8) | 0.5600 (float32) | Δ -0.0100 |" in text
    assert "| ↳ int8 refused | class 2: IoU 0.5 |" in text


def test_bench_infer_rows_rate_the_int8_runtime_against_float32():
    bench = _bench_module()
    infer = {"device": "cpu", "image": "1067x800 JPEG", "peak_rss_mb": 1.0, "cuda_peak_mb": None,
             "models": {"UNet": {"baseline": 300.0, "ours": 120.0, "int8": 60.0, "int8_load_s": 4.0},
                        "LinkNet34": {"baseline": 160.0, "ours": 80.0, "int8": 40.0, "int8_load_s": 2.0}}}
    text = bench.table({"infer": infer})
    assert "| infer (geomean) | 97.98 ms | 219.1 ms | 2.24× | ≥ 3× ❌ |" in text
    assert "| infer UNet int8 runtime (load 4.0 s) | 60 ms | 300 ms | 5.00× |  |" in text
    assert "| infer int8 (geomean) | 48.99 ms | 219.1 ms | 4.47× | ≥ 3× ✅ |" in text
    for r in infer["models"].values():  # on a GPU there is no int8 runtime
        del r["int8"], r["int8_load_s"]
    assert "int8" not in bench.table({"infer": infer})


def test_a_failed_bench_section_keeps_the_others(monkeypatch, tmp_path, capsys):
    """A one-shot run on a lent GPU must not lose every table to one failing section: the others still run,
    each section's rows and the JSON so far appear as it ends, and the run exits 1 naming what failed."""
    bench = _bench_module()
    infer = {"device": "cuda", "image": "1067x800 JPEG", "peak_rss_mb": 1.0, "cuda_peak_mb": 2.0,
             "models": {"UNet": {"baseline": 30.0, "ours": 10.0}}}

    def run_section(name, args):
        if name == "train":
            raise RuntimeError("bench section train failed:\nTraceback ...\ntorch.OutOfMemoryError: CUDA out of memory")
        assert (tmp_path / "b.json").exists() is (name == "quality")  # written after infer, before quality
        if name == "quality":
            raise RuntimeError("bench section quality failed:\nValueError: no seeds")
        return infer
    monkeypatch.setattr(bench, "run_section", run_section)
    monkeypatch.setattr(bench, "machine", lambda: "test machine")
    assert bench.main(["--only", "train", "infer", "quality", "--json", str(tmp_path / "b.json")]) == 1
    out, err = capsys.readouterr()
    assert "| infer UNet, one 1067x800 JPEG end to end | 10 ms | 30 ms | 3.00× |  |" in out
    assert out.rstrip().endswith("Section train failed: torch.OutOfMemoryError: CUDA out of memory\n\n"
                                 "Section quality failed: ValueError: no seeds")
    assert "[bench] infer done in" in err and "| infer (geomean) | 10 ms | 30 ms | 3.00× |" in err
    assert json.loads((tmp_path / "b.json").read_text()) == {"infer": infer}


def test_bench_feed_trains_from_the_real_loader_and_a_synthetic_batch(monkeypatch):
    import argparse
    bench = _bench_module()
    monkeypatch.setattr(bench, "SIZE", 64)
    args = argparse.Namespace(device="cpu", quick=True, models=["UNet"], compile=False, workers=2)
    result = bench.bench_feed(args)
    assert result["workers"] == 2 and result["device"] == "cpu"
    row = result["models"]["UNet"]
    assert row["loader"] > 0 and row["synthetic"] > 0
    text = bench.table({"feed": result})
    assert "| feed UNet 64² b8: loader (2 workers, " in text and "vs synthetic batch on cpu |" in text
    assert "≥ 0.9×" not in text  # a GPU target
    result["device"], row["loader"], row["synthetic"] = "cuda", 85.0, 100.0
    assert "| 85 img/s | 100 img/s | 0.85× | ≥ 0.9× ❌ |" in bench.table({"feed": result})


def test_serve_bench_measures_int8_only_for_calibrated_runs(tmp_path, capsys):
    serve_bench = _bench_module("serve_bench")
    run = serve_bench.fixed_seed_run(tmp_path / "run", size=64)
    assert serve_bench.int8_if_calibrated(run) == ["pytorch", "pytorch-fp32", "onnx"]
    assert "no calibration images" in capsys.readouterr().out
    np.savez(RunFolder(run).calibration, images=np.zeros((1, 64, 64, 3), np.uint8))
    assert serve_bench.int8_if_calibrated(run) == ["pytorch", "pytorch-fp32", "pytorch-int8", "onnx"]


def test_bench_quality_guard_verdict_weighs_the_seed_noise():
    bench = _bench_module()
    verdict = bench.guard_verdict
    # paired by seed: a shared seed-to-seed swing cancels, a difference that changes sign does not
    assert bench.paired_se([0.5, 0.6, 0.7], [0.49, 0.59, 0.69]) == pytest.approx(0)
    assert bench.paired_se([0.5, 0.6], [0.52, 0.58]) == pytest.approx(0.02)
    assert np.isnan(bench.paired_se([0.5], [0.6]))
    assert verdict({"difference": 0.004, "difference_se": 0.02}) == "✅"
    assert verdict({"difference": 0.016, "difference_se": 0.005}) == "❔ within noise"
    assert verdict({"difference": 0.03, "difference_se": 0.005}) == "❌"
    assert verdict({"difference": 0.02, "difference_se": float("nan")}) == "❌"  # one seed: no spread to weigh


def test_bench_naive_loader_reads_the_same_masks(prepared, tmp_path, monkeypatch):
    import cv2
    bench = _bench_module()
    monkeypatch.setattr(bench, "SIZE", 32)
    project, items, names, _ = prepared
    model_classes = data.build_model_classes(project.meta, None)
    colors = [tuple(c.color) for c in model_classes]
    index_of = {n: i for i, n in enumerate(names)}
    samples = []
    for i, item in enumerate(items[:3]):
        _, mask = data.load_item(item, project.meta, index_of)
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.cvtColor(np.array(colors, np.uint8)[mask], cv2.COLOR_RGB2BGR))
        samples.append((item.image_path, tmp_path / f"{i}.png"))
    naive = bench.NaiveDataset(samples, colors)
    for i, item in enumerate(items[:3]):
        image, mask = naive[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        _, expected = data.load_item(item, project.meta, index_of)
        assert torch.equal(mask, torch.from_numpy(resize_mask(expected, 32, 32).astype(np.int64)))


def test_fp16_scaler_skips_are_reported():
    """A scale so large that every gradient overflows: each step is skipped, reported, and changes nothing."""
    torch.manual_seed(0)
    model = build_model("UNet", 2, "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    batch = (torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 2, (2, 32, 32), dtype=torch.uint8))
    skipped = []

    def summed(logits, masks):  # d(loss)/d(logit) = 1, so every scaled gradient is ~3e38 and its sums overflow
        return logits.float().sum()
    train_one_epoch(model, summed, optimizer, [batch, batch], torch.device("cpu"), epoch=1,
                    scaler=scaler, on_skip=skipped.append)
    assert skipped == [1, 2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A sane scale: no skips.
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, [batch], torch.device("cpu"), epoch=1,
                    scaler=scaler, on_skip=skipped.append)
    assert skipped == [1, 2]


def test_fp16_gradients_that_stay_nan_stop_the_run():
    """A finite loss whose gradients are NaN at every step: the scaler skips and halves its scale each time;
    once the scale is so small that only broken gradients can overflow, the run stops, weights untouched.
    The early skips of a scale that is merely too large (test above) do not stop anything."""
    torch.manual_seed(0)
    model = build_model("UNet", 2, "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 2, (2, 32, 32), dtype=torch.uint8))

    def nan_gradients(logits, masks):  # value 0, but d sqrt(u)/du at u = 0 is inf, times du/dlogit = 0: NaN
        return torch.sqrt((logits.float() * 0).abs()).sum()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -12)
    skipped = []
    with pytest.raises(NonFiniteLoss, match=r"fp16 gradients were still inf/NaN at epoch 3, iteration 5, with the "
                                            r"loss scale down to 7\.6\d*e-06"):
        train_one_epoch(model, nan_gradients, torch.optim.SGD(model.parameters(), lr=0.1), [batch] * 8,
                        torch.device("cpu"), epoch=3, scaler=scaler, on_skip=skipped.append)
    assert skipped == [1, 2, 3, 4, 5]  # 2^-12 halved five times: 2^-17, the first scale under 2^-16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fp16", [False, True])
def test_gradient_clipping_bounds_the_step(fp16):
    """SGD with lr 1 moves the weights by exactly the gradient: with clipping at 0.5 the whole step has
    norm 0.5 however steep the loss; without it, the step is the raw gradient's size."""
    batch = (torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 2, (2, 32, 32), dtype=torch.uint8))

    def steep(logits, masks):
        return 1e4 * torch.nn.functional.cross_entropy(logits.float(), masks)

    steps = {}
    for clip in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model("UNet", 2, "none")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if fp16 else None
        train_one_epoch(model, steep, torch.optim.SGD(model.parameters(), lr=1.0), [batch], torch.device("cpu"),
                        epoch=1, scaler=scaler, clip_grad_norm=clip)
        steps[clip] = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    assert steps[0.5] == pytest.approx(0.5, rel=1e-3)
    assert steps[0.0] > 100


@pytest.mark.parametrize("text", ["-1", "nan"])
def test_clip_grad_norm_flag_refuses_bad_values(text):
    with pytest.raises(ValueError, match="--clip-grad-norm"):
        parse_config(["--demo", "--clip-grad-norm", text])


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "fast"])
def test_bn_momentum_flag_refuses_bad_values(text):
    with pytest.raises(ValueError, match="--bn-momentum"):
        parse_config(["--demo", "--bn-momentum", text])


def test_bn_momentum_covers_about_an_epoch():
    """auto: the running statistics average about the last epoch (one iteration per epoch: that batch alone);
    never below PyTorch's 0.1. The original preset keeps 0.1."""
    model = build_model("LinkNet34", 2, "none")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for iterations, expected in ((1, 1.0), (4, 0.25), (10, 0.1), (500, 0.1)):
        assert set_bn_momentum(model, "auto", iterations) == expected
        assert {bn.momentum for bn in bns} == {expected}
    assert set_bn_momentum(model, 0.3, 1) == 0.3 and bns[-1].momentum == 0.3
    assert parse_config(["--demo"]).bn_momentum == "auto"
    assert parse_config(["--demo", "--preset", "original"]).bn_momentum == 0.1
    # momentum 1: after one training batch the statistics are that batch's own
    bn = torch.nn.BatchNorm2d(3)
    set_bn_momentum(bn, "auto", 1)
    x = torch.randn(8, 3, 5, 5) * 4 + 2
    bn.train()(x)
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)


def test_warmup_is_a_share_of_the_run():
    assert parse_config(["--demo", "--epochs", "10"]).warmup_epochs == 3.0
    assert parse_config(["--demo", "--epochs", "40"]).warmup_epochs == 12.0
    assert parse_config(["--demo", "--epochs", "10", "--warmup-epochs", "1"]).warmup_epochs == 1.0
    with pytest.raises(ValueError, match="--warmup-epochs"):
        parse_config(["--demo", "--warmup-epochs", "-1"])


@pytest.mark.parametrize("channels", [1, 3, 7])
def test_probability_resize_matches_torch_bilinear(channels):
    from custom_net.inference import resize_probabilities
    probs = torch.rand(channels, 40, 56).softmax(0)
    expected = torch.nn.functional.interpolate(probs[None], size=(101, 77), mode="bilinear", align_corners=False)[0]
    resized = resize_probabilities(probs, 101, 77)
    assert resized.shape == (channels, 101, 77)
    assert torch.allclose(resized, expected, atol=1e-5)
