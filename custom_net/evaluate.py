"""Evaluate a trained checkpoint on a Supervisely project: metrics, pictures, a speed test and one
self-contained HTML report, written to ``<run>/eval/`` unless ``--output`` says otherwise.

    python custom_net/evaluate.py --checkpoint results/exp1 --project-dir data/project \\
        --split-file results/exp1/info/val_set.json --device cpu --mode whole

``run_evaluation(...)`` is the function behind the CLI; training calls ``evaluate_training_run``
at the end of a run. Both return the headline metrics and the report's path.
"""
from __future__ import annotations

import argparse
import base64
import heapq
import html
import logging
import math
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from custom_net import sly_seg_dataset as data
from custom_net.run_folder import RunFolder, resolve_checkpoint
from custom_net.inference import INFERENCE_MODES, load_trained_model, predict_image
from custom_net.preprocessing import resize_image, resize_mask
from custom_net.quantize import QuantizationError, quantize_trained
from custom_net.epoch import forward_batch
from custom_net.hardware import AMP_MODES, device_name, dtype_name, resolve_amp, select_device, synchronize
from custom_net.storage import atomic_write, atomic_write_json, atomic_write_text
from custom_net.validation import BoundaryIoU, ConfusionMatrix
from custom_net.visualize import preview_panel, save_png

logger = logging.getLogger("custom_net")

EVAL_RUNTIMES = ("pytorch", "int8")
HEADLINE_METRICS = ("mean_fg_iou", "mean_iou", "mean_fg_dice", "pixel_accuracy", "frequency_weighted_iou",
                    "mean_fg_boundary_iou", "mean_fg_precision", "mean_fg_recall")
METRIC_LABELS = {
    "mean_fg_iou": "mean IoU (foreground classes)", "mean_iou": "mean IoU (all classes)",
    "mean_fg_dice": "mean Dice (foreground)", "mean_dice": "mean Dice (all classes)",
    "pixel_accuracy": "pixel accuracy", "frequency_weighted_iou": "frequency-weighted IoU",
    "mean_fg_boundary_iou": "mean boundary IoU (foreground)", "mean_boundary_iou": "mean boundary IoU (all)",
    "mean_fg_precision": "mean precision (foreground)", "mean_fg_recall": "mean recall (foreground)",
}
# Error overlay colours (RGB): ground-truth object missed, background predicted as an object, wrong class.
MISSED, FALSE_ALARM, WRONG_CLASS = (230, 40, 40), (40, 110, 255), (255, 200, 0)
PANEL_SIDE = 320  # worst-image panels are scaled so each of their four parts is about this big


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

def error_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, background: int | None = 0) -> np.ndarray:
    """The image dimmed to grey with every wrong pixel coloured by the kind of error (``background`` is the
    class id of __bg__)."""
    grey = (image.mean(axis=2, keepdims=True) * 0.5).astype(np.uint8).repeat(3, axis=2)
    out = grey.copy()
    wrong = truth != prediction
    out[wrong & (prediction == background)] = MISSED
    out[wrong & (truth == background)] = FALSE_ALARM
    out[wrong & (truth != background) & (prediction != background)] = WRONG_CLASS
    return out


def _worst_panel(image, truth, prediction, colors, background) -> np.ndarray:
    """image | ground truth | prediction | errors, scaled down for the report."""
    scale = min(4.0, PANEL_SIDE / max(image.shape[:2]))  # small images are enlarged (at most 4x) to be seen
    if scale != 1:
        h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
        image, truth, prediction = resize_image(image, h, w), resize_mask(truth, h, w), resize_mask(prediction, h, w)
    panel = preview_panel(image, truth, prediction, colors, background)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panel, gap, error_overlay(image, truth, prediction, background)], axis=1)


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
            panel = _worst_panel(image, truth, prediction.to(torch.uint8).cpu().numpy(), colors,
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


# ---- pictures ---------------------------------------------------------------------------------

def _figure(width: float, height: float):
    # Figure + Agg canvas, not pyplot: no global state, safe in the training worker thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_confusion_matrix(metrics: dict, class_names: list[str], path: Path) -> Path:
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    normalized = np.asarray(metrics["confusion_matrix_normalized"], dtype=np.float64)
    n = len(class_names)
    fig = _figure(2.2 + 0.9 * n, 1.8 + 0.8 * n)
    ax = fig.add_subplot()
    shown = ax.imshow(np.nan_to_num(normalized), vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth row")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if n <= 12:
        for r in range(n):
            for c in range(n):
                value = normalized[r, c]
                text = "-" if math.isnan(value) else f"{value:.1%}\n{counts[r, c]:,}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7,
                        color="white" if not math.isnan(value) and value > 0.5 else "black")
    ax.set_title("confusion matrix (row-normalised, with pixel counts)")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    return path


def plot_per_class(metrics: dict, class_names: list[str], path: Path) -> Path:
    series = [("IoU", metrics["iou"]), ("Dice", metrics["dice"]), ("precision", metrics["precision"]),
              ("recall", metrics["recall"]), ("boundary IoU", metrics["boundary_iou"])]
    fig = _figure(max(6.0, 1.4 * len(class_names) + 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(class_names))
    for k, (label, values) in enumerate(series):
        heights = [values[name] for name in class_names]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, np.nan_to_num(heights), width, label=label)
    ax.set_xticks(x, class_names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (undefined = 0)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title("per-class metrics")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    return path


def plot_speed(speed: dict, path: Path) -> Path:
    cases = speed["cases"]
    labels = [f"batch {c['batch_size']}, {c['dtype']}, {c['memory_format']}" for c in cases]
    fig = _figure(7, 1.2 + 0.5 * len(cases))
    ax = fig.add_subplot()
    ax.barh(range(len(cases)), [c["ms_per_image"] for c in cases],
            color=["#2a9d8f" if c["fast_path"] else "#8d99ae" for c in cases])
    ax.set_yticks(range(len(cases)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (lower is better)")
    ax.set_title(f"{speed['device']}, input {speed['input_width']}x{speed['input_height']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    return path


# ---- JSON and HTML -------------------------------------------------------------------------------

def json_safe(value):
    """NaN (an undefined metric) becomes null: strict JSON readers (browsers) reject NaN."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2%}" if percent else f"{value:.4f}"


def _img(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _table(header: list[str] | None, rows: list[list], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table id="{table_id}">{head}<tbody>{body}</tbody></table>'


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f0f0f0}img{max-width:100%;display:block;margin:6px 0}
.note{color:#666;font-size:90%}.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}
figure{margin:12px 0}figcaption{font-size:90%}#run-info td{text-align:left}"""


def write_report(output: Path, info: dict, metrics: dict, per_image: list[dict], worst: list[dict],
                 speed: dict | None, pictures: dict[str, Path]) -> Path:
    """``report.html``: one file, images embedded as base64, no scripts or links: opens offline anywhere."""
    names = info["classes"]
    parts = [f"<h1>Evaluation: {html.escape(info['model'])}</h1>",
             _table(None, [[k, v] for k, v in [
                 ("checkpoint", info["checkpoint"]), ("project", info["project_dir"]),
                 ("items", info["items"]), ("split file", info["split_file"] or "all items of the project"),
                 ("inference", f"{info['mode']} at {info['input_width']}x{info['input_height']}"),
                 ("device / precision", f"{info['device']} / {info['amp']}"), ("evaluated", info["date"])]],
                    "run-info")]
    for warning in info["warnings"]:
        parts.append(f'<p class="note">warning: {html.escape(warning)}</p>')
    parts += ["<h2>Metrics</h2>",
              _table(["metric", "value"], [[METRIC_LABELS[k], _fmt(metrics[k])] for k in
                                           ("mean_fg_iou", "mean_iou", "mean_fg_dice", "mean_dice", "pixel_accuracy",
                                            "frequency_weighted_iou", "mean_fg_boundary_iou", "mean_boundary_iou",
                                            "mean_fg_precision", "mean_fg_recall")], "metrics"),
              f'<p class="note">Computed over all pixels of all items at their own resolution. Boundary IoU: '
              f'bands of {metrics["boundary_width"]} px inside each class edge. "n/a": the class is in neither '
              f'ground truth nor prediction (or never predicted, for precision).</p>',
              "<h2>Per class</h2>",
              _table(["class", "IoU", "Dice", "precision", "recall", "boundary IoU", "ground-truth pixels"],
                     [[n, _fmt(metrics["iou"][n]), _fmt(metrics["dice"][n]), _fmt(metrics["precision"][n]),
                       _fmt(metrics["recall"][n]), _fmt(metrics["boundary_iou"][n]), f"{metrics['support'][n]:,}"]
                      for n in names], "per-class"),
              _img(pictures["per_class"], "per-class metrics"),
              "<h2>Confusion matrix</h2><p class='note'>Rows: ground truth, columns: prediction.</p>",
              _table(["ground truth \\ prediction"] + names,
                     [[n] + [f"{c:,}" for c in row] for n, row in zip(names, metrics["confusion_matrix"])],
                     "confusion-counts"),
              _table(["ground truth \\ prediction"] + names,
                     [[n] + [_fmt(v, percent=True) for v in row]
                      for n, row in zip(names, metrics["confusion_matrix_normalized"])], "confusion-normalized"),
              _img(pictures["confusion_matrix"], "confusion matrix heatmap"),
              f"<h2>Worst {len(worst)} image(s) by foreground IoU</h2>",
              "<p class='note'>image | ground truth | prediction | errors:"
              + "".join(f"<span class='swatch' style='background:rgb{c}'></span>{t}" for c, t in
                        ((MISSED, "object missed"), (FALSE_ALARM, "background predicted as object"),
                         (WRONG_CLASS, "wrong class"))) + "</p>"]
    for entry in worst:
        caption = (f"{entry['dataset_name']}/{entry['item_name']}: foreground IoU {_fmt(entry['mean_fg_iou'])}, "
                   f"pixel accuracy {_fmt(entry['pixel_accuracy'])}")
        parts.append(f"<figure>{_img(output / entry['panel'], caption)}<figcaption>{html.escape(caption)}"
                     "</figcaption></figure>")
    if speed is not None:
        parts += [f"<h2>Speed</h2><p>{html.escape(speed['device'])}; model forward pass with normalisation at "
                  f"{speed['input_width']}x{speed['input_height']} (image decoding and resizing not included).</p>",
                  _table(["batch size", "precision", "memory format", "ms / image", "images / s"],
                         [[c["batch_size"], c["dtype"], c["memory_format"], f"{c['ms_per_image']:.2f}",
                           f"{c['images_per_second']:.1f}"] for c in speed["cases"]], "speed"),
                  _img(pictures["speed"], "speed test")]
    rows = [[f"{r['dataset_name']}/{r['item_name']}", _fmt(r["mean_fg_iou"]), _fmt(r["mean_iou"]),
             _fmt(r["pixel_accuracy"])] for r in sorted(per_image, key=_rank_score)]
    parts.append(f"<details><summary>All {len(rows)} image(s), worst first</summary>"
                 + _table(["item", "foreground IoU", "mean IoU", "pixel accuracy"], rows, "per-image") + "</details>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = output / "report.html"
    atomic_write_text(path, page)
    return path


def _rank_score(record: dict) -> float:
    value = record["mean_fg_iou"]
    return 1.0 if value is None or math.isnan(value) else value


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
    if mode not in INFERENCE_MODES:
        raise EvalError(f"--mode: unknown inference mode {mode!r}; choose from {', '.join(INFERENCE_MODES)}")
    if amp not in AMP_MODES:
        raise EvalError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if runtime not in EVAL_RUNTIMES:
        raise EvalError(f"--runtime must be one of {', '.join(EVAL_RUNTIMES)}, got {runtime!r}")
    if runtime == "int8" and device == "auto":
        device = "cpu"
    if not 0 <= overlap < 1:
        raise EvalError(f"--overlap must be in [0, 1), got {overlap}")
    if boundary_width < 1 or worst < 0 or speed_batch < 1:
        raise EvalError("--boundary-width and --speed-batch must be >= 1, --worst >= 0")
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
        trained = load_trained_model(checkpoint, device)
    except (FileNotFoundError, ValueError) as e:  # their messages name the file
        raise EvalError(f"--checkpoint: {e}") from None
    project = data.open_project(project_dir)
    if items is None:
        items = select_items(project, split_file)
    class_names = [c.name for c in trained.model_classes]
    objects = [n for n in class_names if n != data.BG_CLASS]
    missing = [n for n in objects if project.meta.obj_classes.get(n) is None]
    if len(missing) == len(objects):
        known = ", ".join(c.name for c in project.meta.obj_classes) or "none"
        raise EvalError(f"--project-dir: {project_dir} has none of the model's classes "
                        f"({', '.join(objects)}); it has: {known}")
    notes = [f"the project has no class {n!r}: its ground truth is empty" for n in missing]
    amp_dtype = resolve_amp(amp, device)
    predicting, precision = trained, dtype_name(amp_dtype)
    if runtime == "int8":
        try:
            predicting, amp_dtype, precision = replace(trained, model=quantize_trained(trained)), None, "int8"
        except QuantizationError as e:
            raise EvalError(f"--runtime int8: {e}") from None

    output = Path(output) if output is not None else RunFolder.of_checkpoint(checkpoint).eval
    (output / "worst").mkdir(parents=True, exist_ok=True)
    for old in (output / "worst").glob("*.png"):  # a re-run replaces the previous report's panels
        old.unlink()

    result = evaluate_items(predicting, project.meta, items, device, amp_dtype, mode, overlap, boundary_width,
                            worst, progress)
    metrics = result["metrics"]
    worst_records = []
    for rank, (record, panel) in enumerate(result["worst"], 1):
        name = f"worst/{rank:02d}.png"
        save_png(output / name, panel)
        worst_records.append({**record, "rank": rank, "panel": name})
    speed_result = None
    if speed:  # the fast path is timed even when evaluating in float32 (--amp off)
        speed_result = speed_test(trained.model, trained.input_height, trained.input_width, device,
                                  batch_sizes=sorted({1, speed_batch}), amp="auto" if amp == "off" else amp)
    pictures = {"confusion_matrix": plot_confusion_matrix(metrics, class_names, output / "confusion_matrix.png"),
                "per_class": plot_per_class(metrics, class_names, output / "per_class.png")}
    if speed_result is not None:
        pictures["speed"] = plot_speed(speed_result, output / "speed.png")

    info = {"checkpoint": str(checkpoint), "model": trained.model_name, "classes": class_names,
            "project_dir": str(project_dir), "split_file": str(split_file) if split_file else None,
            "items": len(items), "mode": mode, "overlap": overlap if mode == "sliding" else None,
            "input_height": trained.input_height, "input_width": trained.input_width,
            "device": device_name(device), "amp": precision,
            "seconds_per_image": result["seconds_per_image"], "warnings": notes,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    headline = {k: metrics[k] for k in HEADLINE_METRICS}
    atomic_write_json(output / "metrics.json", json_safe({**info, "headline": headline, "metrics": metrics}))
    atomic_write_json(output / "per_image.json", json_safe(result["per_image"]))
    atomic_write_json(output / "worst.json", json_safe(worst_records))
    if speed_result is not None:
        atomic_write_json(output / "speed.json", speed_result)
    report = write_report(output, info, metrics, result["per_image"], worst_records, speed_result, pictures)
    return json_safe({"checkpoint": str(checkpoint), "items": len(items), "headline": headline,
                      "report": str(report), "output_dir": str(output), "metrics_json": str(output / "metrics.json"),
                      "speed": speed_result["cases"] if speed_result else None, "warnings": notes})


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
    report("info", f"evaluation: mean foreground IoU {_fmt(headline['mean_fg_iou'])}, pixel accuracy "
                   f"{_fmt(headline['pixel_accuracy'])}; report: {result['report']}")
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
        print(f"{METRIC_LABELS[key]:32s} {_fmt(value)}")
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
