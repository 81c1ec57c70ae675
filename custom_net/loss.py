"""Segmentation losses. Both take raw logits (N, C, H, W) and class-index targets (N, H, W)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-15


class JaccardNLLLoss(nn.Module):
    """The original app's loss: (1 - w) * NLL - w * sum_c log(soft Jaccard_c)."""

    def __init__(self, num_classes: int, jaccard_weight: float = 0.5, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.jaccard_weight = jaccard_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        loss = (1 - self.jaccard_weight) * F.nll_loss(log_probs, target, weight=self.class_weights)
        if self.jaccard_weight:
            probs = log_probs.exp()
            one_hot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
            intersection = (probs * one_hot).sum(dim=(0, 2, 3))
            union = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
            loss = loss - self.jaccard_weight * torch.log((intersection + EPS) / (union - intersection + EPS)).sum()
        return loss


class CEDiceLoss(nn.Module):
    """Cross-entropy plus (1 - soft Dice), the Dice averaged over all classes (smoothed by 1, so a class
    absent from the batch scores near 1 when it is not predicted)."""

    def __init__(self, num_classes: int, dice_weight: float = 0.5, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.dice_weight = dice_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = (1 - self.dice_weight) * F.cross_entropy(logits, target, weight=self.class_weights)
        if self.dice_weight:
            probs = logits.softmax(dim=1)
            one_hot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
            intersection = (probs * one_hot).sum(dim=(0, 2, 3))
            cardinality = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
            dice = (2 * intersection + 1.0) / (cardinality + 1.0)
            loss = loss + self.dice_weight * (1 - dice).mean()
        return loss


LOSSES = {"jaccard_nll": JaccardNLLLoss, "ce_dice": CEDiceLoss}


def build_loss(name: str, num_classes: int, weight: float, class_weights: list[float] | None = None) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"--class-weights has {len(class_weights)} values for {num_classes} classes (with __bg__)")
    weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    return LOSSES[name](num_classes, weight, weights)
