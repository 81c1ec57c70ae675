"""Validation metrics from a confusion matrix counted on the device."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from custom_net.sly_seg_dataset import BG_CLASS
from custom_net.epoch import forward_batch


def foreground(class_names: list[str]) -> list[int]:
    """Indices of the classes other than ``__bg__``, wherever the class list puts it."""
    return [i for i, name in enumerate(class_names) if name != BG_CLASS]


class ConfusionMatrix:
    """Rows are ground truth, columns predictions; counted with one bincount per batch."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        n = self.num_classes
        valid = (target >= 0) & (target < n)
        indices = n * target[valid].to(torch.int64) + prediction[valid].to(torch.int64)
        self.matrix += torch.bincount(indices, minlength=n * n).reshape(n, n)

    def add(self, other: "ConfusionMatrix") -> None:
        """Accumulate another matrix (e.g. one image's) into this one."""
        self.matrix += other.matrix.to(self.matrix.device)

    def class_stats(self) -> dict[str, torch.Tensor]:
        """Per-class float64 tensors on the CPU: tp, fp, fn, support (ground-truth pixels), iou, dice,
        precision, recall. 0/0 gives NaN: the value is undefined for that class."""
        m = self.matrix.double().cpu()
        tp = m.diag()
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        return {"tp": tp, "fp": fp, "fn": fn, "support": tp + fn,
                "iou": tp / (tp + fp + fn), "dice": 2 * tp / (2 * tp + fp + fn),
                "precision": tp / (tp + fp), "recall": tp / (tp + fn)}

    def metrics(self, class_names: list[str]) -> dict:
        """Per-class IoU / Dice and their means over all and over foreground classes.

        A class absent from both ground truth and prediction has undefined IoU (NaN in the
        per-class lists) and is left out of the means.
        """
        s = self.class_stats()
        fg = foreground(class_names)
        total = s["support"].sum().item()
        return {
            "pixel_accuracy": s["tp"].sum().item() / total if total else float("nan"),
            "mean_iou": nanmean(s["iou"], range(self.num_classes)),
            "mean_fg_iou": nanmean(s["iou"], fg),
            "mean_dice": nanmean(s["dice"], range(self.num_classes)),
            "mean_fg_dice": nanmean(s["dice"], fg),
            "iou": dict(zip(class_names, s["iou"].tolist())),
            "dice": dict(zip(class_names, s["dice"].tolist())),
        }

    def full_metrics(self, class_names: list[str]) -> dict:
        """``metrics`` plus per-class precision / recall, their means, frequency-weighted IoU and the
        matrix itself (counts and row-normalised: row = ground truth, so the diagonal is recall)."""
        s = self.class_stats()
        result = self.metrics(class_names)
        total = s["support"].sum()
        # Weights are ground-truth frequencies; a class with no ground truth weighs 0 even if its IoU is NaN.
        result["frequency_weighted_iou"] = ((s["support"] / total) * s["iou"].nan_to_num(0)).sum().item() \
            if total else float("nan")
        for key in ("precision", "recall"):
            result[key] = dict(zip(class_names, s[key].tolist()))
            result[f"mean_fg_{key}"] = nanmean(s[key], foreground(class_names))
        result["support"] = dict(zip(class_names, s["support"].long().tolist()))
        counts = self.matrix.cpu()
        result["confusion_matrix"] = counts.tolist()
        result["confusion_matrix_normalized"] = (counts.double() / counts.sum(1, keepdim=True)).tolist()
        return result


def nanmean(values: torch.Tensor, indices) -> float:
    """Mean of ``values[indices]`` leaving out NaN (undefined) entries; NaN when nothing is left."""
    picked = [values[i].item() for i in indices if not math.isnan(values[i].item())]
    return sum(picked) / len(picked) if picked else float("nan")


def edge_band(region: torch.Tensor, width: int) -> torch.Tensor:
    """(H, W) bool: pixels of ``region`` within ``width`` pixels (chessboard distance) of its edge,
    i.e. the region minus its erosion, as in Boundary IoU (Cheng et al. 2021).
    The image frame is not an edge: a region touching the border is not banded there."""
    x = region.float()[None, None]
    # Erosion = min-pool; max_pool2d pads with -inf, so -max_pool(-x) treats outside the frame as inside.
    eroded = -F.max_pool2d(-x, 2 * width + 1, stride=1, padding=width)
    return region & (eroded[0, 0] < 1)


class BoundaryIoU:
    """Boundary IoU per class, accumulated over images: |G_d & P_d| / |G_d | P_d| with G_d, P_d the
    edge bands of ground truth and prediction. Counted with one 2x2 ConfusionMatrix per class
    (target = in G_d, prediction = in P_d), so its IoU of index 1 is exactly the boundary IoU."""

    def __init__(self, num_classes: int, width: int = 3, device: torch.device | str = "cpu"):
        if width < 1:
            raise ValueError(f"boundary width must be >= 1 pixel, got {width}")
        self.num_classes, self.width = num_classes, width
        self.matrices = [ConfusionMatrix(2, device) for _ in range(num_classes)]

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """One image: (H, W) class-index masks on the same device."""
        # Out-of-range target pixels (ignore index) count as background for the bands.
        target = torch.where((target >= 0) & (target < self.num_classes), target, 0)
        for c, matrix in enumerate(self.matrices):  # one class at a time: memory stays at a few (H, W) maps
            matrix.update(edge_band(target == c, self.width).long(), edge_band(prediction == c, self.width).long())

    def per_class(self) -> torch.Tensor:
        return torch.stack([m.class_stats()["iou"][1] for m in self.matrices])

    def metrics(self, class_names: list[str]) -> dict:
        iou = self.per_class()
        return {"boundary_iou": dict(zip(class_names, iou.tolist())),
                "mean_boundary_iou": nanmean(iou, range(self.num_classes)),
                "mean_fg_boundary_iou": nanmean(iou, foreground(class_names)),
                "boundary_width": self.width}


@torch.inference_mode()
def validate(model, criterion, loader, device, class_names, amp_dtype=None, memory_format=torch.contiguous_format,
             progress=None, reduce=None) -> dict:
    """Validation loss and metrics of ``model`` over ``loader`` (batches of uint8 images, index masks).
    ``reduce(tensor)`` sums a tensor in place over the ranks of a distributed run that each evaluated
    a share of the items, so the metrics are those of the whole set."""
    model.eval()
    matrix = ConfusionMatrix(len(class_names), device)
    loss_sum, count = 0.0, 0
    for i, (images, masks) in enumerate(loader):
        logits, masks = forward_batch(model, images, masks, device, amp_dtype, memory_format)
        loss_sum += criterion(logits, masks).item() * len(images)
        count += len(images)
        matrix.update(masks, logits.argmax(1))
        if progress is not None:
            progress(i + 1, len(loader))
    if reduce is not None:
        totals = reduce(torch.tensor([loss_sum, count], dtype=torch.float64, device=device))
        reduce(matrix.matrix)
        loss_sum, count = totals[0].item(), totals[1].item()
    result = matrix.metrics(class_names)
    result["val_loss"] = loss_sum / max(count, 1)
    result["collapsed_to"] = collapsed_class(matrix.matrix, class_names)
    return result


def collapsed_class(matrix: torch.Tensor, class_names: list[str], share: float = 0.995) -> str | None:
    """The class a model predicts (nearly) everywhere although the ground truth has others, else None."""
    predicted = matrix.sum(0).double()
    truth = matrix.sum(1).double()
    total = predicted.sum().item()
    if not total:
        return None
    top = int(predicted.argmax())
    if predicted[top] / total >= share and truth[top] / total < share:
        return class_names[top]
    return None
