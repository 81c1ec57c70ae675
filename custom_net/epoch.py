"""One epoch of training: batches to the device, forward, loss, backward, clipping, optimizer step."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from custom_net.optim import current_lr
from custom_net.preprocessing import normalize_batch


class NonFiniteLoss(RuntimeError):
    pass


# Under this loss scale only gradients beyond ~4e9 still overflow fp16: they are inf/NaN themselves, and the
# scaler would go on skipping every step (halving the scale each time) without the run ever failing.
MIN_LOSS_SCALE = 2.0 ** -16


class StopRequested(Exception):
    """The user asked to stop (dashboard Stop, SIGTERM); training ends cleanly."""


def forward_batch(model, images, masks, device, amp_dtype=None, memory_format=torch.contiguous_format):
    """Move a (uint8 images, index masks) batch to ``device``, normalise there, run the model.
    Returns (logits, int64 masks on the device)."""
    images = images.to(device, non_blocking=True)
    masks = masks.to(device, non_blocking=True).long()
    inputs = normalize_batch(images).contiguous(memory_format=memory_format)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(inputs), masks


def train_one_epoch(model, criterion, optimizer, loader, device, *, epoch: int, scheduler=None, scaler=None,
                    amp_dtype=None, memory_format=torch.contiguous_format, on_step=None, on_skip=None,
                    clip_grad_norm: float = 0.0) -> float:
    """One pass over ``loader``; returns the mean training loss.

    ``clip_grad_norm`` > 0 rescales the gradients whose total norm exceeds it before each step.

    ``scheduler`` is stepped after every optimizer step (per-iteration schedules only).
    ``on_step(iteration, loss, lr)`` is called after each step and may raise StopRequested.
    ``on_skip(iteration)``: the fp16 gradient scaler found inf/NaN gradients and skipped that step.
    """
    model.train()
    total, count = 0.0, 0
    for i, (images, masks) in enumerate(loader):
        logits, masks = forward_batch(model, images, masks, device, amp_dtype, memory_format)
        loss = criterion(logits, masks)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at epoch {epoch}, iteration {i + 1}; "
                                "try a lower --lr or --amp off")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients; the scaler still skips inf/NaN ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale:  # the scaler backs off only after a skip
                if on_skip is not None:
                    on_skip(i + 1)
                if scaler.get_scale() < MIN_LOSS_SCALE:
                    raise NonFiniteLoss(f"fp16 gradients were still inf/NaN at epoch {epoch}, iteration {i + 1}, "
                                        f"with the loss scale down to {scaler.get_scale():g} (the loss was finite; "
                                        "every such step was skipped); try a lower --lr or --amp bf16 / off")
        else:
            loss.backward()
            # A finite loss can still give inf/NaN gradients; one step with them ruins every weight.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(norm):
                raise NonFiniteLoss(f"gradient became {norm.item()} at epoch {epoch}, iteration {i + 1} "
                                    "(the loss was finite); try a lower --lr or --amp off")
            if clip_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip_grad_norm, norm)
            optimizer.step()
        lr = current_lr(optimizer)
        if scheduler is not None:
            scheduler.step()
        total += value * len(images)
        count += len(images)
        if on_step is not None:
            on_step(i + 1, value, lr)
    return total / max(count, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
