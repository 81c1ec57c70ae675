"""Do the defaults learn? Every architecture, the same seeded budget, defaults against --preset original.

    python bench/quality.py                          # demo project and ../shared/data/lemons_annotated
    python bench/quality.py --datasets membranes     # the synthetic thin-structure set (bench/membranes.py)
    python bench/quality.py --epochs 10 --record     # one budget for all; append the table to bench/RESULTS.md

Trained from scratch (no ImageNet weights: nothing is downloaded), batch 8, seed 0. Reports the
final mean foreground IoU on the validation split and the wall-clock time of each run.

Budgets are in epochs, the same for every architecture and recipe on a dataset. By default 10, except
on lemons: its 5 training images make one iteration per epoch, so it gets 40 epochs, the 40 iterations
that 10 epochs give on a 25-image project at batch 8 (the size of the held-out set in issue #9).
"""
from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

from membranes import build as build_membranes

from custom_net.demo import demo_project_dir
from custom_net.model import model_list
from custom_net.reporting import Reporter
from custom_net.train import main as train

LEMONS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lemons_annotated"
RECIPES = {"defaults": [], "original": ["--preset", "original"]}
DEFAULT_EPOCHS = {"demo": 10, "lemons": 40, "membranes": 10}


def datasets(names: list[str], scratch: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (project folder, flags fitting its images)."""
    found = {}
    for name in names:
        if name == "demo":
            found[name] = (demo_project_dir(), ["--input-height", "128", "--input-width", "160"])
        elif name == "lemons":
            if (LEMONS / "meta.json").is_file():
                found[name] = (LEMONS, ["--input-height", "256", "--input-width", "256"])
            else:
                print(f"[quality] {LEMONS} is absent: lemons skipped")
        elif name == "membranes":
            # Like the held-out set: 30 images of 512x512 (25 train, 5 val) trained at 256x256.
            found[name] = (build_membranes(scratch / "membranes", count=30, size=512),
                           ["--input-height", "256", "--input-width", "256", "--split", "tags"])
    return found


def run(project: Path, flags: list[str], model: str, recipe: str, epochs: int, output: Path) -> dict:
    argv = ["--project-dir", str(project), "--model", model, "--encoder-weights", "none", "--epochs", str(epochs),
            "--batch-size", "8", "--seed", "0", "--output", str(output), "--vis-count", "0",
            "--checkpoint-interval", "0", "--no-eval", *flags, *RECIPES[recipe]]
    start = time.perf_counter()
    summary = train(argv, reporter=Reporter())
    final = summary["final"]
    return {"iou": final["mean_fg_iou"], "seconds": time.perf_counter() - start, "collapsed": final.get("collapsed_to")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["demo", "lemons"], choices=("demo", "lemons", "membranes"))
    parser.add_argument("--models", nargs="+", default=list(model_list), choices=list(model_list))
    parser.add_argument("--epochs", type=int, help="one budget for every dataset (default: per dataset, see above)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="e.g. only 'defaults' after a change that leaves --preset original as it was")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    rows = ["| dataset | epochs | model | defaults IoU | time | original IoU | time | defaults win |",
            "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (project, flags) in datasets(args.datasets, Path(tmp)).items():
            epochs = args.epochs or DEFAULT_EPOCHS[name]
            for model in args.models:
                result = {recipe: run(project, flags, model, recipe, epochs, Path(tmp) / f"{name}_{model}_{recipe}")
                          for recipe in args.recipes}
                d, o = result.get("defaults"), result.get("original")

                def cells(r):
                    if r is None:
                        return "not run | -"
                    return f"{r['iou']:.3f}" + (f" (only {r['collapsed']})" if r["collapsed"] else "") + f" | {r['seconds']:.0f} s"
                verdict = ("✅" if d["iou"] > o["iou"] and not d["collapsed"] else "❌") if d and o else "-"
                row = f"| {name} | {epochs} | {model} | {cells(d)} | {cells(o)} | {verdict} |"
                rows.append(row)
                print(row, flush=True)
    command = (f"python bench/quality.py --datasets {' '.join(args.datasets)}" + (f" --epochs {args.epochs}" if args.epochs else "")
               + (f" --recipes {' '.join(args.recipes)}" if args.recipes != list(RECIPES) else ""))
    header = f"## Quality: from scratch, batch 8, seed 0 — {datetime.date.today().isoformat()}\n\n`{command}`\n\n"
    text = header + "\n".join(rows)
    print("\n" + text)
    if args.record:
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
