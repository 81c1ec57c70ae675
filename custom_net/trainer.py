"""A training run, phase by phase.

    check_inputs     project, classes, splits, augmentations, previews, encoder weights: all before any output
    build_model      architecture, initial and custom weights, training BatchNorm (custom_net.train_norms)
    prepared_data    the decoded-image caches of both splits
    Trainer          set up (device, optimizer, schedule, loaders), open the run folder or resume it, then per
                     epoch: train, validate, save; and the end: last checkpoint, charts, evaluation, summary

``run_training(config, reporter)`` runs them in that order; ``custom_net.train`` is its command line.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np
import supervisely as sly
import torch

from custom_net import augs, distributed, pretrained, sly_seg_dataset as data
from custom_net.checkpoints import CheckpointSaver
from custom_net.config import AUTO_BATCH_MIN_STEPS, AUTO_BATCH_SIZES, ArgsError, TrainConfig
from custom_net.custom_weights import CustomWeightsError, load_custom_weights
from custom_net.epoch import NonFiniteLoss, StopRequested, seed_everything, train_one_epoch
from custom_net.evaluate import evaluate_training_run
from custom_net.hardware import dtype_name, resolve_amp, resolve_num_workers
from custom_net.inference import predict_probabilities
from custom_net.loss import build_loss
from custom_net.model import (LSUV_IMAGES, build_model as build_architecture, encoder_parameters, model_list,
                              scale_to_data)
from custom_net.optim import SCHEDULE_OPTIONS, build_optimizer, build_scheduler, current_lr, parameter_groups, set_bn_momentum
from custom_net.preprocessing import normalize_batch
from custom_net.quantize import save_calibration_images
from custom_net.reporting import Reporter
from custom_net.run_folder import SPLITS, RunFolder
from custom_net.storage import StorageError, atomic_torch_save, atomic_write_json, atomic_write_text
from custom_net.train_norms import add_training_norms
from custom_net.validation import validate
from custom_net.visualize import preview_panel, save_charts, save_png

COLLAPSE_ROUNDS = 3  # validation rounds predicting one class before the run warns
FEW_STEPS = 30  # fewer optimizer steps in a whole run than this rarely train a model: the run says so


def run_training(config: TrainConfig, reporter: Reporter, ui_state: dict | None = None) -> dict:
    """The whole run; returns the summary. Bad input raises (ArgsError, DataError, AugsConfigError ...)
    before the output folder is created."""
    config, inputs = check_inputs(config, reporter.message)
    dist_ctx = distributed.setup(config.gpu_id, config.dist_timeout, config.sync_bn)  # world_size 1 outside torchrun
    config = config.replace(batch_size=resolve_batch_size(config.batch_size, len(inputs.train_items),
                                                          dist_ctx.world_size, reporter.message))
    seed_everything(config.seed)
    model = build_model(config, inputs.class_names, reporter.message)
    criterion = build_loss(config.loss, len(inputs.class_names), config.jaccard_weight, config.class_weights)
    check_output_storage(config, model)
    started = time.time()
    with prepared_data(config, inputs, reporter.message) as (train_data, val_data):
        trainer = Trainer(config, reporter, inputs, model, criterion, train_data, val_data, dist_ctx, started)
        return trainer.run(ui_state)


# ---- before anything is written ---------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """What the run trains on, checked."""
    project: sly.Project
    model_classes: list[sly.ObjClass]
    train_items: list[data.Item]
    val_items: list[data.Item]
    augs_config: dict | None
    vis: dict[str, list[int]]  # per split, the positions of the previewed items

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.model_classes]


def check_inputs(config: TrainConfig, report) -> tuple[TrainConfig, Inputs]:
    """Everything that can be wrong with the input, found before the output folder exists. Returns the config
    with what the checks resolved (the demo project, the encoder weights)."""
    if config.demo and not config.project_dir:
        from custom_net.demo import demo_project_dir
        config = config.replace(project_dir=str(demo_project_dir()))
    project = data.open_project(config.project_dir)
    items = data.list_items(project)
    model_classes = data.build_model_classes(project.meta, config.classes)
    train_items, val_items = make_splits(config, project, items)
    both = sorted({i.dataset_name + "/" + i.item_name for i in set(train_items) & set(val_items)})
    if both:
        report("warning", f"{len(both)} item(s) are in both the training and the validation set (e.g. {both[0]}): "
                          "validation scores them after training on them")
    augs_config = augs.load_augs_config(config.sly_augs_path) if config.sly_augs_path else None
    vis = vis_items(config, train_items, val_items)
    config = config.replace(encoder_weights=resolve_encoder_weights(config, report))
    config = config.replace(train_batchnorm=resolve_train_batchnorm(config))
    return config, Inputs(project, model_classes, train_items, val_items, augs_config, vis)


def resolve_batch_size(batch_size: str | int, train_count: int, world_size: int, report) -> int:
    """--batch-size as the run uses it (per process): "auto" = the largest of AUTO_BATCH_SIZES that makes
    AUTO_BATCH_MIN_STEPS steps an epoch, else the smallest."""
    per_process = math.ceil(train_count / world_size)
    shared = f" over {world_size} processes" if world_size > 1 else ""
    if batch_size == "auto":
        steps = lambda size: math.ceil(per_process / size)  # noqa: E731
        batch_size = next((b for b in AUTO_BATCH_SIZES if steps(b) >= AUTO_BATCH_MIN_STEPS), AUTO_BATCH_SIZES[-1])
        report("info", f"--batch-size auto: {batch_size}, {steps(batch_size)} steps an epoch "
                       f"({train_count} training items{shared})")
    elif batch_size > per_process:
        report("warning", f"--batch-size {batch_size} is larger than the {train_count} training item(s){shared}: "
                          f"each epoch is a single batch of {per_process}")
    return batch_size


def make_splits(config: TrainConfig, project, items):
    if config.split == "random":
        return data.split_random(items, config.val_percent, config.seed)
    if config.split == "datasets":
        return data.split_by_datasets(items, config.train_datasets, config.val_datasets)
    if config.split == "tags":
        return data.split_by_tags(items, project.meta, config.train_tag, config.val_tag, config.untagged)
    return data.split_from_files(items, config.train_set, config.val_set)


def vis_items(config: TrainConfig, train_items, val_items) -> dict[str, list[int]]:
    """Positions of the items previewed each round: those of --train/val-vis-items-path, else --vis-count
    drawn by --seed."""
    chosen = {}
    for split, items, path, seed in (("train", train_items, config.train_vis_items_path, config.seed),
                                     ("val", val_items, config.val_vis_items_path, config.seed + 1)):
        if path:
            chosen[split] = data.indices_in_split(items, path, f"--{split}-vis-items-path", split)
        else:
            indices = list(range(len(items)))
            random.Random(seed).shuffle(indices)
            chosen[split] = sorted(indices[: max(0, config.vis_count)])
    return chosen


def resolve_encoder_weights(config: TrainConfig, report) -> str:
    """'none', 'imagenet' (in the torch cache now, downloaded if need be) or a file. 'auto' = imagenet when
    the architecture has a pretrained encoder and its weights can be had, else none (with a warning)."""
    spec = config.encoder_weights
    encoder = model_list[config.model]["pretrained_encoder"]
    if spec not in ("auto", "none", "imagenet"):
        if not os.path.isfile(spec):
            raise ArgsError(f"--encoder-weights: file {spec} not found")
        return spec
    if spec == "none" or (spec == "auto" and (encoder is None or config.custom_weights)):
        return "none"
    if encoder is None:
        raise ArgsError(f"--encoder-weights imagenet: {config.model} has no pretrained encoder; use --encoder-weights none")
    try:
        pretrained.ensure_cached(encoder, report)
    except pretrained.EncoderWeightsMissing as e:
        if spec == "imagenet":
            raise ArgsError(str(e)) from None
        report("warning", f"{e}. Training {config.model} from scratch.")
        return "none"
    return "imagenet"


def resolve_train_batchnorm(config: TrainConfig) -> str:
    """--train-batchnorm auto: on for an architecture without BatchNorm that starts wholly from scratch
    (bench/RESULTS.md: it learns much faster); off where layers start trained, as it was."""
    if config.train_batchnorm != "auto":
        return config.train_batchnorm
    scratch = config.encoder_weights == "none" and not config.custom_weights
    return "on" if scratch and model_list[config.model]["train_batchnorm"] else "off"


def build_model(config: TrainConfig, class_names: list[str], report) -> torch.nn.Module:
    model = build_architecture(config.model, len(class_names), config.encoder_weights, config.init)
    if config.custom_weights:
        try:
            load_custom_weights(model, config.custom_weights, class_names, report, config.custom_weights_classes)
        except CustomWeightsError as e:
            raise ArgsError(str(e)) from None
    if config.train_batchnorm == "on":
        add_training_norms(model)
    return model


def check_output_storage(config: TrainConfig, model) -> None:
    """A read-only --output or one without room for the run's checkpoints fails now, naming the folder,
    not after hours of training."""
    target = RunFolder(config.output)
    existing = next(p for p in (target.root, *target.root.parents) if p.exists())
    if not existing.is_dir():
        raise ArgsError(f"--output: {existing} is a file, not a folder")
    for folder in (existing, target.checkpoints, target.info):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only mount
            raise ArgsError(f"--output: cannot write to {folder} (read-only or no permission)")
    # Peak use: kept + best + last model files, one more while the best is replaced, and the resume state
    # (weights + optimizer moments) twice while it is rewritten.
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kept = 0 if config.checkpoint_interval == 0 else (
        config.epochs // config.checkpoint_interval if config.max_keep_ckpts < 0 else config.max_keep_ckpts)
    resume_bytes = model_bytes * (2 if config.optimizer == "SGD" else 3)
    need = model_bytes * (kept + config.save_best + config.save_last + 1) + 2 * resume_bytes
    if config.resume:  # files already there are rewritten in place
        need -= sum(f.stat().st_size for f in target.checkpoints.glob("*") if f.is_file())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ArgsError(f"--output: {existing} has {free / 2**20:.0f} MB free, but this run's checkpoints need about "
                        f"{need / 2**20:.0f} MB; free some space, choose another --output or lower --max-keep-ckpts")


@contextmanager
def prepared_data(config: TrainConfig, inputs: Inputs, report):
    """The decoded-image caches of both splits (for spatial augmentations the training one also at more
    detail); removed on the way out."""
    names = inputs.class_names
    spatial = inputs.augs_config is not None and augs.is_spatial(inputs.augs_config)
    detail = data.detail_scale(inputs.train_items, config.input_height, config.input_width) if spatial else 1.0
    size = (config.input_height, config.input_width)
    train_data = data.PreparedData(inputs.train_items, inputs.project.meta, names, *size, config.cache_dir,
                                   detail_scale=detail)
    try:
        val_data = data.PreparedData(inputs.val_items, inputs.project.meta, names, *size, config.cache_dir)
    except data.DataError:
        train_data.close()  # its cache would stay on disk as long as the traceback lives
        raise
    try:
        skipped = train_data.skipped_geometries + val_data.skipped_geometries
        if skipped:
            report("warning", "labels without area were skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(skipped.items())))
        pixels = train_data.pixel_counts + val_data.pixel_counts
        unlabelled = [name for name, n in zip(names, pixels) if n == 0 and name != data.BG_CLASS]
        if unlabelled:
            raise data.DataError(f"class(es) {', '.join(map(repr, unlabelled))} have no labelled pixels in the "
                                 "training or validation items; label them or leave them out of --classes")
        yield train_data, val_data
    finally:
        train_data.close()
        val_data.close()


# ---- the run ------------------------------------------------------------------------------------

class Trainer:
    """The run in progress: its model, optimizer, schedule, loaders, run folder and history."""

    def __init__(self, config: TrainConfig, reporter: Reporter, inputs: Inputs, model, criterion, train_data,
                 val_data, dist_ctx, started: float):
        self.config, self.reporter, self.report, self.inputs = config, reporter, reporter.message, inputs
        self.model, self.criterion, self.train_data, self.val_data = model, criterion, train_data, val_data
        self.dist = dist_ctx
        self.device = dist_ctx.device
        self.amp_dtype = resolve_amp(config.amp, self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.started = started
        self.history: list[dict] = []
        self.start_epoch = 1

    def run(self, ui_state: dict | None) -> dict:
        self.set_up()
        self.open_folder(ui_state)
        config = self.config
        self.reporter.start({
            "epochs": config.epochs, "start_epoch": self.start_epoch, "iters_per_epoch": len(self.train_loader),
            "val_iters": len(self.val_loader), "train_size": len(self.train_data), "val_size": len(self.val_data),
            "classes": self.inputs.class_names, "device": str(self.device), "amp": dtype_name(self.amp_dtype),
            "model": config.model, "output_dir": str(self.folder.root), "world_size": self.dist.world_size,
            "pid": os.getpid()})
        steps = config.epochs * len(self.train_loader)
        if steps < FEW_STEPS and not config.resume and self.dist.is_main:
            self.report("warning", f"this run makes only {steps} optimizer steps ({len(self.train_data)} training items "
                                   f"at batch {config.batch_size}, {config.epochs} epochs); a model rarely learns in "
                                   f"fewer than {FEW_STEPS}: raise --epochs to "
                                   f"{-(-FEW_STEPS // len(self.train_loader))} or more")
        status, epoch = self.train_epochs()
        return self.finish(status, epoch)

    def set_up(self) -> None:
        """The model on its device (DDP-wrapped for training in a distributed run), loss, optimizer, loaders,
        schedule, BatchNorm momentum and fp16 gradient scaler."""
        config, device = self.config, self.device
        self.model.to(device, memory_format=self.memory_format)
        fresh = not (config.custom_weights or config.resume)
        if config.init == "lsuv" and model_list[config.model]["lsuv"] and fresh:
            self.scale_to_data()
        self.model, train_model = self.dist.prepare_model(self.model, config.sync_bn)  # checkpoints: the plain module
        self.step_model = torch.compile(train_model) if config.compile else train_model
        self.criterion.to(device)
        groups = parameter_groups(self.model, config.lr, config.decoder_lr_factor)
        self.optimizer = build_optimizer(config.optimizer, groups, config.lr, config.momentum, config.weight_decay,
                                         config.nesterov)
        self.sampler, self.train_loader, self.val_loader = make_loaders(config, self.train_data, self.val_data,
                                                                        self.inputs.augs_config, self.dist, device)
        self.scheduler, self.per_iteration = build_scheduler(config.lr_schedule, self.optimizer, len(self.train_loader),
                                                             **{k: getattr(config, k) for k in SCHEDULE_OPTIONS})
        set_bn_momentum(self.model, config.bn_momentum, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None

    def scale_to_data(self) -> None:
        """--init lsuv: the untrained layers scaled on LSUV_IMAGES training images spread over the set (neighbours
        in a project are often alike), by model.scale_to_data. Not the batch size: every process, whatever its
        share of the batch, scales on the same images, so a torchrun run starts as a single process does."""
        count = min(LSUV_IMAGES, len(self.train_data))
        spread = np.linspace(0, len(self.train_data) - 1, count).round().astype(int)
        images = torch.from_numpy(np.stack([np.asarray(self.train_data.images[i]) for i in spread]))
        inputs = normalize_batch(images.to(self.device)).contiguous(memory_format=self.memory_format)
        keep = encoder_parameters(self.model) if self.config.encoder_weights != "none" else set()
        if scale_to_data(self.model, inputs, keep) and self.dist.is_main:
            self.report("info", f"--init lsuv: layers scaled to unit output variance on {count} training images")

    def open_folder(self, ui_state: dict | None) -> None:
        """The run folder: a resumed run's own, else --output or a free name beside it; rank 0 alone writes."""
        config = self.config
        folder = choose_run_folder(config)
        if folder.root != RunFolder(config.output).root:
            self.report("info", f"{config.output} exists and is not empty: writing to {folder.root}")
        self.config = config = config.replace(output=str(folder.root), checkpoints_dir=None)  # train_args.json: --output
        self.folder = folder
        if self.dist.is_main:
            for path in (folder.checkpoints, folder.info, folder.charts, folder.previews):
                path.mkdir(parents=True, exist_ok=True)
        self.saver = CheckpointSaver(folder.checkpoints, config.checkpoint_interval, config.max_keep_ckpts,
                                     config.best_metric, config.save_best, config.save_last)
        if config.resume:
            self.resume()
        elif self.dist.is_main:
            self.write_info(ui_state)
        if self.dist.is_main and not folder.calibration.is_file():  # also for a resumed run that predates it
            save_calibration_images(folder.calibration, self.train_data.images)
        if self.dist.is_main:
            for split, prepared in zip(SPLITS, (self.train_data, self.val_data)):
                atomic_write_json(folder.vis_items(split), [prepared.items[i].key for i in self.inputs.vis[split]])

    def write_info(self, ui_state: dict | None) -> None:
        """train_args.json and info/ of a new run. A ui_state.json already there (the original app's dashboard
        writes one before it starts the trainer) keeps its other fields."""
        folder, inputs = self.folder, self.inputs
        atomic_write_json(folder.train_args, self.config.record())
        atomic_write_json(folder.model_classes, [c.to_json() for c in inputs.model_classes])
        caller_state = json.loads(folder.ui_state.read_text()) if folder.ui_state.is_file() else {}
        state = ui_state or ui_state_from_config(self.config, inputs.model_classes)
        atomic_write_json(folder.ui_state, {**caller_state, **state})
        for split, prepared in zip(SPLITS, (self.train_data, self.val_data)):
            atomic_write_json(folder.split_set(split), [i.key for i in prepared.items])
        if inputs.augs_config is not None:
            atomic_write_json(folder.augs_config, inputs.augs_config)
            atomic_write_text(folder.augs_preview, augs.augs_to_python(inputs.augs_config))

    def resume(self) -> None:
        folder = self.folder
        if not folder.resume_state.is_file():
            raise ArgsError(f"--resume: {folder.resume_state} is missing: the run ended before its first epoch; "
                            "start it anew")
        state = torch.load(folder.resume_state, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.saver.load_state_dict(state["saver"])
        self.history = state["history"]
        # A run that died after logging an epoch but before saving its resume state would log that epoch twice.
        if self.dist.is_main:
            write_metrics_log(folder, self.history)
            for stale in [*folder.checkpoints.glob(".*.tmp"), *folder.info.rglob(".*.tmp")]:  # a kill mid-save
                stale.unlink()
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = state["epoch"] + 1
        self.report("info", f"resuming {folder.root} at epoch {self.start_epoch} of {self.config.epochs}")

    def train_epochs(self) -> tuple[str, int]:
        """Epochs until the last, a stop (SIGTERM, the dashboard's Stop) or a failure; (status, last epoch)."""
        epoch, folder = self.start_epoch - 1, self.folder
        with stop_on_sigterm(self.reporter):
            try:
                for epoch in range(self.start_epoch, self.config.epochs + 1):
                    record = self.train_epoch(epoch)
                    self.validate(epoch, record)
                    self.history.append(record)
                    if self.dist.is_main:
                        self.save(epoch, record)
                    self.reporter.epoch_end(epoch, record)
                    if self.dist.any(self.reporter.should_stop()) and epoch < self.config.epochs:
                        raise StopRequested()  # asked during validation or saving: stop now, not a step later
            except StopRequested:
                self.report("info", f"stop requested during epoch {epoch}: saving the current weights as the last "
                                    "checkpoint")
                return "stopped", epoch
            except (NonFiniteLoss, StorageError) as e:
                self.report("error", f"{e}. Checkpoints saved so far are kept in {folder.checkpoints}")
                # Written on failure too, else a resumed run's old summary would stay (a full disk may refuse it).
                if self.dist.is_main:
                    with suppress(StorageError):
                        write_summary(self.reporter, folder, self.summary("failed", epoch))
                if isinstance(e, StorageError):  # the CLI prints only the exception: say what is safe and what next
                    raise StorageError(f"{e}; the checkpoints saved so far are intact in {folder.checkpoints}; "
                                       f"once it can be written, continue with --resume {folder.root}") from None
                raise
        return "finished", epoch

    def train_epoch(self, epoch: int) -> dict:
        config, reporter, iterations = self.config, self.reporter, len(self.train_loader)
        reporter.epoch_start(epoch)
        self.sampler.set_epoch(epoch)

        def on_step(iteration, loss, lr):
            if iteration % config.metrics_period == 0 or iteration == iterations:
                reporter.train_step(epoch, iteration, iterations, loss, lr)
            if self.dist.any(reporter.should_stop()):  # every rank stops at the same step
                raise StopRequested()

        epoch_schedule = self.scheduler is not None and not self.per_iteration
        if epoch_schedule and config.scheduler_order == "before":
            with warnings.catch_warnings():  # torch warns about exactly this order, which is the point
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        lr = current_lr(self.optimizer)
        skipped: list[int] = []
        loss = train_one_epoch(self.step_model, self.criterion, self.optimizer, self.train_loader, self.device,
                               epoch=epoch, scheduler=self.scheduler if self.per_iteration else None,
                               scaler=self.scaler, amp_dtype=self.amp_dtype, memory_format=self.memory_format,
                               on_step=on_step, on_skip=skipped.append, clip_grad_norm=config.clip_grad_norm)
        if epoch_schedule and config.scheduler_order == "after":
            self.scheduler.step()
        record = {"epoch": epoch, "train_loss": self.dist.mean(loss), "lr": lr}  # ranks' shares are equal-sized
        if self.scaler is not None:
            record["amp_skipped_steps"] = len(skipped)
            if skipped and self.dist.is_main:
                self.report("warning", f"fp16: the gradient scaler skipped {len(skipped)} of {iterations} step(s) in "
                                       f"epoch {epoch} (inf/NaN gradients; iterations "
                                       f"{', '.join(map(str, skipped[:10]))}); if this repeats, use --amp bf16 or off")
        return record

    def validate(self, epoch: int, record: dict) -> None:
        """Every --val-interval epochs and after the last: the validation metrics join ``record``."""
        if epoch % self.config.val_interval and epoch != self.config.epochs:
            return
        record.update(validate(self.model, self.criterion, self.val_loader, self.device, self.inputs.class_names,
                               self.amp_dtype, self.memory_format,
                               progress=lambda done, total: self.reporter.val_progress(epoch, done, total),
                               reduce=self.dist.all_reduce_sum))

    def save(self, epoch: int, record: dict) -> None:
        """Rank 0 after each epoch: the metrics log, checkpoints, previews, charts and the resume state."""
        folder, config, validated = self.folder, self.config, "val_loss" in record
        if collapse_warning(self.history, epoch == config.epochs):
            self.report("warning", collapse_advice(config, record["collapsed_to"]))
        write_metrics_log(folder, self.history)
        self.saver.on_epoch_end(self.model, epoch, record if validated else None)
        if epoch % config.vis_interval == 0 or epoch == config.epochs:
            self.previews(epoch)
        if validated:
            save_charts(self.history, folder.charts, self.inputs.class_names)
        atomic_torch_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                           "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                           "saver": self.saver.state_dict(), "history": self.history, "epoch": epoch,
                           "torch_rng": torch.get_rng_state()}, folder.resume_state)

    def previews(self, epoch: int) -> None:
        classes = self.inputs.model_classes
        colors = [c.color for c in classes]
        background = data.background_index(self.inputs.class_names)
        for split, prepared in zip(SPLITS, (self.train_data, self.val_data)):
            indices = self.inputs.vis[split]
            if not indices:
                continue
            images = np.stack([prepared.images[i] for i in indices])
            probabilities = predict_probabilities(self.model, images, self.device, self.amp_dtype)
            predictions = probabilities.argmax(1).to(torch.uint8).cpu().numpy()
            panels = [(prepared.items[i].item_name,
                       preview_panel(images[k], prepared.masks[i], predictions[k], colors, background))
                      for k, i in enumerate(indices)]
            save_png(self.folder.preview(split, epoch), np.concatenate([p for _, p in panels], axis=0))
            self.reporter.previews(epoch, split, panels)

    def finish(self, status: str, epoch: int) -> dict:
        """The last checkpoint, the charts, the evaluation of a finished run, and the summary."""
        if not self.dist.is_main:
            return self.summary(status, epoch)
        last = self.saver.on_train_end(self.model, max(epoch, 1))  # a stop in epoch 1 still leaves model_001_last
        if self.history:
            save_charts(self.history, self.folder.charts, self.inputs.class_names)
        summary = self.summary(status, epoch, last)
        config = self.config
        if config.eval and status == "finished":  # a stopped run was asked to end now
            summary["eval"] = evaluate_training_run(summary, config.project_dir, self.val_data.items, self.device,
                                                    config.amp, config.speed_test, config.batch_size, self.report)
        return write_summary(self.reporter, self.folder, summary)

    def summary(self, status: str, epoch: int, last=None) -> dict:
        best, saver = None, self.saver
        if saver.best_path:
            record = next(r for r in self.history if RunFolder.checkpoint_name(r["epoch"], "best") == saver.best_path)
            best = {"metric": self.config.best_metric, "value": saver.best_value, "epoch": record["epoch"],
                    "checkpoint": str(self.folder.checkpoints / saver.best_path),
                    "metrics": {k: v for k, v in record.items() if k != "epoch"}}
        return {"status": status, "epochs": self.config.epochs, "last_epoch": epoch, "output_dir": str(self.folder.root),
                "best": best, "last_checkpoint": str(last) if last else None,
                "final": self.history[-1] if self.history else None, "seconds": round(time.time() - self.started, 1)}


def make_loaders(config: TrainConfig, train_data, val_data, augs_config, dist, device: torch.device):
    """The epoch sampler, the training loader (augmented) and the validation loader, as every run makes them."""
    train_set, val_set = data.SlySegDataset(train_data, augs_config, seed=config.seed), data.SlySegDataset(val_data)
    sampler = dist.epoch_sampler(len(train_set), config.seed)
    workers = resolve_num_workers(config.num_workers, device)
    return (sampler, data.make_loader(train_set, config.batch_size, sampler, workers, device),
            data.make_loader(val_set, config.batch_size, dist.shard_sampler(len(val_set)), workers, device))


def choose_run_folder(config: TrainConfig) -> RunFolder:
    """--output (--resume's folder), or a free name beside it when it holds something. A folder that the
    original app's dashboard prepared for --checkpoints-dir (info/ written, no run started) is the run's own."""
    folder = RunFolder(config.output)
    if config.resume or (config.checkpoints_dir and not folder.has_started()):
        return folder
    return RunFolder(free_output_dir(folder.root))


def free_output_dir(path):
    """``path`` if free or empty, else the first free ``path_NNN`` (as the platform names folders)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    for i in range(1000):
        candidate = path.with_name(f"{path.name}_{i:03d}")
        if not candidate.exists():
            return candidate
    raise ArgsError(f"--output: no free folder name next to {path}")


def ui_state_from_config(config: TrainConfig, model_classes) -> dict:
    """What the dashboard would hold for this run; serving reads selectedModel and imgSize."""
    return {
        "selectedModel": config.model,
        "imgSize": {"width": config.input_width, "height": config.input_height},
        "selectedClasses": [c.name for c in model_classes if c.name != data.BG_CLASS],
        "augsConfig": config.sly_augs_path,
        "epochs": config.epochs,
        "batchSizePerGPU": config.batch_size,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "lrSchedule": config.lr_schedule,
        "gpusId": config.gpu_id,
        "weightsInitialization": "custom" if config.custom_weights else config.encoder_weights,
    }


def collapse_warning(history: list[dict], last_epoch: bool) -> bool:
    """Warn once: after COLLAPSE_ROUNDS validation rounds in a row that predicted one class, or at the
    end of a shorter run whose last round did."""
    rounds = [r.get("collapsed_to") for r in history if "val_loss" in r]
    if not rounds or not rounds[-1]:
        return False
    streak = next((i for i, c in enumerate(reversed(rounds)) if c != rounds[-1]), len(rounds))
    return streak == COLLAPSE_ROUNDS or (last_epoch and streak < COLLAPSE_ROUNDS)


def collapse_advice(config: TrainConfig, class_name: str) -> str:
    tips = []
    if config.loss == "ce_dice" or not config.jaccard_weight:
        tips.append("--loss smooth_jaccard_nll --jaccard-weight 0.5 (its log-Jaccard term pulls hardest on a class "
                    "the model misses)")
    if config.init == "original":
        tips.append("--init lsuv")
    tips.append("--class-weights to weigh rare classes up" if not config.class_weights else "larger --class-weights")
    tips.append(f"more --epochs, or another --lr than {config.lr:g}")
    if not config.clip_grad_norm:
        tips.append("--clip-grad-norm 1 (if the training loss jumps)")
    if not config.sly_augs_path:
        tips.append("an augmentation template (--sly-augs-path)")
    return (f"the model predicts {class_name!r} almost everywhere on validation: it has collapsed to one class. "
            f"Try {'; '.join(tips)}.")


def write_metrics_log(folder: RunFolder, history: list[dict]) -> None:
    """One line per epoch, rewritten whole: an append cut short by a kill or a full disk would leave half a line."""
    atomic_write_text(folder.metrics_log, "".join(json.dumps(r) + "\n" for r in history))


def write_summary(reporter: Reporter, folder: RunFolder, summary: dict) -> dict:
    try:
        atomic_write_json(folder.summary, summary)
    finally:  # a full or read-only disk must not keep the dashboard waiting for the end
        reporter.finish(summary)
    return summary


@contextmanager
def stop_on_sigterm(reporter: Reporter):
    """SIGTERM ends the run cleanly (last checkpoint saved) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: reporter.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
