"""Optimizer, learning-rate schedule and BatchNorm settings of a run."""
from __future__ import annotations

import math

import torch
from torch.optim import lr_scheduler

OPTIMIZERS = ("SGD", "Adam", "AdamW")

LR_SCHEDULES = ("none", "StepLR", "ExponentialLR", "MultiStepLR", "cosine")


def parameter_groups(model: torch.nn.Module, lr: float, decoder_lr_factor: float = 1.0) -> list[dict]:
    """The encoder's parameters at ``lr``, the rest (decoder, head) at ``lr * decoder_lr_factor``.
    One group when the factor is 1, so runs and resume states without it keep their layout."""
    params = list(model.parameters())
    if decoder_lr_factor == 1:
        return [{"params": params}]
    encoder = {id(p) for module in model.encoder_modules() for p in module.parameters()}
    groups = [{"params": [p for p in params if id(p) in encoder]},
              {"params": [p for p in params if id(p) not in encoder], "lr": lr * decoder_lr_factor}]
    return [group for group in groups if group["params"]]  # UNet has no encoder: all of it is decoder


def build_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float, nesterov: bool):
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


# The settings of a run that shape its schedule: build_scheduler's keyword arguments.
SCHEDULE_OPTIONS = ("epochs", "lr", "step_size", "gamma_step", "milestones", "gamma_exp", "warmup_epochs", "min_lr")


def build_scheduler(name: str, optimizer, iters_per_epoch: int, *, epochs: int, lr: float, step_size: int = 5,
                    gamma_step: float = 0.1, milestones=(5, 10, 15), gamma_exp: float = 0.9,
                    warmup_epochs: float = 0.0, min_lr: float = 0.0):
    """Returns (scheduler or None, steps_per_iteration). Epoch schedules step after each epoch's
    optimizer steps; ``cosine`` (linear warmup, then cosine decay from the peak ``lr`` to ``min_lr``)
    steps every iteration."""
    if name == "none":
        return None, False
    if name == "StepLR":
        return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma_step), False
    if name == "ExponentialLR":
        return lr_scheduler.ExponentialLR(optimizer, gamma=gamma_exp), False
    if name == "MultiStepLR":
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma_step), False
    if name == "cosine":
        total = max(1, epochs * iters_per_epoch)
        warmup = min(int(round(warmup_epochs * iters_per_epoch)), total - 1)
        floor = min_lr / lr if lr else 0.0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return lr_scheduler.LambdaLR(optimizer, factor), True
    raise ValueError(f"unknown --lr-schedule {name!r}; choose from {', '.join(LR_SCHEDULES)}")


def set_bn_momentum(model: torch.nn.Module, spec, iters_per_epoch: int) -> float:
    """Sets (and returns) the running-statistics momentum of every BatchNorm layer.

    'auto' = 1 / iterations per epoch, at least PyTorch's 0.1. With few iterations per epoch the weights
    move far between updates, and at 0.1 the statistics validation uses would average models of several
    epochs ago: on a 5-image project (one iteration per epoch) AlbuNet validated at 0 IoU for 27 of 40
    epochs while its training loss had long converged.
    """
    momentum = max(0.1, 1 / max(1, iters_per_epoch)) if spec == "auto" else float(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return momentum


def current_lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]

