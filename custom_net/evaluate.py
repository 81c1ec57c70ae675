"""Evaluate a trained checkpoint on a Supervisely project: metrics, pictures, a speed test and one
self-contained HTML report, written to ``<run>/eval/`` unless ``--output`` says otherwise.

    python custom_net/evaluate.py --checkpoint results/exp1 --project-dir data/project \\
        --split-file results/exp1/info/val_set.json --device cpu --mode whole

``run_evaluation(...)`` is the function behind the CLI; training calls ``evaluate_training_run``
at the end of a run. Both return the headline metrics and the report's path.
"""
from __future__ import annotations

import argparse
import heapq
import logging
import math
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from custom_net import sly_seg_dataset as data
from custom_net.run_folder import RunFolder, resolve_checkpoint
from custom_net.inference import INFERENCE_MODES, TrainedModel, load_trained_model, predict_image
from custom_net.quantize import QuantizationError, quantize_trained
from custom_net.epoch import forward_batch
from custom_net.hardware import AMP_MODES, device_name, dtype_name, resolve_amp, select_device, synchronize
from custom_net.report import (HEADLINE_METRICS, METRIC_LABELS, fmt, json_safe, plot_confusion_matrix,
                               plot_per_class, plot_speed, write_report)
from custom_net.storage import atomic_write_json
from custom_net.validation import BoundaryIoU, ConfusionMatrix
from custom_net.visualize import save_png, worst_panel

logger = logging.getLogger("custom_net")

EVAL_RUNTIMES = ("pytorch", "int8")


class EvalError(ValueError):
    """Bad evaluation input; the message names the flag or file."""


# ---- input ---------------------------------------------------------------------------------

def select_items(project, split_file: str | Path | None) -> list[data.Item]:
    """All items of the project, or those a split file (e.g. ``<run>/info/val_set.json``) lists."""
    items = data.list_items(project)
    if split_file is None:
        return items
    try:  # the same file on both sides: split_from_files' reading, checks and messages
        return data.split_from_files(items, str(split_file), str(split_file))[1]
    except data.DataError as e:
        if str(e).endswith("set is empty"):
            raise EvalError(f"--split-file: {split_file} lists no items") from None
        raise EvalError(f"--split-file: {e}") from None


# ---- metrics over a set of items -------------------------------------------------------------

def evaluate_items(trained, meta, items: list[data.Item], device: torch.device, amp_dtype=None, mode: str = "whole",
                   overlap: float = 0.25, boundary_width: int = 3, worst: int = 5, progress=None) -> dict:
    """Predict every item at its own resolution and compare with its annotation.

    Returns ``metrics`` (over all pixels of all items), ``per_image`` records and the ``worst``
    images by foreground IoU as (record, panel) pairs, lowest first.
    """
    class_names = [c.name for c in trained.model_classes]
    colors = [c.color for c in trained.model_classes]
    class_to_index = {name: i for i, name in enumerate(class_names)}
    total = ConfusionMatrix(len(class_names), device)
    boundary = BoundaryIoU(len(class_names), boundary_width, device)
    # Min-heap of (-score, -n, record, panel): its top is the best of the kept worst (on ties, the later item).
    per_image, heap = [], []
    started = time.perf_counter()
    for n, item in enumerate(items):
        image, truth = data.load_item(item, meta, class_to_index)
        probs = predict_image(trained.model, image, trained.input_height, trained.input_width, device, amp_dtype,
                              mode, overlap)
        prediction = probs.argmax(0)
        truth_t = torch.from_numpy(truth).to(device)
        single = ConfusionMatrix(len(class_names), device)
        single.update(truth_t, prediction)
        total.add(single)
        boundary.update(truth_t, prediction)
        m = single.metrics(class_names)
        # No foreground in either mask means nothing was wrong: such an image ranks as perfect.
        score = 1.0 if math.isnan(m["mean_fg_iou"]) else m["mean_fg_iou"]
        record = {**item.key, "width": image.shape[1], "height": image.shape[0], "mean_fg_iou": m["mean_fg_iou"],
                  "mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"], "iou": m["iou"]}
        per_image.append(record)
        if worst > 0 and (len(heap) < worst or score < -heap[0][0]):
            panel = worst_panel(image, truth, prediction.to(torch.uint8).cpu().numpy(), colors,
                                 data.background_index(class_names))
            entry = (-score, -n, record, panel)
            heapq.heappush(heap, entry) if len(heap) < worst else heapq.heappushpop(heap, entry)
        if progress is not None:
            progress(n + 1, len(items))
    metrics = total.full_metrics(class_names)
    metrics.update(boundary.metrics(class_names))
    worst_list = [(record, panel) for _, _, record, panel in sorted(heap, key=lambda e: (-e[0], -e[1]))]
    return {"metrics": metrics, "per_image": per_image, "worst": worst_list,
            "seconds_per_image": (time.perf_counter() - started) / max(1, len(items))}


# ---- speed test --------------------------------------------------------------------------------

@torch.inference_mode()
def speed_test(model, height: int, width: int, device: torch.device, batch_sizes=(1, 8), amp: str = "auto",
               min_seconds: float = 0.3, max_iterations: int = 20) -> dict:
    """Milliseconds per image of the model's forward pass (normalisation included) at its input size,
    for each batch size, in float32 / contiguous and with the fast path (``--amp`` dtype + channels_last).

    Each case runs a warm-up batch, then batches until ``min_seconds`` have passed (at most
    ``max_iterations``).
    """
    model.eval()
    fast_dtype = resolve_amp(amp, device)
    generator = torch.Generator().manual_seed(0)  # not the global RNG: evaluation must not change training's
    cases = []
    for fast in (False, True):
        dtype = fast_dtype if fast else None
        memory_format = torch.channels_last if fast else torch.contiguous_format
        model.to(memory_format=memory_format)
        for batch_size in batch_sizes:
            images = torch.randint(0, 256, (batch_size, height, width, 3), dtype=torch.uint8, generator=generator)
            no_masks = torch.empty(0)
            forward_batch(model, images, no_masks, device, dtype, memory_format)  # warm-up: kernel choice, caches
            synchronize(device)
            count, start = 0, time.perf_counter()
            while count < 1 or (count < max_iterations and time.perf_counter() - start < min_seconds):
                forward_batch(model, images, no_masks, device, dtype, memory_format)
                synchronize(device)
                count += 1
            ms = (time.perf_counter() - start) * 1000 / (count * batch_size)
            cases.append({"batch_size": batch_size, "fast_path": fast,
                          "dtype": dtype_name(dtype),
                          "memory_format": "channels_last" if fast else "contiguous",
                          "ms_per_image": ms, "images_per_second": 1000 / ms, "batches_timed": count})
    model.to(memory_format=torch.contiguous_format)
    return {"device": device_name(device), "input_height": height, "input_width": width, "cases": cases}


# ---- the whole evaluation ------------------------------------------------------------------------

def run_evaluation(checkpoint: str | Path, project_dir: str | Path, output: str | Path | None = None, *,
                   items: list[data.Item] | None = None, split_file: str | Path | None = None,
                   device: str | torch.device = "auto", mode: str = "whole", overlap: float = 0.25,
                   amp: str = "auto", runtime: str = "pytorch", boundary_width: int = 3, worst: int = 5,
                   speed: bool = True, speed_batch: int = 8, progress=None) -> dict:
    """Evaluate ``checkpoint`` (a .pth or a run folder) on ``items`` (default: the project's items, or
    those ``split_file`` lists) and write JSON, pictures and ``report.html`` to ``output``
    (default ``<run>/eval``). Returns ``{"headline": {...}, "report": path, ...}`` for the CLI,
    the training summary and the dashboard. ``progress(done, total)`` is called after each item."""
    _check_options(mode, amp, runtime, overlap, boundary_width, worst, speed_batch)
    checkpoint, device, trained = _load(checkpoint, "cpu" if runtime == "int8" and device == "auto" else device)
    project = data.open_project(project_dir)
    items = select_items(project, split_file) if items is None else items
    notes = _class_notes([c.name for c in trained.model_classes], project, project_dir)
    predicting, amp_dtype, precision = _runtime(trained, runtime, amp, device)
    result = evaluate_items(predicting, project.meta, items, device, amp_dtype, mode, overlap, boundary_width,
                            worst, progress)
    speed_result = None
    if speed:  # the fast path is timed even when evaluating in float32 (--amp off)
        speed_result = speed_test(trained.model, trained.input_height, trained.input_width, device,
                                  batch_sizes=sorted({1, speed_batch}), amp="auto" if amp == "off" else amp)
    info = {"checkpoint": str(checkpoint), "model": trained.model_name, "classes": [c.name for c in trained.model_classes],
            "project_dir": str(project_dir), "split_file": str(split_file) if split_file else None,
            "items": len(items), "mode": mode, "overlap": overlap if mode == "sliding" else None,
            "input_height": trained.input_height, "input_width": trained.input_width,
            "device": device_name(device), "amp": precision,
            "seconds_per_image": result["seconds_per_image"], "warnings": notes,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    output = Path(output) if output is not None else RunFolder.of_checkpoint(checkpoint).eval
    return _write_outputs(output, info, result, speed_result)


def _check_options(mode, amp, runtime, overlap, boundary_width, worst, speed_batch) -> None:
    if mode not in INFERENCE_MODES:
        raise EvalError(f"--mode: unknown inference mode {mode!r}; choose from {', '.join(INFERENCE_MODES)}")
    if amp not in AMP_MODES:
        raise EvalError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if runtime not in EVAL_RUNTIMES:
        raise EvalError(f"--runtime must be one of {', '.join(EVAL_RUNTIMES)}, got {runtime!r}")
    if not 0 <= overlap < 1:
        raise EvalError(f"--overlap must be in [0, 1), got {overlap}")
    if boundary_width < 1 or worst < 0 or speed_batch < 1:
        raise EvalError("--boundary-width and --speed-batch must be >= 1, --worst >= 0")


def _load(checkpoint, device) -> tuple[Path, torch.device, TrainedModel]:
    """The checkpoint (of a run folder), the device and the model; EvalError naming the flag otherwise."""
    try:
        checkpoint = resolve_checkpoint(checkpoint)
    except FileNotFoundError as e:
        raise EvalError(f"--checkpoint: {e}") from None
    if not isinstance(device, torch.device):
        try:
            device = select_device(device)
        except ValueError as e:  # select_device speaks of training's flag
            raise EvalError(str(e).replace("--gpu-id", "--device")) from None
    try:
        return checkpoint, device, load_trained_model(checkpoint, device)
    except (FileNotFoundError, ValueError) as e:  # their messages name the file
        raise EvalError(f"--checkpoint: {e}") from None


def _class_notes(class_names: list[str], project, project_dir) -> list[str]:
    """Warnings for the model's classes the project lacks; EvalError when it has none of them."""
    objects = [n for n in class_names if n != data.BG_CLASS]
    missing = [n for n in objects if project.meta.obj_classes.get(n) is None]
    if len(missing) == len(objects):
        known = ", ".join(c.name for c in project.meta.obj_classes) or "none"
        raise EvalError(f"--project-dir: {project_dir} has none of the model's classes "
                        f"({', '.join(objects)}); it has: {known}")
    return [f"the project has no class {n!r}: its ground truth is empty" for n in missing]


def _runtime(trained: TrainedModel, runtime: str, amp: str, device: torch.device):
    """(the model to predict with, its autocast dtype, the precision's name)."""
    amp_dtype = resolve_amp(amp, device)
    if runtime != "int8":
        return trained, amp_dtype, dtype_name(amp_dtype)
    try:
        return replace(trained, model=quantize_trained(trained)), None, "int8"
    except QuantizationError as e:
        raise EvalError(f"--runtime int8: {e}") from None


def _write_outputs(output: Path, info: dict, result: dict, speed_result: dict | None) -> dict:
    """metrics.json, per_image.json, worst.json (and worst/NN.png), speed.json, the pictures and report.html."""
    (output / "worst").mkdir(parents=True, exist_ok=True)
    for old in (output / "worst").glob("*.png"):  # a re-run replaces the previous report's panels
        old.unlink()
    worst_records = []
    for rank, (record, panel) in enumerate(result["worst"], 1):
        name = f"worst/{rank:02d}.png"
        save_png(output / name, panel)
        worst_records.append({**record, "rank": rank, "panel": name})
    metrics, class_names = result["metrics"], info["classes"]
    pictures = {"confusion_matrix": plot_confusion_matrix(metrics, class_names, output / "confusion_matrix.png"),
                "per_class": plot_per_class(metrics, class_names, output / "per_class.png")}
    if speed_result is not None:
        pictures["speed"] = plot_speed(speed_result, output / "speed.png")
        atomic_write_json(output / "speed.json", speed_result)
    headline = {k: metrics[k] for k in HEADLINE_METRICS}
    atomic_write_json(output / "metrics.json", json_safe({**info, "headline": headline, "metrics": metrics}))
    atomic_write_json(output / "per_image.json", json_safe(result["per_image"]))
    atomic_write_json(output / "worst.json", json_safe(worst_records))
    report = write_report(output, info, metrics, result["per_image"], worst_records, speed_result, pictures)
    return json_safe({"checkpoint": info["checkpoint"], "items": info["items"], "headline": headline,
                      "report": str(report), "output_dir": str(output), "metrics_json": str(output / "metrics.json"),
                      "speed": speed_result["cases"] if speed_result else None, "warnings": info["warnings"]})


def evaluate_training_run(summary: dict, project_dir: str, items: list[data.Item], device: torch.device,
                          amp: str, speed: bool, batch_size: int, report) -> dict | None:
    """The end-of-training evaluation of the best checkpoint (else the last) on the validation items,
    written to ``<run>/eval``; the speed test's larger batch is the training batch size.
    A failure is reported, never raised: the trained model is kept."""
    checkpoint = (summary.get("best") or {}).get("checkpoint") or summary.get("last_checkpoint")
    if not checkpoint:
        report("warning", "evaluation skipped: no best or last checkpoint was saved (--save-best / --save-last)")
        return None
    report("info", f"evaluating {Path(checkpoint).name} on {len(items)} validation item(s)")
    try:
        result = run_evaluation(checkpoint, project_dir, RunFolder(summary["output_dir"]).eval, items=items,
                                device=device, amp=amp, speed=speed, speed_batch=batch_size)
    except Exception as e:  # noqa: BLE001 - the run's checkpoints matter more than its report
        logger.exception("evaluation failed")
        report("error", f"evaluation failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    headline = result["headline"]
    report("info", f"evaluation: mean foreground IoU {fmt(headline['mean_fg_iou'])}, pixel accuracy "
                   f"{fmt(headline['pixel_accuracy'])}; report: {result['report']}")
    return result


# ---- command line --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise, so main(argv) callers get an exception and cli() one exit code
        raise EvalError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="custom_net/evaluate.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model_*.pth in <run>/checkpoints/, or a run folder (its best checkpoint)")
    p.add_argument("--project-dir", required=True, help="Supervisely-format project folder with ground truth")
    p.add_argument("--split-file", help="evaluate only the items this JSON lists, e.g. <run>/info/val_set.json (default: all)")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda:N', or 'auto' (first GPU if any)")
    p.add_argument("--mode", choices=INFERENCE_MODES, default="whole", help="whole image resized to the training size, or sliding window at full resolution")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding window: tile overlap")
    p.add_argument("--amp", choices=AMP_MODES, default="auto", help="inference precision (auto = bf16 where the device runs it fast)")
    p.add_argument("--runtime", choices=EVAL_RUNTIMES, default="pytorch",
                   help="pytorch (--amp), or int8 on the CPU: what serving with UNET_RUNTIME=int8 would score")
    p.add_argument("--boundary-width", type=int, default=3, help="boundary IoU band width in pixels")
    p.add_argument("--worst", type=int, default=5, help="how many worst images to show")
    p.add_argument("--speed-test", action=argparse.BooleanOptionalAction, default=True, help="time the model")
    p.add_argument("--speed-batch", type=int, default=8, help="the larger batch size of the speed test (besides 1)")
    p.add_argument("--output", help="report folder (default: <run>/eval)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm
    bar = None

    def progress(done, total):  # the bar appears once the input is checked and items are being evaluated
        nonlocal bar
        bar = bar or tqdm(total=total, desc="evaluating", unit="img", file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        return run_evaluation(args.checkpoint, args.project_dir, args.output, split_file=args.split_file,
                              device=args.device, mode=args.mode, overlap=args.overlap, amp=args.amp,
                              runtime=args.runtime,
                              boundary_width=args.boundary_width, worst=args.worst, speed=args.speed_test,
                              speed_batch=args.speed_batch, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    warnings.formatwarning = lambda message, category, *_: f"[warning] {message}\n"
    try:
        result = main(argv)
    except (EvalError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"[warning] {warning}", file=sys.stderr)
    for key, value in result["headline"].items():
        print(f"{METRIC_LABELS[key]:32s} {fmt(value)}")
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
