"""Validation metrics from a confusion matrix counted on the device."""
from __future__ import annotations

import math

import torch

from custom_net.utils import forward_batch


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

    def metrics(self, class_names: list[str], background_index: int | None = 0) -> dict:
        """Per-class IoU / Dice and their means over all and over foreground classes.

        A class absent from both ground truth and prediction has undefined IoU (NaN in the
        per-class lists) and is left out of the means.
        """
        m = self.matrix.double().cpu()
        tp = m.diag()
        fp = m.sum(0) - tp
        fn = m.sum(1) - tp
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
        foreground = [i for i in range(self.num_classes) if i != background_index]

        def mean(values, indices):
            picked = [values[i].item() for i in indices if not math.isnan(values[i].item())]
            return sum(picked) / len(picked) if picked else float("nan")

        total = m.sum().item()
        return {
            "pixel_accuracy": tp.sum().item() / total if total else float("nan"),
            "mean_iou": mean(iou, range(self.num_classes)),
            "mean_fg_iou": mean(iou, foreground),
            "mean_dice": mean(dice, range(self.num_classes)),
            "mean_fg_dice": mean(dice, foreground),
            "iou": dict(zip(class_names, iou.tolist())),
            "dice": dict(zip(class_names, dice.tolist())),
        }


@torch.inference_mode()
def evaluate(model, criterion, loader, device, class_names, amp_dtype=None, memory_format=torch.contiguous_format,
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
    return result
