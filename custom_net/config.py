"""The settings of a training run: the command line, presets, train_args.json, resolved once into a frozen
``TrainConfig`` that everything downstream reads.

    config = parse_config(["--project-dir", "data/project", "--model", "UNet11", "--epochs", "30"])

Flags given on the command line win over a ``--train-args`` file or a ``--preset``, which win over the
parser's defaults; options whose default depends on the architecture or the run's length are resolved here
too, so a config's values are the ones the run uses (and ``train_args.json`` records).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from custom_net import augs, original_app
from custom_net.hardware import AMP_MODES
from custom_net.loss import LOSSES, SmoothJaccardNLLLoss
from custom_net.model import INIT_SCHEMES, LSUV_IMAGES, model_list
from custom_net.optim import LR_SCHEDULES, OPTIMIZERS
from custom_net.run_folder import RunFolder

BEST_METRICS = ("mean_fg_iou", "mean_iou", "mean_fg_dice", "mean_dice", "pixel_accuracy", "val_loss")
SPLIT_METHODS = ("random", "datasets", "tags", "files")
WARMUP_SHARE = 0.3  # default cosine warmup, as a share of the run (bench/RESULTS.md: AlbuNet needs a long one)
PREVIEWS_PER_RUN = 10  # --vis-interval 0
# --batch-size auto (custom_net.trainer.resolve_batch_size): 25 images at batch 8 make 4 steps an epoch, and
# 10 epochs of them learned far less than at batch 4; batch 2 spiked at the default peak lr (bench/RESULTS.md)
AUTO_BATCH_SIZES, AUTO_BATCH_MIN_STEPS = (8, 4), 6

# Options whose default depends on the architecture (model_list holds the values).
MODEL_DEFAULTS = ("lr", "decoder_lr_factor")
# Resuming a run started before an option existed: the behaviour of that time (and its optimizer layout).
BEFORE_OPTION_EXISTED = dict(bn_momentum=0.1, decoder_lr_factor=1.0, train_batchnorm="off")

# --demo: small enough to train on a laptop CPU in a few minutes.
DEMO_DEFAULTS = dict(model="UNet", encoder_weights="none", epochs=20, input_height=128, input_width=160,
                     batch_size=4, output="results/demo")

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


def _checked(name: str, convert, ok, rule: str, auto: bool = False):
    """An argparse type: ``convert(text)`` if ``ok`` accepts it (else an error saying ``rule``), or "auto"
    where that is allowed."""
    def parse(text):
        if auto and text == "auto":
            return text
        value = convert(text)
        if not ok(value):  # ``not``: also refuses nan
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = name  # argparse names it in "invalid ... value"
    return parse


_positive_int = _checked("positive int", int, lambda v: v >= 1, ">= 1")
_batch_size = _checked("batch size", int, lambda v: v >= 1, "'auto' or >= 1", auto=True)
_size = _checked("size", int, lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 (32, 64, ... 256 ...)")
_workers = _checked("workers", int, lambda v: v >= 0, "'auto' or >= 0", auto=True)
_positive_float = _checked("positive float", float, lambda v: v > 0, "> 0")
_non_negative_float = _checked("non-negative float", float, lambda v: v >= 0, ">= 0")
_bn_momentum = _checked("momentum", float, lambda v: 0 < v <= 1, "'auto' or in (0, 1]", auto=True)
_fraction = _checked("fraction", float, lambda v: 0 <= v <= 1, "between 0 and 1")


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="custom_net/train.py", description="Train a segmentation model on a Supervisely project.",
                formatter_class=_HelpFormatter)
    for add_options in (_input_options, _model_options, _training_options, _optimizer_options, _schedule_options,
                        _checkpoint_options, _system_options, _original_app_options, _distributed_options):
        add_options(p)
    return p


def _input_options(p: argparse.ArgumentParser) -> None:
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


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(model_list), default="UNet11", help="architecture")
    g.add_argument("--encoder-weights", default="auto",
                   help="ImageNet encoder weights: 'imagenet' (torch cache), a file path, 'none', or 'auto' (imagenet if cached, else none)")
    g.add_argument("--init", choices=INIT_SCHEMES, default="lsuv",
                   help="initialisation of layers not loaded from ImageNet: he; lsuv = he, then on "
                        + " and ".join(name for name, spec in model_list.items() if spec["lsuv"])
                        + " trained without BatchNorm (--train-batchnorm off) each layer scaled to unit output "
                        f"variance on {LSUV_IMAGES} training images; original = each layer's default")
    trains = ", ".join(name for name, spec in model_list.items() if spec["train_batchnorm"])
    g.add_argument("--train-batchnorm", choices=("auto", "on", "off"), default="auto",
                   help=f"{trains}: train with a BatchNorm after every conv layer without one but the head, "
                        "folded into the convs when saved, so checkpoints keep the architecture's layout; "
                        "auto = on when the whole model starts from scratch (no ImageNet or --custom-weights)")
    g.add_argument("--bn-momentum", type=_bn_momentum, default="auto",
                   help="BatchNorm running-statistics momentum; auto = 1 / iterations per epoch, at least 0.1 "
                        "(PyTorch's), so the statistics validation uses cover about the last epoch")
    g.add_argument("--custom-weights", default="", metavar="PTH",
                   help="start from this state dict (a model_*.pth of an earlier run, the original app's too); its head "
                        "is mapped to this run's classes by name")
    g.add_argument("--custom-weights-classes", metavar="JSON",
                   help="the classes of --custom-weights, in its head's order (default: model_classes.json in the "
                        "info/ folder beside the checkpoint's checkpoints/)")


def _training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=20)
    g.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="per process, i.e. per GPU: under torchrun the global batch is this times the number of "
                        f"processes; auto = {AUTO_BATCH_SIZES[0]}, or {AUTO_BATCH_SIZES[-1]} where that makes fewer than "
                        f"{AUTO_BATCH_MIN_STEPS} steps an epoch (small projects learn in more, smaller steps)")
    smooth, share = SmoothJaccardNLLLoss.smooth, SmoothJaccardNLLLoss.absent_share
    pct = f"{100 * share:g}%%"  # argparse expands help with %
    g.add_argument("--loss", choices=list(LOSSES), default="smooth_jaccard_nll",
                   help="jaccard_nll = the original's (1-w)*NLL - w*sum log(soft Jaccard), smoothed by 1e-15 (a class "
                        "absent from a batch adds ~35); smooth_jaccard_nll = the same smoothed by "
                        f"{smooth:g} pixels, and by {pct} of the batch's pixels for a class absent from it (which then "
                        f"adds log(1 + its predicted share / {pct}), at most log({1 + 1 / share:g})); "
                        "ce_dice = cross-entropy + soft Dice")
    g.add_argument("--jaccard-weight", type=_fraction, default=0.5, help="w in the loss (Jaccard or Dice share)")
    g.add_argument("--class-weights", nargs="+", type=float, metavar="W", help="per-class loss weights, in class-id order")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, initial weights, order and augmentations")
    g.add_argument("--amp", choices=AMP_MODES, default="auto", help="mixed precision (auto = bf16 where the device runs it fast)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: pays on long GPU runs; compiling costs minutes, and on a CPU it was slower")


def _optimizer_options(p: argparse.ArgumentParser) -> None:
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


def _schedule_options(p: argparse.ArgumentParser) -> None:
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


def _checkpoint_options(p: argparse.ArgumentParser) -> None:
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


def _system_options(p: argparse.ArgumentParser) -> None:
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


def _original_app_options(p: argparse.ArgumentParser) -> None:
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


def _distributed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (torchrun; see docs/scaling.md)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="SyncBatchNorm: batch statistics over all GPUs (CUDA only)")
    g.add_argument("--dist-timeout", type=_positive_float, default=1800.0,
                   help="seconds a rank waits for the others before stopping with an error")


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


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, resolved (``parse_config``); ``--help`` describes each. Lists are tuples."""
    # input and split
    project_dir: str | None
    demo: bool
    train_args: str | None
    preset: str
    resume: str | None
    classes: tuple[str, ...] | None
    split: str
    val_percent: float
    train_datasets: tuple[str, ...]
    val_datasets: tuple[str, ...]
    train_tag: str
    val_tag: str
    untagged: str
    train_set: str | None
    val_set: str | None
    sly_augs_path: str
    input_height: int
    input_width: int
    # model
    model: str
    encoder_weights: str
    init: str
    train_batchnorm: str  # 'auto' until custom_net.trainer resolves it
    bn_momentum: str | float
    custom_weights: str
    custom_weights_classes: str | None
    # training, optimizer, schedule
    epochs: int
    batch_size: str | int  # 'auto' until custom_net.trainer resolves it
    loss: str
    jaccard_weight: float
    class_weights: tuple[float, ...] | None
    seed: int
    amp: str
    channels_last: bool
    compile: bool
    optimizer: str
    lr: float
    decoder_lr_factor: float
    momentum: float
    weight_decay: float
    nesterov: bool
    clip_grad_norm: float
    lr_schedule: str
    step_size: int
    gamma_step: float
    milestones: tuple[int, ...]
    gamma_exp: float
    warmup_epochs: float
    min_lr: float
    scheduler_order: str
    # validation, checkpoints, evaluation
    val_interval: int
    best_metric: str
    checkpoint_interval: int
    max_keep_ckpts: int
    save_best: bool
    save_last: bool
    eval: bool
    speed_test: bool
    # system and output
    output: str
    gpu_id: str
    num_workers: str | int
    cache_dir: str | None
    metrics_period: int
    vis_count: int
    vis_interval: int
    reporter: str
    # the original app's forms (read into the settings above; kept for its train_args.json)
    classes_path: str | None
    checkpoints_dir: str | None
    train_vis_items_path: str | None
    val_vis_items_path: str | None
    sly: bool
    # distributed
    sync_bn: bool
    dist_timeout: float

    @classmethod
    def from_values(cls, values: dict) -> "TrainConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """The settings as JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def record(self) -> dict:
        """What train_args.json holds: every setting but those that only say how this process started."""
        return {k: v for k, v in self.as_dict().items() if k not in _NOT_RECORDED}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The run's settings from ``argv`` (default: sys.argv); ArgsError, naming the flag or file, if they
    do not make a run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values = _parse_layers(argv)
    given = _given_dests(argv)
    _resolve_original_flags(values, given)
    _check(values, given)
    _resolve_defaults(values)
    _make_paths_absolute(values)
    return TrainConfig.from_values(values)


def _parse_layers(argv: list[str]) -> dict:
    """The parsed values: the command line over a resumed run's or --train-args' values, or over --demo's and
    --preset's, over the parser's defaults."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.resume:
        run_args = RunFolder(first.resume).train_args
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
    values = vars(parser.parse_args(argv))
    if values["resume"]:
        values["output"] = values["resume"]
    return values


def _check(values: dict, given: set[str]) -> None:
    """Rules that involve several options."""
    if not values["project_dir"] and not values["demo"]:
        raise ArgsError("--project-dir is required (or --demo for synthetic data)")
    project = values["project_dir"]
    if values["train_args"] and project and "project_dir" not in given and not Path(project).is_dir():
        raise ArgsError(f"--train-args {values['train_args']}: its project {project} is not here; "
                        "give the project's folder with --project-dir")
    if values["split"] == "datasets" and not (values["train_datasets"] and values["val_datasets"]):
        raise ArgsError("--split datasets needs --train-datasets and --val-datasets")
    if values["split"] == "files" and not (values["train_set"] and values["val_set"]):
        raise ArgsError("--split files needs --train-set and --val-set")
    if values["train_batchnorm"] == "on" and not model_list[values["model"]]["train_batchnorm"]:
        raise ArgsError(f"--train-batchnorm on: {values['model']} trains without it (bench/RESULTS.md); "
                        "use auto or off")
    if values["checkpoint_interval"] < 0:
        raise ArgsError("--checkpoint-interval must be >= 0")


def _resolve_defaults(values: dict) -> None:
    """Defaults that depend on the architecture or on the run's length."""
    for key in MODEL_DEFAULTS:
        if values[key] is None:
            values[key] = model_list[values["model"]][key]
    if values["warmup_epochs"] is None:
        values["warmup_epochs"] = round(WARMUP_SHARE * values["epochs"], 3)
    if not values["vis_interval"]:
        per_run = original_app.ORIGINAL_PREVIEWS_PER_RUN if values["preset"] == "original" else PREVIEWS_PER_RUN
        values["vis_interval"] = max(1, values["epochs"] // per_run)


def _given_dests(argv: list[str]) -> set[str]:
    """The options given on the command line itself (not defaults, presets or train_args.json)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _resolve_original_flags(values: dict, given: set[str]) -> None:
    """The original app's flags in this app's terms. A flag given on the command line wins over the other
    form of it from a train_args.json; both forms on the command line are an error."""
    for ours, theirs in (("classes", "classes_path"), ("output", "checkpoints_dir")):
        if {ours, theirs} <= given:
            raise ArgsError(f"give --{ours.replace('_', '-')} or --{theirs.replace('_', '-')}, not both")
    if values["classes_path"] and "classes" not in given:
        try:
            values["classes"] = original_app.read_class_titles(values["classes_path"], "--classes-path")
        except ValueError as e:
            raise ArgsError(str(e)) from None
    values["classes_path"] = None  # now in --classes, which train_args.json records
    checkpoints = values["checkpoints_dir"]
    if checkpoints and "output" not in given and not values["resume"]:
        values["output"] = str(Path(checkpoints).parent)
        if Path(checkpoints).name != "checkpoints":
            warnings.warn(f"--checkpoints-dir {checkpoints}: the checkpoints go to {values['output']}/checkpoints "
                          "(the run folder's layout)")
    else:
        values["checkpoints_dir"] = None
    if values["split"] is None:
        values["split"] = "files" if values["train_set"] or values["val_set"] else "random"


def _make_paths_absolute(values: dict) -> None:
    """train_args.json must repeat the run from any working directory."""
    for name in ("project_dir", "train_set", "val_set", "custom_weights", "custom_weights_classes", "cache_dir",
                 "output", "train_vis_items_path", "val_vis_items_path"):
        if values[name]:
            values[name] = str(Path(values[name]).expanduser().resolve())
    if values["sly_augs_path"] and values["sly_augs_path"] not in augs.list_templates():
        values["sly_augs_path"] = str(Path(values["sly_augs_path"]).expanduser().resolve())
    if values["encoder_weights"] not in ("auto", "none", "imagenet"):
        values["encoder_weights"] = str(Path(values["encoder_weights"]).expanduser().resolve())
