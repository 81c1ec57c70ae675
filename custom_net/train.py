"""Train a segmentation model on a Supervisely project.

    python custom_net/train.py --project-dir DIR --model UNet11 --classes kiwi lemon --epochs 30 --output results/exp1
    python custom_net/train.py --train-args results/exp1/checkpoints/train_args.json   # repeat a run
    python custom_net/train.py --resume results/exp1                                   # continue a stopped run
    python custom_net/train.py --demo                                                  # synthetic data, CPU-sized

``main(argv, reporter)`` is the single entry point for the CLI and the dashboard: the settings come from
``custom_net.config``, the run from ``custom_net.trainer``.
"""
from __future__ import annotations

import logging
import sys
import warnings

from custom_net import augs, distributed, platform_task, sly_seg_dataset as data
from custom_net.config import ArgsError, parse_config
from custom_net.epoch import NonFiniteLoss
from custom_net.model import UnknownModelError
from custom_net.reporting import Broadcast, ConsoleReporter, JsonLinesReporter, Reporter
from custom_net.storage import StorageError
from custom_net.trainer import run_training


def main(argv: list[str] | None = None, reporter: Reporter | None = None, ui_state: dict | None = None) -> dict:
    """Run training; returns the summary. Bad input raises (ArgsError / DataError / AugsConfigError)
    before the output folder is created. ``ui_state`` (the dashboard's) becomes info/ui_state.json."""
    config = parse_config(argv)
    rank0 = distributed.env_rank() == 0  # the other ranks of a torchrun run do not report
    reporter = reporter or make_reporter(config.reporter if rank0 else "none")
    if config.sly and rank0:
        reporter = with_platform_task(reporter)
    return run_training(config, reporter, ui_state)


def make_reporter(name: str) -> Reporter:
    return {"console": ConsoleReporter, "jsonl": JsonLinesReporter, "none": Reporter}[name]()


def with_platform_task(reporter: Reporter) -> Reporter:
    """--sly: report to the Supervisely task this process runs in, when it runs in one. There the task log
    is the console: the SDK's progress events replace the console's progress bars, which would break up
    their JSON lines."""
    if not platform_task.in_platform_task():
        reporter.message("info", "--sly: not running in a Supervisely task (TASK_ID, SERVER_ADDRESS, API_TOKEN are "
                                 "not set): progress goes to this output only")
        return reporter
    task = platform_task.TaskLogReporter()
    return task if type(reporter) is ConsoleReporter else Broadcast(reporter, task)


def cli(argv: list[str] | None = None) -> int:
    """Exit codes: 0 finished or stopped, 2 bad input, 3 non-finite loss, 4 storage failure, 1 otherwise."""
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
