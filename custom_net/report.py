"""The evaluation's report: its pictures (matplotlib ``Figure`` objects, no pyplot: safe in the dashboard's
training thread) and one self-contained HTML page (images embedded, no scripts or links: opens offline)."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from custom_net.storage import atomic_write_text
from custom_net.visualize import FALSE_ALARM, MISSED, WRONG_CLASS, figure, save_figure

HEADLINE_METRICS = ("mean_fg_iou", "mean_iou", "mean_fg_dice", "pixel_accuracy", "frequency_weighted_iou",
                    "mean_fg_boundary_iou", "mean_fg_precision", "mean_fg_recall")
METRIC_LABELS = {
    "mean_fg_iou": "mean IoU (foreground classes)", "mean_iou": "mean IoU (all classes)",
    "mean_fg_dice": "mean Dice (foreground)", "mean_dice": "mean Dice (all classes)",
    "pixel_accuracy": "pixel accuracy", "frequency_weighted_iou": "frequency-weighted IoU",
    "mean_fg_boundary_iou": "mean boundary IoU (foreground)", "mean_boundary_iou": "mean boundary IoU (all)",
    "mean_fg_precision": "mean precision (foreground)", "mean_fg_recall": "mean recall (foreground)",
}


# ---- pictures ----------------------------------------------------------------------------------

def plot_confusion_matrix(metrics: dict, class_names: list[str], path: Path) -> Path:
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    normalized = np.asarray(metrics["confusion_matrix_normalized"], dtype=np.float64)
    n = len(class_names)
    fig = figure(2.2 + 0.9 * n, 1.8 + 0.8 * n)
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
    return save_figure(fig, path)


def plot_per_class(metrics: dict, class_names: list[str], path: Path) -> Path:
    series = [("IoU", metrics["iou"]), ("Dice", metrics["dice"]), ("precision", metrics["precision"]),
              ("recall", metrics["recall"]), ("boundary IoU", metrics["boundary_iou"])]
    fig = figure(max(6.0, 1.4 * len(class_names) + 2), 4)
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
    return save_figure(fig, path)


def plot_speed(speed: dict, path: Path) -> Path:
    cases = speed["cases"]
    labels = [f"batch {c['batch_size']}, {c['dtype']}, {c['memory_format']}" for c in cases]
    fig = figure(7, 1.2 + 0.5 * len(cases))
    ax = fig.add_subplot()
    ax.barh(range(len(cases)), [c["ms_per_image"] for c in cases],
            color=["#2a9d8f" if c["fast_path"] else "#8d99ae" for c in cases])
    ax.set_yticks(range(len(cases)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (lower is better)")
    ax.set_title(f"{speed['device']}, input {speed['input_width']}x{speed['input_height']}", fontsize=9)
    return save_figure(fig, path)


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


def fmt(value, percent: bool = False) -> str:
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
    """``report.html`` in ``output``; ``pictures`` by name (per_class, confusion_matrix, speed) and the worst
    records' panels (relative to ``output``)."""
    parts = [*_run_section(info), *_metrics_section(metrics, info["classes"], pictures), *_worst_section(output, worst)]
    if speed is not None:
        parts += _speed_section(speed, pictures["speed"])
    rows = [[f"{r['dataset_name']}/{r['item_name']}", fmt(r["mean_fg_iou"]), fmt(r["mean_iou"]),
             fmt(r["pixel_accuracy"])] for r in sorted(per_image, key=_rank_score)]
    parts.append(f"<details><summary>All {len(rows)} image(s), worst first</summary>"
                 + _table(["item", "foreground IoU", "mean IoU", "pixel accuracy"], rows, "per-image") + "</details>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = output / "report.html"
    atomic_write_text(path, page)
    return path


def _run_section(info: dict) -> list[str]:
    rows = [("checkpoint", info["checkpoint"]), ("project", info["project_dir"]), ("items", info["items"]),
            ("split file", info["split_file"] or "all items of the project"),
            ("inference", f"{info['mode']} at {info['input_width']}x{info['input_height']}"),
            ("device / precision", f"{info['device']} / {info['amp']}"), ("evaluated", info["date"])]
    return ([f"<h1>Evaluation: {html.escape(info['model'])}</h1>", _table(None, [list(r) for r in rows], "run-info")]
            + [f'<p class="note">warning: {html.escape(warning)}</p>' for warning in info["warnings"]])


def _metrics_section(metrics: dict, names: list[str], pictures: dict[str, Path]) -> list[str]:
    shown = ("mean_fg_iou", "mean_iou", "mean_fg_dice", "mean_dice", "pixel_accuracy", "frequency_weighted_iou",
             "mean_fg_boundary_iou", "mean_boundary_iou", "mean_fg_precision", "mean_fg_recall")
    per_class = [[n, fmt(metrics["iou"][n]), fmt(metrics["dice"][n]), fmt(metrics["precision"][n]),
                  fmt(metrics["recall"][n]), fmt(metrics["boundary_iou"][n]), f"{metrics['support'][n]:,}"]
                 for n in names]
    corner = ["ground truth \\ prediction"] + names
    return ["<h2>Metrics</h2>",
            _table(["metric", "value"], [[METRIC_LABELS[k], fmt(metrics[k])] for k in shown], "metrics"),
            f'<p class="note">Computed over all pixels of all items at their own resolution. Boundary IoU: bands '
            f'of {metrics["boundary_width"]} px inside each class edge. "n/a": the class is in neither ground truth '
            'nor prediction (or never predicted, for precision).</p>',
            "<h2>Per class</h2>",
            _table(["class", "IoU", "Dice", "precision", "recall", "boundary IoU", "ground-truth pixels"], per_class,
                   "per-class"),
            _img(pictures["per_class"], "per-class metrics"),
            "<h2>Confusion matrix</h2><p class='note'>Rows: ground truth, columns: prediction.</p>",
            _table(corner, [[n] + [f"{c:,}" for c in row] for n, row in zip(names, metrics["confusion_matrix"])],
                   "confusion-counts"),
            _table(corner, [[n] + [fmt(v, percent=True) for v in row]
                            for n, row in zip(names, metrics["confusion_matrix_normalized"])], "confusion-normalized"),
            _img(pictures["confusion_matrix"], "confusion matrix heatmap")]


def _worst_section(output: Path, worst: list[dict]) -> list[str]:
    legend = "".join(f"<span class='swatch' style='background:rgb{c}'></span>{t}" for c, t in
                     ((MISSED, "object missed"), (FALSE_ALARM, "background predicted as object"),
                      (WRONG_CLASS, "wrong class")))
    parts = [f"<h2>Worst {len(worst)} image(s) by foreground IoU</h2>",
             f"<p class='note'>image | ground truth | prediction | errors:{legend}</p>"]
    for entry in worst:
        caption = (f"{entry['dataset_name']}/{entry['item_name']}: foreground IoU {fmt(entry['mean_fg_iou'])}, "
                   f"pixel accuracy {fmt(entry['pixel_accuracy'])}")
        parts.append(f"<figure>{_img(output / entry['panel'], caption)}<figcaption>{html.escape(caption)}"
                     "</figcaption></figure>")
    return parts


def _speed_section(speed: dict, picture: Path) -> list[str]:
    rows = [[c["batch_size"], c["dtype"], c["memory_format"], f"{c['ms_per_image']:.2f}",
             f"{c['images_per_second']:.1f}"] for c in speed["cases"]]
    return [f"<h2>Speed</h2><p>{html.escape(speed['device'])}; model forward pass with normalisation at "
            f"{speed['input_width']}x{speed['input_height']} (image decoding and resizing not included).</p>",
            _table(["batch size", "precision", "memory format", "ms / image", "images / s"], rows, "speed"),
            _img(picture, "speed test")]


def _rank_score(record: dict) -> float:
    value = record["mean_fg_iou"]
    return 1.0 if value is None or math.isnan(value) else value
