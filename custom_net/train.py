"""Train a segmentation model on a Supervisely project.

    python custom_net/train.py --project-dir DIR --model UNet11 --classes kiwi lemon --epochs 30 --output results/exp1
    python custom_net/train.py --train-args results/exp1/checkpoints/train_args.json   # repeat a run
    python custom_net/train.py --resume results/exp1                                   # continue a stopped run
    python custom_net/train.py --demo                                                  # synthetic data, CPU-sized

``main(argv, reporter)`` is the single entry point for the CLI and the dashboard.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch

from custom_net import augs, distributed, original_app, pretrained, sly_seg_dataset as data
from custom_net.evaluate import evaluate_training_run
from custom_net.inference import predict_probabilities
from custom_net.custom_weights import CustomWeightsError, load_custom_weights
from custom_net.loss import LOSSES, build_loss
from custom_net.model import INIT_SCHEMES, UnknownModelError, build_model, model_list
from custom_net.quantize import CALIBRATION_FILE, save_calibration_images
from custom_net.reporting import Broadcast, ConsoleReporter, JsonLinesReporter, Reporter
from custom_net.checkpoints import CheckpointSaver
from custom_net.epoch import NonFiniteLoss, seed_everything, StopRequested, train_one_epoch
from custom_net.hardware import AMP_MODES, dtype_name, resolve_amp, resolve_num_workers
from custom_net.optim import (LR_SCHEDULES, OPTIMIZERS, SCHEDULE_OPTIONS, build_optimizer, build_scheduler, current_lr,
                              parameter_groups, set_bn_momentum)
from custom_net.storage import atomic_torch_save, atomic_write_json, atomic_write_text, StorageError
from custom_net.validation import evaluate
from custom_net.visualize import preview_panel, save_charts, save_png

BEST_METRICS = ("mean_fg_iou", "mean_iou", "mean_fg_dice", "mean_dice", "pixel_accuracy", "val_loss")
SPLIT_METHODS = ("random", "datasets", "tags", "files")
COLLAPSE_ROUNDS = 3  # validation rounds predicting one class before the run warns
FEW_STEPS = 30  # fewer optimizer steps in a whole run than this rarely train a model: the run says so
WARMUP_SHARE = 0.3  # default cosine warmup, as a share of the run (bench/RESULTS.md: AlbuNet needs a long one)
PREVIEWS_PER_RUN = 10  # --vis-interval 0
RESUME_STATE = "resume_state.pt"  # not *.pth: model_*.pth files must stay plain state dicts

# Options whose default depends on the architecture (model_list holds the values).
MODEL_DEFAULTS = ("lr", "decoder_lr_factor")
# Resuming a run started before an option existed: the behaviour of that time (and its optimizer layout).
BEFORE_OPTION_EXISTED = dict(bn_momentum=0.1, decoder_lr_factor=1.0)

# --demo: small enough to train on a laptop CPU in a few minutes.
DEMO_DEFAULTS = dict(model="UNet", encoder_weights="none", epochs=20, input_height=128, input_width=160,
                     batch_size=4, output="results/demo")

logger = logging.getLogger("custom_net")


def _per_model_default(key: str) -> str:
    """'1; AlbuNet 0.33': the most common per-architecture default of ``key``, then the architectures that differ."""
    values = [spec[key] for spec in model_list.values()]
    common = max(set(values), key=values.count)
    return "; ".join([f"{common:g}"] + [f"{name} {spec[key]:g}" for name, spec in model_list.items() if spec[key] != common])


class ArgsError(ValueError):
    """Bad command-line or train_args.json input; the message names the flag or file."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" says nothing: such flags describe their default
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of sys.exit so main(argv) callers get an exception
        raise ArgsError(message)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text):
    value = int(text)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (32, 64, ... 256 ...), got {value}")
    return value


def _workers(text):
    if text == "auto":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 'auto' or >= 0")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _bn_momentum(text):
    if text == "auto":
        return text
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or in (0, 1], got {text}")
    return value


def _lr_schedule(text):
    return text or "none"  # the original app passed "" for no schedule


def _milestones(text):
    """'5', or the original app's one-string form '[5, 10, 15]': a list of epochs (flattened by _Flatten)."""
    parts = [p for p in text.strip().strip("[]").replace(",", " ").split()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected epochs such as 5 10 15 or \"[5, 10, 15]\", got {text!r}")
    return [_positive_int(p) for p in parts]


class _Flatten(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for value in values for v in value])


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="custom_net/train.py", description=__doc__.split("\n\n")[0],
                formatter_class=_HelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--project-dir", help="Supervisely-format project folder")
    g.add_argument("--demo", action="store_true", help="build a synthetic demo project and train on it with CPU-sized defaults")
    g.add_argument("--train-args", metavar="JSON", help="train_args.json of an earlier run: its values become the defaults")
    g.add_argument("--preset", choices=("default", "original"), default="default",
                   help="'original' = the original app as its dashboard starts (Adam 1e-3 constant, jaccard_nll, "
                        "augmentations seg_simple, 10 epochs, best by validation loss ...: README); flags given "
                        "explicitly still win")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR from its last saved epoch")
    g.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="classes to segment, in this order = class ids (default: all with area); __bg__ (pixels of no "
                        "selected class) is class 0, or where this list names it")
    g.add_argument("--split", choices=SPLIT_METHODS, default=None,
                   help="how to make train / val sets (default: files when --train-set is given, else random)")
    g.add_argument("--val-percent", type=float, default=20.0, help="random split: share of items for validation")
    g.add_argument("--train-datasets", nargs="+", default=[], metavar="DS", help="split by datasets: training datasets")
    g.add_argument("--val-datasets", nargs="+", default=[], metavar="DS", help="split by datasets: validation datasets")
    g.add_argument("--train-tag", default="train", help="split by tags: tag of training items")
    g.add_argument("--val-tag", default="val", help="split by tags: tag of validation items")
    g.add_argument("--untagged", choices=("ignore", "train", "val"), default="ignore", help="split by tags: where items with neither tag go")
    g.add_argument("--train-set", metavar="JSON", help="split from files: train_set.json ([{dataset_name, item_name}])")
    g.add_argument("--val-set", metavar="JSON", help="split from files: val_set.json")
    g.add_argument("--sly-augs-path", default="", help="augmentation config (Supervisely / ImgAug Studio JSON) or a template name; empty = none")
    g.add_argument("--input-height", type=_size, default=256, help="model input height (multiple of 32)")
    g.add_argument("--input-width", type=_size, default=256, help="model input width (multiple of 32)")

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(model_list), default="UNet11", help="architecture")
    g.add_argument("--encoder-weights", default="auto",
                   help="ImageNet encoder weights: 'imagenet' (torch cache), a file path, 'none', or 'auto' (imagenet if cached, else none)")
    g.add_argument("--init", choices=INIT_SCHEMES, default="he",
                   help="initialisation of layers not loaded from ImageNet: he, or original (each layer's default)")
    g.add_argument("--bn-momentum", type=_bn_momentum, default="auto",
                   help="BatchNorm running-statistics momentum; auto = 1 / iterations per epoch, at least 0.1 "
                        "(PyTorch's), so the statistics validation uses cover about the last epoch")
    g.add_argument("--custom-weights", default="", metavar="PTH",
                   help="start from this state dict (a model_*.pth of an earlier run, the original app's too); its head "
                        "is mapped to this run's classes by name")
    g.add_argument("--custom-weights-classes", metavar="JSON",
                   help="the classes of --custom-weights, in its head's order (default: model_classes.json in the "
                        "info/ folder beside the checkpoint's checkpoints/)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=20)
    g.add_argument("--batch-size", type=_positive_int, default=8,
                   help="per process, i.e. per GPU: under torchrun the global batch is this times the number of processes")
    g.add_argument("--loss", choices=list(LOSSES), default="jaccard_nll", help="ce_dice = cross-entropy + soft Dice; jaccard_nll = the original (1-w)*NLL - w*log(soft Jaccard)")
    g.add_argument("--jaccard-weight", type=_fraction, default=0.5, help="w in the loss (Jaccard or Dice share)")
    g.add_argument("--class-weights", nargs="+", type=float, metavar="W", help="per-class loss weights, in class-id order")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, initial weights, order and augmentations")
    g.add_argument("--amp", choices=AMP_MODES, default="auto", help="mixed precision (auto = bf16 where the device runs it fast)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: pays on long GPU runs; compiling costs minutes, and on a CPU it was slower")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="Adam")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (default: the architecture's, " + _per_model_default("lr") + ")")
    g.add_argument("--decoder-lr-factor", type=_positive_float, default=None, metavar="F",
                   help="the layers outside the encoder train at F x --lr (default: the architecture's, "
                        + _per_model_default("decoder_lr_factor") + ")")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="SGD only")
    g.add_argument("--clip-grad-norm", type=_non_negative_float, default=1.0, metavar="MAX",
                   help="rescale gradients whose total norm exceeds MAX (0 = off)")

    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--lr-schedule", type=_lr_schedule, choices=LR_SCHEDULES, default="cosine",
                   help="cosine = linear warmup then cosine decay, per iteration; '' = none")
    g.add_argument("--step-size", type=_positive_int, default=5, help="StepLR: epochs between decays")
    g.add_argument("--gamma-step", type=float, default=0.1, help="StepLR / MultiStepLR factor")
    g.add_argument("--milestones", type=_milestones, nargs="+", action=_Flatten, default=[5, 10, 15],
                   help="MultiStepLR epochs: 5 10 15, or \"[5, 10, 15]\"")
    g.add_argument("--gamma-exp", type=float, default=0.9, help="ExponentialLR factor per epoch")
    g.add_argument("--warmup-epochs", type=_non_negative_float, default=None,
                   help=f"cosine: linear warmup length in epochs (default: {WARMUP_SHARE * 100:.0f}%% of --epochs)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="cosine: final learning rate")
    g.add_argument("--scheduler-order", choices=("after", "before"), default="after",
                   help="epoch schedules: step after each epoch, or before it as the original app did")

    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--val-interval", type=_positive_int, default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--best-metric", choices=BEST_METRICS, default="mean_fg_iou", help="chooses model_NNN_best.pth")
    g.add_argument("--checkpoint-interval", type=int, default=1, help="save model_NNN.pth every N epochs (0 = never)")
    g.add_argument("--max-keep-ckpts", type=int, default=2, help="how many model_NNN.pth to keep (-1 = all)")
    g.add_argument("--save-best", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--save-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, evaluate the best checkpoint on the validation set into <output>/eval/")
    g.add_argument("--speed-test", action=argparse.BooleanOptionalAction, default=True, help="include a speed test in the evaluation")

    g = p.add_argument_group("system and output")
    g.add_argument("--output", default="results/run", help="artifact folder (a free name is chosen if it exists)")
    g.add_argument("--gpu-id", default="auto", help="'cpu', 'cuda:N', or 'auto' (first GPU if any)")
    g.add_argument("--num-workers", type=_workers, default="auto",
                   help="DataLoader worker processes; auto = none on the CPU (the cores train), up to 8 with a GPU")
    g.add_argument("--cache-dir", default=None, help="where the decoded-image cache lives during the run (default: system temp)")
    g.add_argument("--metrics-period", type=_positive_int, default=10, help="report training loss every N iterations")
    g.add_argument("--vis-count", type=int, default=3, help="prediction-preview items per split")
    g.add_argument("--vis-interval", type=int, default=0,
                   help="previews every N epochs (0 = about ten times per run; twenty with --preset original)")
    g.add_argument("--reporter", choices=("console", "jsonl", "none"), default="console", help="progress output of the CLI")

    g = p.add_argument_group("the original app's flags", "accepted as its dashboard passed them (README: 'Coming from "
                             "the original app')")
    g.add_argument("--classes-path", metavar="JSON",
                   help="classes in order, as model_classes.json (class JSON objects); where it lists __bg__ is its id")
    g.add_argument("--train-set-path", dest="train_set", metavar="JSON", help="= --train-set")
    g.add_argument("--val-set-path", dest="val_set", metavar="JSON", help="= --val-set")
    g.add_argument("--checkpoints-dir", metavar="DIR",
                   help="the run's checkpoints/ folder: the run folder is its parent (= --output DIR/..); a run folder "
                        "prepared by the caller (info/ files, no checkpoints yet) is written into as it is")
    g.add_argument("--train-vis-items-path", metavar="JSON", help="training items to preview ([{dataset_name, item_name}])")
    g.add_argument("--val-vis-items-path", metavar="JSON", help="validation items to preview")
    g.add_argument("--sly", action="store_true",
                   help="report progress and metrics to the Supervisely task this runs in (TASK_ID, SERVER_ADDRESS, "
                        "API_TOKEN set) as the SDK's log events; they replace the console's progress bars there")

    g = p.add_argument_group("distributed (torchrun; see README 'Scaling out')")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="SyncBatchNorm: batch statistics over all GPUs (CUDA only)")
    g.add_argument("--dist-timeout", type=_positive_float, default=1800.0,
                   help="seconds a rank waits for the others before stopping with an error")
    return p


# Flags whose values describe where/how to run, not what is trained: left out of train_args.json checks.
_NOT_RECORDED = ("train_args", "resume", "demo")


def _load_json_defaults(parser, path: str) -> dict:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArgsError(f"--train-args: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArgsError(f"--train-args: {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ArgsError(f"--train-args: {path} must hold a JSON object of argument values")
    if original_app.is_original_train_args(values):  # replayed as the original app ran it
        values, note = original_app.translate_train_args(values, Path(path))
        if note:
            warnings.warn(f"--train-args {path}: {note}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ArgsError(f"--train-args: {path} has unknown argument(s): {', '.join(unknown)}")
    # Re-check every value the way its flag would be checked.
    for action in parser._actions:
        value = values.get(action.dest)
        if value is None:
            continue
        if action.type is not None:
            try:
                converted = [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise ArgsError(f"--train-args: {path}: {action.dest} = {value!r}: {e}") from None
        else:
            converted = value
        if action.choices is not None and converted not in action.choices:
            raise ArgsError(f"--train-args: {path}: {action.dest} = {value!r}; "
                            f"choose from {', '.join(map(str, action.choices))}")
    return {k: v for k, v in values.items() if k not in _NOT_RECORDED}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = parser.parse_args(argv)
    if first.resume:
        run_args = Path(first.resume) / "checkpoints" / "train_args.json"
        if not run_args.is_file():
            raise ArgsError(f"--resume: {first.resume} is not a run folder ({run_args} is missing)")
        # train_args.json records "output" too: override it, not pass it twice (a TypeError).
        parser.set_defaults(**{**BEFORE_OPTION_EXISTED, **_load_json_defaults(parser, str(run_args)),
                                "output": str(first.resume)})
    elif first.train_args:
        parser.set_defaults(**_load_json_defaults(parser, first.train_args))
    else:
        if first.demo:
            parser.set_defaults(**DEMO_DEFAULTS)
        if first.preset == "original":
            parser.set_defaults(**original_app.ORIGINAL_PRESET)
    args = parser.parse_args(argv)
    if args.resume:
        args.output = args.resume
    if not args.project_dir and not args.demo:
        raise ArgsError("--project-dir is required (or --demo for synthetic data)")
    given = _given_dests(argv)
    _resolve_original_flags(args, given)
    if args.train_args and args.project_dir and "project_dir" not in given and not Path(args.project_dir).is_dir():
        raise ArgsError(f"--train-args {args.train_args}: its project {args.project_dir} is not here; "
                        "give the project's folder with --project-dir")
    if args.split == "datasets" and not (args.train_datasets and args.val_datasets):
        raise ArgsError("--split datasets needs --train-datasets and --val-datasets")
    if args.split == "files" and not (args.train_set and args.val_set):
        raise ArgsError("--split files needs --train-set and --val-set")
    if args.checkpoint_interval < 0:
        raise ArgsError("--checkpoint-interval must be >= 0")
    for key in MODEL_DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, model_list[args.model][key])
    if args.warmup_epochs is None:
        args.warmup_epochs = round(WARMUP_SHARE * args.epochs, 3)
    if not args.vis_interval:
        per_run = original_app.ORIGINAL_PREVIEWS_PER_RUN if args.preset == "original" else PREVIEWS_PER_RUN
        args.vis_interval = max(1, args.epochs // per_run)
    return args


def _given_dests(argv: list[str]) -> set[str]:
    """The options given on the command line itself (not defaults, presets or train_args.json)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _resolve_original_flags(args, given: set[str]) -> None:
    """The original app's flags in this app's terms. A flag given on the command line wins over the other
    form of it from a train_args.json; both forms on the command line are an error."""
    for ours, theirs in (("classes", "classes_path"), ("output", "checkpoints_dir")):
        if {ours, theirs} <= given:
            raise ArgsError(f"give --{ours.replace('_', '-')} or --{theirs.replace('_', '-')}, not both")
    if args.classes_path and "classes" not in given:
        try:
            args.classes = original_app.read_class_titles(args.classes_path, "--classes-path")
        except ValueError as e:
            raise ArgsError(str(e)) from None
    args.classes_path = None  # now in --classes, which train_args.json records
    if args.checkpoints_dir and "output" not in given and not args.resume:
        args.output = str(Path(args.checkpoints_dir).parent)
        if Path(args.checkpoints_dir).name != "checkpoints":
            warnings.warn(f"--checkpoints-dir {args.checkpoints_dir}: the checkpoints go to {args.output}/checkpoints "
                          "(the run folder's layout)")
    else:
        args.checkpoints_dir = None
    if args.split is None:
        args.split = "files" if args.train_set or args.val_set else "random"


def _resolve_encoder_weights(args, report) -> str:
    """'none', 'imagenet' (in the torch cache now, downloaded if need be) or a file. 'auto' = imagenet when
    the architecture has a pretrained encoder and its weights can be had, else none (with a warning)."""
    spec = args.encoder_weights
    encoder = model_list[args.model]["pretrained_encoder"]
    if spec not in ("auto", "none", "imagenet"):
        if not Path(spec).is_file():
            raise ArgsError(f"--encoder-weights: file {spec} not found")
        return spec
    if spec == "none" or (spec == "auto" and (encoder is None or args.custom_weights)):
        return "none"
    if encoder is None:
        raise ArgsError(f"--encoder-weights imagenet: {args.model} has no pretrained encoder; use --encoder-weights none")
    try:
        pretrained.ensure_cached(encoder, report)
    except pretrained.EncoderWeightsMissing as e:
        if spec == "imagenet":
            raise ArgsError(str(e)) from None
        report("warning", f"{e}. Training {args.model} from scratch.")
        return "none"
    return "imagenet"


def _make_paths_absolute(args) -> None:
    """train_args.json must repeat the run from any working directory."""
    for name in ("project_dir", "train_set", "val_set", "custom_weights", "cache_dir", "output"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    if args.sly_augs_path and args.sly_augs_path not in augs.list_templates():
        args.sly_augs_path = str(Path(args.sly_augs_path).expanduser().resolve())
    if args.encoder_weights not in ("none", "imagenet"):
        args.encoder_weights = str(Path(args.encoder_weights).expanduser().resolve())


def _free_output_dir(path: Path) -> Path:
    """``path`` if free or empty, else the first free ``path_NNN`` (as the platform names folders)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    for i in range(1000):
        candidate = path.with_name(f"{path.name}_{i:03d}")
        if not candidate.exists():
            return candidate
    raise ArgsError(f"--output: no free folder name next to {path}")


def _check_output_storage(args, model) -> None:
    """A read-only --output or one without room for the run's checkpoints fails now, naming the folder,
    not after hours of training."""
    target = Path(args.output)
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ArgsError(f"--output: {existing} is a file, not a folder")
    for folder in (existing, existing / "checkpoints", existing / "info"):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only mount
            raise ArgsError(f"--output: cannot write to {folder} (read-only or no permission)")
    # Peak use: kept + best + last model files, one more while the best is replaced, and the resume state
    # (weights + optimizer moments) twice while it is rewritten.
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kept = 0 if args.checkpoint_interval == 0 else (
        args.epochs // args.checkpoint_interval if args.max_keep_ckpts < 0 else args.max_keep_ckpts)
    resume_bytes = model_bytes * (2 if args.optimizer == "SGD" else 3)
    need = model_bytes * (kept + args.save_best + args.save_last + 1) + 2 * resume_bytes
    if args.resume:  # files already there are rewritten in place
        need -= sum(f.stat().st_size for f in (target / "checkpoints").glob("*") if f.is_file())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ArgsError(f"--output: {existing} has {free / 2**20:.0f} MB free, but this run's checkpoints need about "
                        f"{need / 2**20:.0f} MB; free some space, choose another --output or lower --max-keep-ckpts")


def _make_splits(args, project, items):
    meta = project.meta
    if args.split == "random":
        return data.split_random(items, args.val_percent, args.seed)
    if args.split == "datasets":
        return data.split_by_datasets(items, args.train_datasets, args.val_datasets)
    if args.split == "tags":
        return data.split_by_tags(items, meta, args.train_tag, args.val_tag, args.untagged)
    return data.split_from_files(items, args.train_set, args.val_set)


def _vis_items(args, train_items, val_items) -> dict[str, list[int]]:
    """Indices of the items previewed each round: those of --train/val-vis-items-path, else --vis-count
    drawn by --seed."""
    chosen = {}
    for split, items, path, seed in (("train", train_items, args.train_vis_items_path, args.seed),
                                     ("val", val_items, args.val_vis_items_path, args.seed + 1)):
        if path:
            chosen[split] = data.indices_in_split(items, path, f"--{split}-vis-items-path", split)
        else:
            indices = list(range(len(items)))
            random.Random(seed).shuffle(indices)
            chosen[split] = sorted(indices[: max(0, args.vis_count)])
    return chosen


def _output_dir(args) -> Path:
    """The run folder: --output (--resume's folder), or a free name beside it when it holds something. A
    folder that the original app's dashboard prepared for --checkpoints-dir (info/ written, no checkpoints
    yet) is the run's own."""
    path = Path(args.output)
    if args.resume:
        return path
    prepared = args.checkpoints_dir and not any(
        next((path / "checkpoints").glob(pattern), None) for pattern in ("model_*.pth", RESUME_STATE, "train_args.json"))
    return path if prepared else _free_output_dir(path)


@contextmanager
def _stop_on_sigterm(reporter: Reporter):
    """SIGTERM ends the run cleanly (last checkpoint saved) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: reporter.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _make_reporter(name: str) -> Reporter:
    return {"console": ConsoleReporter, "jsonl": JsonLinesReporter, "none": Reporter}[name]()


def _with_platform_task(reporter: Reporter) -> Reporter:
    """--sly: report to the Supervisely task this process runs in, when it runs in one. There the task log
    is the console: the SDK's progress events replace the console's progress bars, which would break up
    their JSON lines."""
    from custom_net import sly_integration

    if not sly_integration.in_platform_task():
        reporter.message("info", "--sly: not running in a Supervisely task (TASK_ID, SERVER_ADDRESS, API_TOKEN are "
                                 "not set): progress goes to this output only")
        return reporter
    task = sly_integration.TaskLogReporter()
    return task if type(reporter) is ConsoleReporter else Broadcast(reporter, task)


def ui_state_from_args(args, model_classes) -> dict:
    """What the dashboard would hold for this run; serving reads selectedModel and imgSize."""
    return {
        "selectedModel": args.model,
        "imgSize": {"width": args.input_width, "height": args.input_height},
        "selectedClasses": [c.name for c in model_classes if c.name != data.BG_CLASS],
        "augsConfig": args.sly_augs_path,
        "epochs": args.epochs,
        "batchSizePerGPU": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "lrSchedule": args.lr_schedule,
        "gpusId": args.gpu_id,
        "weightsInitialization": "custom" if args.custom_weights else args.encoder_weights,
    }


def main(argv: list[str] | None = None, reporter: Reporter | None = None, ui_state: dict | None = None) -> dict:
    """Run training; returns the summary. Bad input raises (ArgsError / DataError / AugsConfigError)
    before the output folder is created."""
    args = parse_args(argv)
    reporter = reporter or _make_reporter(args.reporter if distributed.env_rank() == 0 else "none")  # rank 0 reports
    if args.sly and distributed.env_rank() == 0:
        reporter = _with_platform_task(reporter)
    report = reporter.message

    # ---- everything that can be wrong with the input is checked before the output folder exists
    if args.demo and not args.project_dir:
        from custom_net.demo import demo_project_dir
        args.project_dir = str(demo_project_dir())
    project = data.open_project(args.project_dir)
    items = data.list_items(project)
    model_classes = data.build_model_classes(project.meta, args.classes)
    class_names = [c.name for c in model_classes]
    train_items, val_items = _make_splits(args, project, items)
    both = sorted({i.key["dataset_name"] + "/" + i.key["item_name"] for i in set(train_items) & set(val_items)})
    if both:
        report("warning", f"{len(both)} item(s) are in both the training and the validation set (e.g. {both[0]}): "
                          "validation scores them after training on them")
    augs_config = augs.load_augs_config(args.sly_augs_path) if args.sly_augs_path else None
    vis_items = _vis_items(args, train_items, val_items)
    args.encoder_weights = _resolve_encoder_weights(args, report)
    _make_paths_absolute(args)
    dist_ctx = distributed.setup(args.gpu_id, args.dist_timeout, args.sync_bn)  # world_size 1 outside torchrun
    device = dist_ctx.device
    amp_dtype = resolve_amp(args.amp, device)
    seed_everything(args.seed)
    model = build_model(args.model, len(model_classes), args.encoder_weights, args.init)
    if args.custom_weights:
        try:
            load_custom_weights(model, args.custom_weights, class_names, report, args.custom_weights_classes)
        except CustomWeightsError as e:
            raise ArgsError(str(e)) from None
    criterion = build_loss(args.loss, len(model_classes), args.jaccard_weight, args.class_weights)
    _check_output_storage(args, model)
    if args.batch_size > len(train_items):
        report("warning", f"--batch-size {args.batch_size} is larger than the {len(train_items)} training item(s): "
                          f"each epoch is a single batch of {len(train_items)}")

    started = time.time()
    detail = (data.detail_scale(train_items, args.input_height, args.input_width)
              if augs_config is not None and augs.is_spatial(augs_config) else 1.0)
    train_data = data.PreparedData(train_items, project.meta, class_names, args.input_height, args.input_width,
                                   args.cache_dir, detail_scale=detail)
    try:
        val_data = data.PreparedData(val_items, project.meta, class_names, args.input_height, args.input_width, args.cache_dir)
    except data.DataError:
        train_data.close()  # its cache would stay on disk as long as the traceback lives
        raise
    try:
        skipped = train_data.skipped_geometries + val_data.skipped_geometries
        if skipped:
            report("warning", "labels without area were skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(skipped.items())))
        unlabelled = [name for name, n in zip(class_names, train_data.pixel_counts + val_data.pixel_counts)
                      if n == 0 and name != data.BG_CLASS]
        if unlabelled:
            raise data.DataError(f"class(es) {', '.join(map(repr, unlabelled))} have no labelled pixels in the "
                                 "training or validation items; label them or leave them out of --classes")
        return _run(args, reporter, ui_state, project, model_classes, train_data, val_data, augs_config, vis_items,
                    model, criterion, device, amp_dtype, started, dist_ctx)
    finally:
        train_data.close()
        val_data.close()


def _run(args, reporter, ui_state, project, model_classes, train_data, val_data, augs_config, vis,
         model, criterion, device, amp_dtype, started, dist_ctx) -> dict:
    report = reporter.message
    class_names = [c.name for c in model_classes]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    model, train_model = dist_ctx.prepare_model(model, args.sync_bn)  # DDP trains; `model` is the plain module
    criterion.to(device)
    optimizer = build_optimizer(args.optimizer, parameter_groups(model, args.lr, args.decoder_lr_factor), args.lr,
                                args.momentum, args.weight_decay, args.nesterov)
    step_model = torch.compile(train_model) if args.compile else train_model  # checkpoints come from `model`

    train_set = data.SlySegDataset(train_data, augs_config, seed=args.seed)
    val_set = data.SlySegDataset(val_data)
    sampler = dist_ctx.epoch_sampler(len(train_set), args.seed)
    workers = resolve_num_workers(args.num_workers, device)
    train_loader = data.make_loader(train_set, args.batch_size, sampler, workers, device)
    val_loader = data.make_loader(val_set, args.batch_size, dist_ctx.shard_sampler(len(val_set)), workers, device)
    scheduler, per_iteration = build_scheduler(args.lr_schedule, optimizer, len(train_loader),
                                               **{k: getattr(args, k) for k in SCHEDULE_OPTIONS})
    set_bn_momentum(model, args.bn_momentum, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # ---- the artifact tree
    resuming = bool(args.resume)
    output = _output_dir(args)
    if output != Path(args.output):
        report("info", f"{args.output} exists and is not empty: writing to {output}")
    args.output, args.checkpoints_dir = str(output), None  # train_args.json records the folder as --output
    checkpoints, info = output / "checkpoints", output / "info"
    if dist_ctx.is_main:  # rank 0 alone writes the artifact tree
        for folder in (checkpoints, info, info / "charts", info / "previews"):
            folder.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(checkpoints, args.checkpoint_interval, args.max_keep_ckpts, args.best_metric,
                            args.save_best, args.save_last)
    history: list[dict] = []
    start_epoch = 1
    if resuming:
        state_path = checkpoints / RESUME_STATE
        if not state_path.is_file():
            raise ArgsError(f"--resume: {state_path} is missing: the run ended before its first epoch; start it anew")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        saver.load_state_dict(state["saver"])
        history = state["history"]
        # A run that died after logging an epoch but before saving its resume state would log that epoch twice.
        if dist_ctx.is_main:
            _write_metrics_log(info, history)
            for stale in [*checkpoints.glob(".*.tmp"), *info.rglob(".*.tmp")]:  # a kill during a save leaves these
                stale.unlink()
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"] + 1
        report("info", f"resuming {output} at epoch {start_epoch} of {args.epochs}")
    elif dist_ctx.is_main:
        recorded = {k: v for k, v in vars(args).items() if k not in _NOT_RECORDED}
        atomic_write_json(checkpoints / "train_args.json", recorded)
        atomic_write_json(info / "model_classes.json", [c.to_json() for c in model_classes])
        caller_state = json.loads((info / "ui_state.json").read_text()) if (info / "ui_state.json").is_file() else {}
        atomic_write_json(info / "ui_state.json", {**caller_state, **(ui_state or ui_state_from_args(args, model_classes))})
        atomic_write_json(info / "train_set.json", [i.key for i in train_data.items])
        atomic_write_json(info / "val_set.json", [i.key for i in val_data.items])
        if augs_config is not None:
            atomic_write_json(info / "augs_config.json", augs_config)
            atomic_write_text(info / "augs_preview.py", augs.augs_to_python(augs_config))
    if dist_ctx.is_main and not (info / CALIBRATION_FILE).is_file():  # also for a resumed run that predates it
        save_calibration_images(info / CALIBRATION_FILE, train_data.images)
    for split, prepared in (("train", train_data), ("val", val_data)):
        if dist_ctx.is_main:
            atomic_write_json(info / f"{split}_vis_items.json", [prepared.items[i].key for i in vis[split]])

    reporter.start({"epochs": args.epochs, "start_epoch": start_epoch, "iters_per_epoch": len(train_loader),
                    "val_iters": len(val_loader), "train_size": len(train_data), "val_size": len(val_data),
                    "classes": class_names, "device": str(device), "amp": dtype_name(amp_dtype),
                    "model": args.model, "output_dir": str(output), "world_size": dist_ctx.world_size,
                    "pid": os.getpid()})

    steps = args.epochs * len(train_loader)
    if steps < FEW_STEPS and not resuming and dist_ctx.is_main:
        report("warning", f"this run makes only {steps} optimizer steps ({len(train_set)} training items at batch "
                          f"{args.batch_size}, {args.epochs} epochs); a model rarely learns in fewer than "
                          f"{FEW_STEPS}: raise --epochs to {-(-FEW_STEPS // len(train_loader))} or more")

    epoch, status = start_epoch - 1, "finished"
    with _stop_on_sigterm(reporter):
        try:
            for epoch in range(start_epoch, args.epochs + 1):
                reporter.epoch_start(epoch)
                sampler.set_epoch(epoch)

                def on_step(iteration, loss, lr, epoch=epoch):
                    if iteration % args.metrics_period == 0 or iteration == len(train_loader):
                        reporter.train_step(epoch, iteration, len(train_loader), loss, lr)
                    if dist_ctx.any(reporter.should_stop()):  # every rank stops at the same step
                        raise StopRequested()

                if scheduler is not None and not per_iteration and args.scheduler_order == "before":
                    with warnings.catch_warnings():  # torch warns about exactly this order, which is the point
                        warnings.simplefilter("ignore", UserWarning)
                        scheduler.step()
                lr = current_lr(optimizer)
                skipped: list[int] = []
                train_loss = train_one_epoch(step_model, criterion, optimizer, train_loader, device, epoch=epoch,
                                             scheduler=scheduler if per_iteration else None, scaler=scaler,
                                             amp_dtype=amp_dtype, memory_format=memory_format, on_step=on_step,
                                             on_skip=skipped.append, clip_grad_norm=args.clip_grad_norm)
                train_loss = dist_ctx.mean(train_loss)  # ranks' shares are equal-sized
                if scheduler is not None and not per_iteration and args.scheduler_order == "after":
                    scheduler.step()
                record = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
                if scaler is not None:
                    record["amp_skipped_steps"] = len(skipped)
                    if skipped and dist_ctx.is_main:
                        report("warning", f"fp16: the gradient scaler skipped {len(skipped)} of {len(train_loader)} "
                                          f"step(s) in epoch {epoch} (inf/NaN gradients; iterations "
                                          f"{', '.join(map(str, skipped[:10]))}); if this repeats, use --amp bf16 or off")
                if epoch % args.val_interval == 0 or epoch == args.epochs:
                    record.update(evaluate(model, criterion, val_loader, device, class_names, amp_dtype, memory_format,
                                           progress=lambda done, total, e=epoch: reporter.val_progress(e, done, total),
                                           reduce=dist_ctx.all_reduce_sum))
                history.append(record)
                if dist_ctx.is_main:
                    if _collapse_warning(history, epoch == args.epochs):
                        report("warning", _collapse_advice(args, record["collapsed_to"]))
                    _write_metrics_log(info, history)
                    saver.on_epoch_end(model, epoch, record if "val_loss" in record else None)
                    if epoch % args.vis_interval == 0 or epoch == args.epochs:
                        _previews(reporter, model, epoch, vis, train_data, val_data, model_classes, device, amp_dtype, info)
                    if "val_loss" in record:
                        save_charts(history, info / "charts", class_names)
                    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                       "scaler": scaler.state_dict() if scaler is not None else None,
                                       "saver": saver.state_dict(), "history": history, "epoch": epoch,
                                       "torch_rng": torch.get_rng_state()}, checkpoints / RESUME_STATE)
                reporter.epoch_end(epoch, record)
                if dist_ctx.any(reporter.should_stop()) and epoch < args.epochs:  # asked during validation / saving: stop
                    raise StopRequested()                           # here, not after a step of the next epoch
        except StopRequested:
            status = "stopped"
            report("info", f"stop requested during epoch {epoch}: saving the current weights as the last checkpoint")
        except (NonFiniteLoss, StorageError) as e:
            report("error", f"{e}. Checkpoints saved so far are kept in {checkpoints}")
            # Written on failure too, else a resumed run's old summary would stay (a full disk may refuse it).
            if dist_ctx.is_main:
                with suppress(StorageError):
                    _write_summary(reporter, info, _summary(args, history, saver, "failed", epoch, output, started))
            if isinstance(e, StorageError):  # the CLI prints only the exception: say what is safe and how to go on
                raise StorageError(f"{e}; the checkpoints saved so far are intact in {checkpoints}; "
                                   f"once it can be written, continue with --resume {output}") from None
            raise

    if not dist_ctx.is_main:
        return _summary(args, history, saver, status, epoch, output, started)
    last = saver.on_train_end(model, max(epoch, 1))  # a stop in epoch 1 still leaves model_001_last.pth
    if history:
        save_charts(history, info / "charts", class_names)
    summary = _summary(args, history, saver, status, epoch, output, started, last)
    if args.eval and status == "finished":  # a stopped run was asked to end now
        summary["eval"] = evaluate_training_run(summary, args.project_dir, val_data.items, device, args.amp,
                                                args.speed_test, args.batch_size, report)
    return _write_summary(reporter, info, summary)


def _collapse_warning(history: list[dict], last_epoch: bool) -> bool:
    """Warn once: after COLLAPSE_ROUNDS validation rounds in a row that predicted one class, or at the
    end of a shorter run whose last round did."""
    rounds = [r.get("collapsed_to") for r in history if "val_loss" in r]
    if not rounds or not rounds[-1]:
        return False
    streak = next((i for i, c in enumerate(reversed(rounds)) if c != rounds[-1]), len(rounds))
    return streak == COLLAPSE_ROUNDS or (last_epoch and streak < COLLAPSE_ROUNDS)


def _collapse_advice(args, class_name: str) -> str:
    tips = []
    if args.loss != "jaccard_nll" or not args.jaccard_weight:
        tips.append("--loss jaccard_nll --jaccard-weight 0.5 (its log-Jaccard term pulls hardest on a class the "
                    "model misses)")
    if args.init != "he":
        tips.append("--init he")
    tips.append("--class-weights to weigh rare classes up" if not args.class_weights else "larger --class-weights")
    tips.append(f"more --epochs, or another --lr than {args.lr:g}")
    if not args.clip_grad_norm:
        tips.append("--clip-grad-norm 1 (if the training loss jumps)")
    if not args.sly_augs_path:
        tips.append("an augmentation template (--sly-augs-path)")
    return (f"the model predicts {class_name!r} almost everywhere on validation: it has collapsed to one class. "
            f"Try {'; '.join(tips)}.")


def _write_metrics_log(info: Path, history: list[dict]) -> None:
    """info/metrics.jsonl, one line per epoch, rewritten whole: an append cut short by a kill or a full
    disk would leave half a line."""
    atomic_write_text(info / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _write_summary(reporter, info: Path, summary: dict) -> dict:
    try:
        atomic_write_json(info / "summary.json", summary)
    finally:  # a full or read-only disk must not keep the dashboard waiting for the end
        reporter.finish(summary)
    return summary


def _summary(args, history, saver, status, epoch, output, started, last=None) -> dict:
    best = None
    if saver.best_path:
        best_record = next(r for r in history if f"model_{r['epoch']:03d}_best.pth" == saver.best_path)
        best = {"metric": args.best_metric, "value": saver.best_value, "epoch": best_record["epoch"],
                "checkpoint": str(Path(output) / "checkpoints" / saver.best_path),
                "metrics": {k: v for k, v in best_record.items() if k not in ("epoch",)}}
    return {"status": status, "epochs": args.epochs, "last_epoch": epoch, "output_dir": str(output),
            "best": best, "last_checkpoint": str(last) if last else None,
            "final": history[-1] if history else None, "seconds": round(time.time() - started, 1)}


def _previews(reporter, model, epoch, vis, train_data, val_data, model_classes, device, amp_dtype, info: Path):
    colors = [c.color for c in model_classes]
    for split, prepared in (("train", train_data), ("val", val_data)):
        indices = vis[split]
        if not indices:
            continue
        images = np.stack([prepared.images[i] for i in indices])
        predictions = predict_probabilities(model, images, device, amp_dtype).argmax(1).to(torch.uint8).cpu().numpy()
        background = data.background_index([c.name for c in model_classes])
        panels = [(prepared.items[i].item_name,
                   preview_panel(images[k], prepared.masks[i], predictions[k], colors, background))
                  for k, i in enumerate(indices)]
        save_png(info / "previews" / f"{split}_epoch_{epoch:03d}.png", np.concatenate([p for _, p in panels], axis=0))
        reporter.previews(epoch, split, panels)


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    warnings.formatwarning = lambda message, category, *_: f"[warning] {message}\n"
    try:
        summary = main(argv)
    except (ArgsError, UnknownModelError, data.DataError, augs.AugsConfigError, distributed.DistributedRunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:  # also reported to the reporter, but --reporter none must not hide it
        print(f"error: {e}", file=sys.stderr)
        return 3
    except StorageError as e:  # checkpoints saved before the failure are intact; --resume continues
        print(f"error: {e}", file=sys.stderr)
        return 4
    except RuntimeError as e:  # under torchrun (collectives fail this way): name the rank and the likely cause
        message = distributed.failure_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0 if summary["status"] in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(cli())
