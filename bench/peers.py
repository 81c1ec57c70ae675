"""Peers for bench/quality.py: segmentation_models_pytorch's Unet and Linknet (ResNet34 encoder, from scratch),
trained as issue #23 measured them: cross-entropy + soft Dice (equal weights), Adam 1e-3 constant, no clipping.

Everything else is the engine's, called rather than copied, so the only differences from our runs are the
model and the recipe: the same config flags (project, split, input size, epochs, batch, seed), the split
and decoded-image caches (custom_net.trainer), the dataset, sampler and loaders (custom_net.trainer.make_loaders, with the run's augmentations),
the training step (custom_net.epoch, so the same input normalisation, channels_last and autocast as our fast
path: --amp auto, bf16 where the device runs it fast) and the validation (custom_net.validation).

segmentation-models-pytorch is a bench-only dependency (requirements-dev.txt), imported when a peer runs.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from custom_net import distributed, trainer
from custom_net.config import parse_config
from custom_net.epoch import seed_everything, train_one_epoch
from custom_net.hardware import dtype_name, resolve_amp
from custom_net.reporting import Reporter
from custom_net.validation import validate

PEERS = {"smp_unet": "Unet", "smp_linknet": "Linknet"}  # bench name -> smp architecture
ENCODER = "resnet34"
LR = 1e-3
RECIPE = f"smp {ENCODER} from scratch, CE + Dice, Adam {LR:g} constant, no clipping"


def import_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise SystemExit("bench/quality.py --peers needs segmentation-models-pytorch: "
                         "pip install -r requirements-dev.txt") from None
    return smp


class CrossEntropyDice(nn.Module):
    """The peers' loss: CE + smp's multiclass soft Dice, equal weights, in float32 (the logits may be bf16)."""

    def __init__(self, smp):
        super().__init__()
        self.ce = nn.CrossEntropyLoss()
        self.dice = smp.losses.DiceLoss(mode="multiclass")

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return self.ce(logits, masks) + self.dice(logits, masks)


def train_peer(peer: str, engine_argv: list[str]) -> dict:
    """Train ``peer`` with the data settings of ``engine_argv`` (custom_net.train's flags); returns
    ``outcome`` of its validation history plus the autocast dtype it ran with."""
    smp = import_smp()
    start = time.perf_counter()
    ignore = Reporter().message  # our runs' reporter in bench/quality.py drops messages too
    # The same steps in the same order as trainer.run_training, so the split, seed and data match ours.
    config, inputs = trainer.check_inputs(parse_config(engine_argv), ignore)
    dist_ctx = distributed.setup(config.gpu_id, config.dist_timeout)  # a single process: the device
    config = config.replace(batch_size=trainer.resolve_batch_size(config.batch_size, len(inputs.train_items),
                                                                  dist_ctx.world_size, ignore))
    seed_everything(config.seed)
    model = getattr(smp, PEERS[peer])(ENCODER, encoder_weights=None, classes=len(inputs.class_names))
    with trainer.prepared_data(config, inputs, ignore) as (train_data, val_data):
        history, amp_dtype = fit(model, CrossEntropyDice(smp), config, inputs, train_data, val_data, dist_ctx)
    return {**outcome(history, time.perf_counter() - start), "amp": dtype_name(amp_dtype)}


def fit(model, criterion, config, inputs, train_data, val_data, dist_ctx):
    """Train and validate as Trainer.set_up / train_epoch / validate do, with the peer's optimizer and
    no schedule, clipping or BatchNorm momentum change. Returns (validation records, autocast dtype)."""
    device = dist_ctx.device
    amp_dtype = resolve_amp(config.amp, device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    criterion.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    sampler, train_loader, val_loader = trainer.make_loaders(config, train_data, val_data, inputs.augs_config,
                                                             dist_ctx, device)
    history = []
    for epoch in range(1, config.epochs + 1):
        sampler.set_epoch(epoch)
        train_one_epoch(model, criterion, optimizer, train_loader, device, epoch=epoch, scaler=scaler,
                        amp_dtype=amp_dtype, memory_format=memory_format)
        if epoch % config.val_interval == 0 or epoch == config.epochs:
            history.append(validate(model, criterion, val_loader, device, inputs.class_names, amp_dtype, memory_format))
    return history, amp_dtype


def outcome(history: list[dict], seconds: float) -> dict:
    """What the bench reports of a run (ours or a peer's) from its validation records: final and best mean
    foreground IoU (__bg__ excluded), whether the final round collapsed to one class, and the wall time."""
    ious = [r["mean_fg_iou"] for r in history if "mean_fg_iou" in r]
    defined = [v for v in ious if not math.isnan(v)]
    return {"iou": ious[-1], "best": max(defined, default=math.nan), "seconds": seconds,
            "collapsed": next(r for r in reversed(history) if "mean_fg_iou" in r).get("collapsed_to")}
