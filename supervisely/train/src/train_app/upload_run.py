"""Upload a run folder to Team Files later, e.g. after the dashboard's upload gave up (it prints this command):

    PYTHONPATH=supervisely/train/src python -m train_app.upload_run RUN_DIR --team-id 7 --remote /unet/42_exp/

SERVER_ADDRESS and API_TOKEN come from the environment (as on the platform). Files already in the Team Files
folder with their size are skipped, so running it again completes the same folder, never a second copy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import supervisely as sly

from train_app import platform_io
from train_app.environment import Environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_app.upload_run", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run folder (checkpoints/, info/, ...)")
    parser.add_argument("--team-id", type=int, required=True)
    parser.add_argument("--remote", required=True, help="Team Files folder, e.g. /unet/42_exp/")
    parser.add_argument("--task-id", type=int, default=None, help="set the folder as this task's output")
    parser.add_argument("--timeout", type=float, default=platform_io.UPLOAD_TIMEOUT[1],
                        help="seconds to wait for the answer to one batch before retrying it (default %(default)s)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"{args.run_dir}: not a folder")
    env = Environment(platform=True, data_dir=args.run_dir.parent, api=sly.Api.from_env(retry_count=None), team_id=args.team_id,
                      task_id=args.task_id)
    try:
        remote = platform_io.upload_artifacts(env, args.run_dir.resolve(), args.remote.rstrip("/") + "/",
                                                timeout=(platform_io.UPLOAD_TIMEOUT[0], args.timeout))
    except platform_io.PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {args.run_dir} to Team Files {remote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
