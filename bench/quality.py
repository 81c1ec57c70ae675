"""Do the defaults learn? Every architecture, the same seeded budget, the defaults against the previous
defaults, --preset original and (with --peers) other libraries' models.

    python bench/quality.py                          # demo project and ../shared/data/lemons_annotated
    python bench/quality.py --datasets membranes     # the synthetic thin-structure set (bench/membranes.py)
    python bench/quality.py --datasets membranes_hard nuclei   # the harder one; a real microscopy set (bench/nuclei.py)
    python bench/quality.py --epochs 10 --record     # one budget for all; append the table to bench/RESULTS.md
    python bench/quality.py --peers smp_unet smp_linknet --seeds 3   # beside smp's Unet / Linknet, 3 seeds

Recipes: "defaults" (this app's), "previous" (the defaults before issue #23: the loss jaccard_nll at batch 8,
--init he, no training BatchNorm) and "original" (--preset original). Trained from scratch (no ImageNet
weights), seed 0 (--seeds N: seeds 0..N-1, mean ± sample stdev; on demo and lemons a seed also draws a random
split). Reports the final mean foreground IoU on the validation split, the wall-clock time of each run and the
worst batch loss ÷ its epoch's median; with --peers also the best IoU over the epochs. Peers (bench/peers.py;
pip install -r requirements-dev.txt) train on the same data, split, size, epochs, batch (the defaults', so the
same steps) and seed with their own recipe; they do not depend on --models, so each trains once per dataset
and seed and is shown on every model's row. Our times include the engine's per-epoch checkpoints and charts.

Budgets are in epochs, the same for every architecture and recipe on a dataset. By default 10, except
on lemons (5 training images) 40 and on nuclei (12) 20: the 40 iterations that 10 epochs give a 25-image
project at batch 8 (the size of the held-out set in issue #9). nuclei needs the network once (pip fetches
StarDist's wheel); without it the set is skipped.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from membranes import build as build_membranes
from nuclei import Unavailable, build as build_nuclei
from peers import PEERS, RECIPE as PEER_RECIPE, outcome, train_peer

from custom_net.demo import demo_project_dir
from custom_net.model import model_list
from custom_net.reporting import Reporter
from custom_net.train import main as train

LEMONS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lemons_annotated"
RECIPES = {"defaults": [],
           "previous": ["--loss", "jaccard_nll", "--batch-size", "8", "--init", "he", "--train-batchnorm", "off"],
           "original": ["--preset", "original"]}
DEFAULT_EPOCHS = {"demo": 10, "lemons": 40, "membranes": 10, "membranes_hard": 10, "nuclei": 20}


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
        elif name in ("membranes", "membranes_hard"):
            # Like the held-out set: 30 images of 512x512 (25 train, 5 val) trained at 256x256.
            found[name] = (build_membranes(scratch / name, count=30, size=512, hard=name == "membranes_hard"),
                           ["--input-height", "256", "--input-width", "256", "--split", "tags"])
        elif name == "nuclei":
            try:
                found[name] = (build_nuclei(scratch / name), ["--input-height", "128", "--input-width", "128",
                                                              "--split", "tags"])
            except Unavailable as e:
                print(f"[quality] nuclei skipped: {e}")
    return found


class History(Reporter):
    """Our run's validation records (for the final and the best IoU) and every batch's training loss."""

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []
        self.losses: dict[int, list[float]] = {}

    def train_step(self, epoch: int, iteration: int, iterations: int, loss: float, lr: float) -> None:
        self.losses.setdefault(epoch, []).append(loss)

    def epoch_end(self, epoch: int, record: dict) -> None:
        self.records.append(record)

    def worst_batch(self) -> float:
        """The largest ratio of a batch's loss to its epoch's median (issue #23 asks for at most 5)."""
        return max(max(losses) / statistics.median(losses) for losses in self.losses.values())


def engine_argv(project: Path, flags: list[str], epochs: int, seed: int, output: Path) -> list[str]:
    """custom_net.train's flags that every recipe and peer shares on a dataset."""
    return ["--project-dir", str(project), "--encoder-weights", "none", "--epochs", str(epochs),
            "--seed", str(seed), "--output", str(output), "--vis-count", "0", "--checkpoint-interval", "0",
            "--no-eval", "--metrics-period", "1", *flags]


def run(shared: list[str], model: str, recipe: str) -> dict:
    history = History()
    start = time.perf_counter()
    summary = train([*shared, "--model", model, *RECIPES[recipe]], reporter=history)
    shutil.rmtree(summary["output_dir"])  # the run's checkpoints: a full matrix of them would fill a disk
    return {**outcome(history.records, time.perf_counter() - start), "worst_batch": history.worst_batch()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["demo", "lemons"], choices=list(DEFAULT_EPOCHS))
    parser.add_argument("--models", nargs="+", default=list(model_list), choices=list(model_list))
    parser.add_argument("--epochs", type=int, help="one budget for every dataset (default: per dataset, see above)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="e.g. only 'defaults' after a change that leaves the others as they were")
    parser.add_argument("--peers", nargs="+", default=[], choices=list(PEERS),
                        help=f"other libraries' models beside ours ({PEER_RECIPE})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per run; N > 1 reports mean ± stdev")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    columns = [*args.recipes, *args.peers]
    rows = table_header(columns, args)
    amp = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (project, flags) in datasets(args.datasets, Path(tmp)).items():
            epochs = args.epochs or DEFAULT_EPOCHS[name]
            shared = [engine_argv(project, flags, epochs, seed, Path(tmp) / f"{name}_{seed}")
                      for seed in range(args.seeds)]  # the engine picks a free folder name beside it for each run
            peer_runs = {peer: [train_peer(peer, argv) for argv in shared] for peer in args.peers}
            amp |= {r["amp"] for runs in peer_runs.values() for r in runs}
            for model in args.models:
                runs = {recipe: [run(argv, model, recipe) for argv in shared] for recipe in args.recipes}
                rows.append(table_row(name, epochs, model, {**runs, **peer_runs}, args))
                print(rows[-1], flush=True)
    text = title(args, amp) + "\n".join(rows)
    print("\n" + text)
    if args.record:
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")


def title(args: argparse.Namespace, peer_amp: set[str]) -> str:
    command = (f"python bench/quality.py --datasets {' '.join(args.datasets)}"
               + (f" --epochs {args.epochs}" if args.epochs else "")
               + (f" --recipes {' '.join(args.recipes)}" if args.recipes != list(RECIPES) else "")
               + (f" --peers {' '.join(args.peers)}" if args.peers else "")
               + (f" --seeds {args.seeds}" if args.seeds > 1 else ""))
    seeds = "seed 0" if args.seeds == 1 else f"seeds 0–{args.seeds - 1}, mean ± stdev"
    peers = f"; peers: {PEER_RECIPE}, in {', '.join(sorted(peer_amp))} as ours" if args.peers else ""
    today = datetime.date.today().isoformat()
    return f"## Quality: from scratch, {seeds}{peers} — {today}\n\n`{command}`\n\n"


def table_header(columns: list[str], args: argparse.Namespace) -> list[str]:
    iou = "IoU (best)" if args.peers else "IoU"
    verdicts = verdict_names(args)
    spikes = [f"{r} worst batch ÷ median" for r in args.recipes]
    names = ["dataset", "epochs", "model", *(f"{c} {iou} | time" for c in columns), *verdicts, *spikes]
    return ["| " + " | ".join(names) + " |",
            "|---|---|---|" + "---|---|" * len(columns) + "---|" * (len(verdicts) + len(spikes))]


def verdict_names(args: argparse.Namespace) -> list[str]:
    names = [f"defaults > {r}" for r in ("previous", "original") if {"defaults", r} <= set(args.recipes)]
    return names + (["defaults ≥ peers"] if args.peers and "defaults" in args.recipes else [])


def table_row(name: str, epochs: int, model: str, runs: dict[str, list[dict]], args: argparse.Namespace) -> str:
    cells = [cell(r, show_best=bool(args.peers)) for r in runs.values()]
    final = {column: statistics.fmean([r["iou"] for r in rs]) for column, rs in runs.items()}
    verdicts = []
    defaults_held = "defaults" in runs and not any(r["collapsed"] for r in runs["defaults"])
    for other in ("previous", "original"):
        if f"defaults > {other}" in verdict_names(args):
            verdicts.append("✅" if final["defaults"] > final[other] and defaults_held else "❌")
    if "defaults ≥ peers" in verdict_names(args):
        verdicts.append("✅" if final["defaults"] >= max(final[p] for p in args.peers) else "❌")
    spikes = [f"{max(r['worst_batch'] for r in runs[recipe]):.1f}" for recipe in args.recipes]
    return "| " + " | ".join([name, str(epochs), model, *cells, *verdicts, *spikes]) + " |"


def cell(runs: list[dict], show_best: bool) -> str:
    """'IoU | time' of one column: the final IoU (and the best over the epochs), mean ± stdev over seeds."""
    text = spread([r["iou"] for r in runs])
    if show_best:
        text += f" ({spread([r['best'] for r in runs])})"
    collapsed = [r["collapsed"] for r in runs if r["collapsed"]]
    if collapsed:
        text += f" (only {collapsed[0]})" if len(runs) == 1 else f" ({len(collapsed)}/{len(runs)} on one class)"
    return text + f" | {statistics.fmean([r['seconds'] for r in runs]):.0f} s"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


if __name__ == "__main__":
    main()
