"""Pictures a run leaves behind: prediction previews and metric charts (PNG)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from custom_net.preprocessing import resize_image, resize_mask
from custom_net.storage import atomic_write

# Error overlay colours (RGB): ground-truth object missed, background predicted as an object, wrong class.
MISSED, FALSE_ALARM, WRONG_CLASS = (230, 40, 40), (40, 110, 255), (255, 200, 0)
PANEL_SIDE = 320  # worst-image panels are scaled so each of their four parts is about this big


def colorize(mask: np.ndarray, colors: list[list[int]]) -> np.ndarray:
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return palette[mask]


def overlay(image: np.ndarray, mask: np.ndarray, colors: list[list[int]], alpha: float = 0.5,
            background: int | None = 0) -> np.ndarray:
    """Classes other than ``background`` (the class id of __bg__) blended over the image."""
    blended = cv2.addWeighted(image, 1 - alpha, colorize(mask, colors), alpha, 0)
    return np.where((mask != background)[..., None], blended, image)


def preview_panel(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray,
                  colors: list[list[int]], background: int | None = 0) -> np.ndarray:
    """image | ground truth | prediction, side by side (ground truth omitted when unknown)."""
    parts = [image] + ([overlay(image, truth, colors, background=background)] if truth is not None else []) \
        + [overlay(image, prediction, colors, background=background)]
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    row = [parts[0]]
    for part in parts[1:]:
        row += [gap, part]
    return np.concatenate(row, axis=1)


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


def worst_panel(image, truth, prediction, colors, background) -> np.ndarray:
    """image | ground truth | prediction | errors, scaled down for the report."""
    scale = min(4.0, PANEL_SIDE / max(image.shape[:2]))  # small images are enlarged (at most 4x) to be seen
    if scale != 1:
        h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
        image, truth, prediction = resize_image(image, h, w), resize_mask(truth, h, w), resize_mask(prediction, h, w)
    panel = preview_panel(image, truth, prediction, colors, background)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panel, gap, error_overlay(image, truth, prediction, background)], axis=1)


def save_png(path: Path, image_rgb: np.ndarray) -> None:
    # Encoded here and written atomically: cv2.imwrite fails silently and leaves partial files.
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: cannot encode a {image_rgb.shape} image as PNG")
    atomic_write(path, lambda file: file.write(encoded.tobytes()))


def figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas: no pyplot, so no global state (the dashboard trains in a
    worker thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    return path


def save_charts(history: list[dict], directory: Path, class_names: list[str]) -> list[Path]:
    """loss.png (train / val), lr.png, metrics.png (IoU / Dice per epoch) from the per-epoch records."""
    directory.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    val = [r for r in history if "val_loss" in r]
    loss, lr, metrics = (figure(6, 4) for _ in range(3))
    ax = loss.add_subplot()
    ax.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
    if val:
        ax.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], marker=".", label="val")
    _label(ax, "loss")
    ax = lr.add_subplot()
    ax.plot(epochs, [r["lr"] for r in history], marker=".")
    _label(ax, "learning rate")
    ax = metrics.add_subplot()
    if val:
        x = [r["epoch"] for r in val]
        ax.plot(x, [r["mean_fg_iou"] for r in val], marker="o", label="mean IoU (foreground)")
        ax.plot(x, [r["mean_fg_dice"] for r in val], marker="o", label="mean Dice (foreground)")
        for name in (n for n in class_names if n != "__bg__"):
            ax.plot(x, [r["iou"].get(name, float("nan")) for r in val], linestyle="--", label=f"IoU {name}")
    ax.set_ylim(0, 1)
    _label(ax, "validation metric")
    return [save_figure(fig, directory / name)
            for fig, name in ((loss, "loss.png"), (lr, "lr.png"), (metrics, "metrics.png"))]


def _label(ax, ylabel: str) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
