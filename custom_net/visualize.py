"""Pictures a run leaves behind: prediction previews and metric charts (PNG)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from custom_net.storage import atomic_write


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


def save_png(path: Path, image_rgb: np.ndarray) -> None:
    # Encoded here and written atomically: cv2.imwrite fails silently and leaves partial files.
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: cannot encode a {image_rgb.shape} image as PNG")
    atomic_write(path, lambda file: file.write(encoded.tobytes()))


def save_charts(history: list[dict], directory: Path, class_names: list[str]) -> list[Path]:
    """loss.png (train / val), lr.png, metrics.png (IoU / Dice per epoch) from the per-epoch records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    val = [r for r in history if "val_loss" in r]
    written = []

    def finish(fig, ax, name, ylabel):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(directory / name, lambda file: fig.savefig(file, format="png", dpi=100))
        plt.close(fig)
        written.append(directory / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
    if val:
        ax.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], marker=".", label="val")
    finish(fig, ax, "loss.png", "loss")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["lr"] for r in history], marker=".")
    finish(fig, ax, "lr.png", "learning rate")

    fig, ax = plt.subplots(figsize=(6, 4))
    if val:
        x = [r["epoch"] for r in val]
        ax.plot(x, [r["mean_fg_iou"] for r in val], marker="o", label="mean IoU (foreground)")
        ax.plot(x, [r["mean_fg_dice"] for r in val], marker="o", label="mean Dice (foreground)")
        for name in class_names:
            if name == "__bg__":
                continue
            ax.plot(x, [r["iou"].get(name, float("nan")) for r in val], linestyle="--", label=f"IoU {name}")
    ax.set_ylim(0, 1)
    finish(fig, ax, "metrics.png", "validation metric")
    return written
