"""Segmentation losses. Both take raw logits (N, C, H, W) and class-index targets (N, H, W)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-15


class _PixelAndRegionLoss(nn.Module):
    """(1 - w) x a pixel-wise loss + w x a per-class overlap (region) term; ``w`` is ``weight``."""

    def __init__(self, num_classes: int, weight: float = 0.5, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.num_classes, self.weight = num_classes, weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def overlap(self, probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class, over the batch: the soft intersection and the sum of both areas."""
        one_hot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        return (probs * one_hot).sum(dim=(0, 2, 3)), probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))


class JaccardNLLLoss(_PixelAndRegionLoss):
    """The original app's loss: (1 - w) * NLL - w * sum_c log(soft Jaccard_c)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        loss = (1 - self.weight) * F.nll_loss(log_probs, target, weight=self.class_weights)
        if self.weight:
            intersection, areas = self.overlap(log_probs.exp(), target)
            loss = loss - self.weight * torch.log((intersection + EPS) / (areas - intersection + EPS)).sum()
        return loss


class PresentJaccardNLLLoss(_PixelAndRegionLoss):
    """(1 - w) * NLL - w * sum of log(soft Jaccard), over the classes present in the batch's target only, each
    smoothed by one pixel. In the original's form a class absent from a batch adds -log(1e-15 / its predicted
    area), about 30: such batches dominate the step and the reported loss. Here an absent class adds nothing
    (the NLL still charges its false positives), so every batch's loss is bounded and comparable."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        loss = (1 - self.weight) * F.nll_loss(log_probs, target, weight=self.class_weights)
        if self.weight:
            intersection, areas = self.overlap(log_probs.exp(), target)
            present = torch.bincount(target.flatten(), minlength=self.num_classes) > 0
            jaccard = (intersection + 1.0) / (areas - intersection + 1.0)
            loss = loss - self.weight * torch.log(jaccard)[present].sum()
        return loss


class CEDiceLoss(_PixelAndRegionLoss):
    """Cross-entropy plus (1 - soft Dice), the Dice averaged over all classes (smoothed by 1, so a class
    absent from the batch scores near 1 when it is not predicted)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = (1 - self.weight) * F.cross_entropy(logits, target, weight=self.class_weights)
        if self.weight:
            intersection, areas = self.overlap(logits.softmax(dim=1), target)
            loss = loss + self.weight * (1 - (2 * intersection + 1.0) / (areas + 1.0)).mean()
        return loss


LOSSES = {"jaccard_nll": JaccardNLLLoss, "present_jaccard_nll": PresentJaccardNLLLoss, "ce_dice": CEDiceLoss}


def build_loss(name: str, num_classes: int, weight: float, class_weights: list[float] | None = None) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"--class-weights has {len(class_weights)} values for {num_classes} classes (with __bg__)")
    weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    return LOSSES[name](num_classes, weight, weights)
