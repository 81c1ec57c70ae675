"""Speed bench: the project's fast paths against baselines measured in the same run.

    python bench/run.py                 # full bench, prints a table of ratios
    python bench/run.py --quick         # fewer repetitions (a smoke run, numbers are rough)
    python bench/run.py --record        # also appends the table to bench/RESULTS.md
    python bench/run.py --only train    # sections: data, train, feed, infer, quality
    python bench/run.py --only quality --seeds 10 --guard-epochs 20   # a longer quality guard
    python bench/run.py --only quality --first-seed 10 --seeds 30     # more seeds for an earlier guard run

Every section runs in its own process, so its peak RSS is its own. Ratios are what matter:
both sides of a ratio run on the same machine, in the same bench run.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LEMONS = REPO.parent / "shared" / "data" / "lemons_annotated"
SECTIONS = ("data", "train", "feed", "infer", "quality")
AUGS_TEMPLATE = "seg_simple_rotate_crop_flipLR_flipUD"
SIZE = 256
TARGETS = {"data": 10.0, "data+augs": 10.0, "train (geomean)": 3.0, "infer (geomean)": 3.0,
           "infer int8 (geomean)": 3.0, "feed (cuda)": 0.9}


# ---- helpers ---------------------------------------------------------------------------

def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb(device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(fn, repeats: int, device=None) -> float:
    """Median seconds per call after one warm-up call: a hiccup of the machine (another process, the
    allocator returning memory) moves a mean of a few calls by tens of percent, a median hardly."""
    from custom_net.hardware import synchronize

    def sync():
        if device is not None:
            synchronize(device)

    fn()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def project_dir() -> Path:
    if (LEMONS / "meta.json").is_file():
        return LEMONS
    from custom_net.demo import demo_project_dir
    return demo_project_dir()


def open_bench_project():
    """(folder, project, items, model classes with __bg__) of the data the bench loads."""
    from custom_net import sly_seg_dataset as data
    source = project_dir()
    project = data.open_project(source)
    return source, project, data.list_items(project), data.build_model_classes(project.meta, None)


# ---- data pipeline ---------------------------------------------------------------------

class NaiveDataset:
    """How the original app loaded data: per sample, decode the full-size JPEG and colour-mask PNG,
    find each class colour over all pixels, augment at full size, resize, normalise. The baseline of the
    data section."""

    def __init__(self, samples, colors, augmenter=None):
        self.samples, self.colors, self.augmenter = samples, colors, augmenter

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        import cv2
        import torch
        from custom_net import augs
        from custom_net.preprocessing import IMAGENET_MEAN, IMAGENET_STD
        epoch, index = divmod(key, len(self.samples))
        image_path, mask_path = self.samples[index]
        image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        colour_mask = cv2.cvtColor(cv2.imread(str(mask_path)), cv2.COLOR_BGR2RGB)
        mask = np.zeros(colour_mask.shape[:2], np.uint8)
        for index_, colour in enumerate(self.colors):
            mask[np.all(colour_mask == colour, axis=-1)] = index_
        if self.augmenter is not None:
            image, mask = augs.augment(self.augmenter, image, mask, epoch * 1000 + index)
        image = cv2.resize(image, (SIZE, SIZE))
        mask = cv2.resize(mask, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        image = (image.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)), torch.from_numpy(mask.astype(np.int64))


def bench_data(args) -> dict:
    import cv2
    from torch.utils.data import DataLoader
    from custom_net import augs, sly_seg_dataset as data
    from custom_net.preprocessing import normalize_batch

    source, project, items, model_classes = open_bench_project()
    names = [c.name for c in model_classes]
    colors = [tuple(c.color) for c in model_classes]
    augs_config = augs.load_augs_config(AUGS_TEMPLATE)
    samples_per_run = 48 if args.quick else 240
    result = {"source": source.name, "items": len(items)}
    with tempfile.TemporaryDirectory() as tmp:
        # The baseline's input: colour masks as PNG files, as the original's segmentation export wrote them.
        samples = []
        index_of = {n: i for i, n in enumerate(names)}
        for i, item in enumerate(items):
            _, mask = data.load_item(item, project.meta, index_of)
            colour = np.array(colors, np.uint8)[mask]
            mask_path = Path(tmp) / f"{i}.png"
            cv2.imwrite(str(mask_path), cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
            samples.append((item.image_path, mask_path))

        def throughput(dataset, normalise: bool) -> float:
            epochs = math.ceil(samples_per_run / len(dataset))  # sampler keys encode (epoch, item)
            loader = DataLoader(dataset, batch_size=8, sampler=range(epochs * len(dataset)), num_workers=0)
            start, count = time.perf_counter(), 0
            for images, _ in loader:
                if normalise:
                    images = normalize_batch(images)
                count += len(images)
            return count / (time.perf_counter() - start)

        # As training caches them: with the detail the spatial augmentations of the template work on.
        result["detail_scale"] = data.detail_scale(items, SIZE, SIZE)
        start = time.perf_counter()
        prepared = data.PreparedData(items, project.meta, names, SIZE, SIZE, detail_scale=result["detail_scale"])
        result["cache_build_s"] = time.perf_counter() - start
        try:
            for label, config in (("data", None), ("data+augs", augs_config)):
                ours = throughput(data.SlySegDataset(prepared, config), normalise=True)
                augmenter = augs.build_augmenter(config) if config else None
                naive = throughput(NaiveDataset(samples, colors, augmenter), normalise=False)
                result[label] = {"ours": ours, "baseline": naive, "unit": "samples/s"}
        finally:
            prepared.close()
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ---- training ----------------------------------------------------------------------------

def matmul_ceiling(device, dtype, n: int = 2048) -> float:
    """FLOP/s of a large square matmul: the roof that convolutions are lowered to."""
    import torch
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = timed(lambda: a @ b, 3 if device.type == "cpu" else 20, device)
    return 2 * n**3 / seconds


def train_setup(name: str, device, fast: bool, compile_model: bool, num_classes: int = 3):
    import torch
    from custom_net.loss import build_loss
    from custom_net.model import build_model
    from custom_net.config import parse_config
    from custom_net.hardware import resolve_amp
    from custom_net.optim import build_optimizer, parameter_groups
    from custom_net.train_norms import add_training_norms
    from custom_net.trainer import resolve_train_batchnorm

    recipe = parse_config(["--project-dir", ".", "--model", name])  # the engine's default recipe, on both sides
    recipe = recipe.replace(encoder_weights="none")
    torch.manual_seed(0)
    model = build_model(name, num_classes, "none")
    if resolve_train_batchnorm(recipe) == "on":  # from scratch the engine trains these with BatchNorm
        add_training_norms(model)
    memory_format = torch.channels_last if fast else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    amp_dtype = resolve_amp("auto" if fast else "off", device)
    criterion = build_loss(recipe.loss, num_classes, recipe.jaccard_weight).to(device)
    optimizer = build_optimizer(recipe.optimizer, parameter_groups(model, recipe.lr, recipe.decoder_lr_factor),
                                recipe.lr, recipe.momentum, recipe.weight_decay, recipe.nesterov)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    forward_model = torch.compile(model) if compile_model else model
    return forward_model, criterion, optimizer, scaler, amp_dtype, memory_format, recipe.clip_grad_norm


def bench_train(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from custom_net.model import model_list
    from custom_net.epoch import train_one_epoch
    from custom_net.hardware import select_device

    device = select_device(args.device)
    repeats = 1 if args.quick else (3 if device.type == "cpu" else 20)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, 3, (8, SIZE, SIZE), generator=generator)
    if device.type == "cuda":
        images, masks = images.pin_memory(), masks.pin_memory()
    loader = [(images, masks)]
    result = {"device": str(device), "ceiling_fp32": matmul_ceiling(device, torch.float32),
              "ceiling_bf16": matmul_ceiling(device, torch.bfloat16), "models": {}}
    for name in args.models or list(model_list):
        row = {}
        for variant, fast in (("baseline", False), ("ours", True)):
            model, criterion, optimizer, scaler, amp_dtype, memory_format, clip = train_setup(
                name, device, fast, args.compile and fast)

            def step():
                train_one_epoch(model, criterion, optimizer, loader, device, epoch=1, scaler=scaler,
                                amp_dtype=amp_dtype, memory_format=memory_format, clip_grad_norm=clip)
            seconds = timed(step, repeats, device)
            with FlopCounterMode(display=False) as counter:
                step()
            row[variant] = len(images) / seconds
            row[f"{variant}_flops"] = counter.get_total_flops() / seconds
            row[f"{variant}_amp"] = str(amp_dtype).replace("torch.", "")
            del model, optimizer
        result["models"][name] = row
    result["peak_rss_mb"] = peak_rss_mb()
    result["cuda_peak_mb"] = cuda_peak_mb(device)
    return result


# ---- feeding the device ------------------------------------------------------------------

FEED_MODELS = ("LinkNet34", "UNet11")  # the fastest to train (the hardest to keep fed), and the app's default


def bench_feed(args) -> dict:
    """Fast-path training images/s fed by the engine's own loader (cache, augmentations, worker
    processes: 8 on a GPU, the ``auto`` setting on a CPU) against the same steps on a synthetic uint8
    batch already on the device: how much of the device's training speed the loader keeps."""
    import torch
    from custom_net import augs, sly_seg_dataset as data
    from custom_net.epoch import train_one_epoch
    from custom_net.hardware import resolve_num_workers, select_device

    device = select_device(args.device)
    workers = args.workers
    if workers is None:
        workers = 8 if device.type == "cuda" else resolve_num_workers("auto", device)
    steps, repeats = (2, 1) if args.quick else ((4, 2) if device.type == "cpu" else (50, 3))
    source, project, items, model_classes = open_bench_project()
    names = [c.name for c in model_classes]
    prepared = data.PreparedData(items, project.meta, names, SIZE, SIZE)
    dataset = data.SlySegDataset(prepared, augs.load_augs_config(AUGS_TEMPLATE))
    loader = data.make_loader(dataset, 8, range(steps * 8), workers, device)
    generator = torch.Generator().manual_seed(0)
    synthetic = [(torch.randint(0, 256, (8, SIZE, SIZE, 3), dtype=torch.uint8, generator=generator).to(device),
                  torch.randint(0, len(names), (8, SIZE, SIZE), dtype=torch.uint8, generator=generator).to(device))] * steps
    result = {"device": str(device), "workers": workers, "source": source.name, "augs": AUGS_TEMPLATE, "models": {}}
    try:
        for name in args.models or FEED_MODELS:
            model, criterion, optimizer, scaler, amp_dtype, memory_format, clip = train_setup(
                name, device, True, args.compile, len(names))
            row = {}
            for variant, batches in (("synthetic", synthetic), ("loader", loader)):
                def one_pass():
                    train_one_epoch(model, criterion, optimizer, batches, device, epoch=1, scaler=scaler,
                                    amp_dtype=amp_dtype, memory_format=memory_format, clip_grad_norm=clip)
                row[variant] = steps * 8 / timed(one_pass, repeats, device)
            result["models"][name] = row
            del model, optimizer
    finally:
        prepared.close()  # (workers still alive keep their open maps of the removed files until this process exits)
    result["peak_rss_mb"] = peak_rss_mb()
    result["cuda_peak_mb"] = cuda_peak_mb(device)
    return result


# ---- inference ---------------------------------------------------------------------------

def bench_infer(args) -> dict:
    import cv2
    import torch
    from custom_net.inference import inference, prepare_fast_model
    from custom_net.model import build_model, fold_batchnorm, model_list
    from custom_net.preprocessing import decode_image_rgb
    from custom_net.quantize import quantize_int8
    from custom_net.hardware import resolve_amp, select_device

    device = select_device(args.device)
    repeats = 2 if args.quick else (5 if device.type == "cpu" else 30)
    rng = np.random.default_rng(0)
    picture = cv2.GaussianBlur(rng.integers(0, 256, (800, 1067, 3), dtype=np.uint8), (0, 0), 3)
    jpeg = cv2.imencode(".jpg", picture)[1].tobytes()
    result = {"device": str(device), "image": "1067x800 JPEG", "models": {}}
    # The int8 runtime (CPU only) calibrates on training images; smooth random pictures stand in for them.
    calibration = np.stack([cv2.resize(cv2.GaussianBlur(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), (0, 0), 3),
                                       (SIZE, SIZE)) for _ in range(16)])
    for name in args.models or list(model_list):
        torch.manual_seed(0)
        model = build_model(name, 3, "none").to(device).eval()
        row = {}
        if device.type == "cpu":
            started = time.perf_counter()
            # An untrained network's class scores are near-ties, which the load-time check would refuse;
            # int8 quality is measured on trained models in the quality section.
            int8_model = quantize_int8(fold_batchnorm(model), calibration, min_class_iou=0)
            row["int8_load_s"] = time.perf_counter() - started
            row["int8"] = timed(lambda: inference(int8_model, decode_image_rgb(jpeg), SIZE, SIZE, device),
                                repeats, device) * 1000
        for variant, fast in (("baseline", False), ("ours", True)):
            if fast:  # as load_predictor gives it: BatchNorm folded, channels_last, weights in the amp dtype
                amp_dtype = resolve_amp("auto", device)
                fast_model = prepare_fast_model(copy.deepcopy(fold_batchnorm(model)), device, amp_dtype)

                def predict():
                    return inference(fast_model, decode_image_rgb(jpeg), SIZE, SIZE, device, amp_dtype)
            else:
                def predict():  # float32 eager, NCHW, under no_grad
                    with torch.no_grad():
                        image = decode_image_rgb(jpeg)
                        small = torch.from_numpy(cv2.resize(image, (SIZE, SIZE))).permute(2, 0, 1)[None].float()
                        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
                        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
                        logits = model(((small - mean) / std).to(device))
                        probs = torch.nn.functional.interpolate(logits.softmax(1), size=image.shape[:2], mode="bilinear")
                        return probs.argmax(1)[0].cpu().numpy()
            row[variant] = timed(predict, repeats, device) * 1000
        result["models"][name] = row
    result["peak_rss_mb"] = peak_rss_mb()
    result["cuda_peak_mb"] = cuda_peak_mb(device)
    return result


# ---- quality guard -----------------------------------------------------------------------

def int8_fidelity(run: Path) -> dict:
    """Mean foreground IoU on a demo run's validation items of its best checkpoint, predicted in float32
    and by the int8 runtime (calibrated on the run's own calibration images, as serving does it)."""
    from dataclasses import replace

    import torch
    from custom_net import sly_seg_dataset as data
    from custom_net.demo import demo_project_dir
    from custom_net.evaluate import evaluate_items, select_items
    from custom_net.predict import load_predictor
    from custom_net.quantize import QuantizationError
    from custom_net.run_folder import RunFolder

    try:
        predictor = load_predictor(run, "cpu", "int8")
    except QuantizationError as e:  # e.g. after --quick's two epochs: a model not yet decisive
        return {"refused": str(e)}
    project = data.open_project(demo_project_dir())
    items = select_items(project, RunFolder(run).split_set("val"))
    cpu = torch.device("cpu")
    return {label: evaluate_items(trained, project.meta, items, cpu, worst=0)["metrics"]["mean_fg_iou"]
            for label, trained in (("float32", predictor.trained), ("int8", replace(predictor.trained, model=predictor.net)))}


def paired_se(ours: list[float], baseline: list[float]) -> float:
    """Standard error of the mean difference: what the seeds' own spread lets the guard resolve. Both
    sides train from the same seeds (initial weights, batch order, augmentations), so the spread is that
    of the per-seed differences, without the part the two sides share."""
    differences = [a - b for a, b in zip(ours, baseline, strict=True)]
    return statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")


def bench_quality(args) -> dict:
    """The same seeded training budgets on the demo project with the fast path and in float32, over a
    few seeds: runs whose arithmetic differs in the last bits follow different trajectories, so one
    seed measures that noise as much as the precision. The spread between seeds is reported too."""
    from custom_net.train import main
    from custom_net.hardware import select_device

    on_cpu = select_device(args.device).type == "cpu"  # the int8 runtime is for CPUs: no int8 rows from a GPU run
    epochs, seeds = ("2", [0]) if args.quick else (str(args.guard_epochs),
                                                    list(range(args.first_seed, args.first_seed + args.seeds)))
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, extra in (("ours", ["--amp", "auto", "--channels-last"]),
                               ("baseline", ["--amp", "off", "--no-channels-last"])):
            start, scores = time.perf_counter(), []
            for seed in seeds:
                run = Path(tmp) / f"{variant}_{seed}"
                summary = main(["--demo", "--epochs", epochs, "--seed", str(seed), "--reporter", "none",
                                "--gpu-id", args.device, "--output", str(run), *extra])
                scores.append(summary["final"]["mean_fg_iou"])
                if variant == "ours" and on_cpu:
                    result.setdefault("int8", []).append(int8_fidelity(run))
            result[variant] = {"mean_fg_iou": statistics.fmean(scores), "per_seed": scores,
                               "seed_stdev": statistics.stdev(scores) if len(scores) > 1 else float("nan"),
                               "seconds": (time.perf_counter() - start) / len(seeds)}
    result["seeds"], result["epochs"] = list(seeds), int(epochs)
    result["difference"] = abs(result["ours"]["mean_fg_iou"] - result["baseline"]["mean_fg_iou"])
    result["difference_se"] = paired_se(result["ours"]["per_seed"], result["baseline"]["per_seed"])
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ---- orchestration ---------------------------------------------------------------------

BENCHES = {"data": bench_data, "train": bench_train, "feed": bench_feed, "infer": bench_infer, "quality": bench_quality}


def run_section(name: str, args) -> dict:
    """Each section in a fresh process: peak memory per section, no warm caches carried over."""
    command = [sys.executable, __file__, "--section", name, "--device", args.device]
    command += ["--quick"] * args.quick + ["--compile"] * args.compile
    command += ["--seeds", str(args.seeds), "--first-seed", str(args.first_seed), "--guard-epochs", str(args.guard_epochs)]
    command += ["--workers", str(args.workers)] * (args.workers is not None)
    if args.models:
        command += ["--models", *args.models]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench section {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table(results: dict) -> str:
    rows = ["| measure | ours | baseline | ratio | target |", "|---|---|---|---|---|"]

    def add(measure, ours, baseline, unit, ratio, target=None):
        verdict = "" if target is None else f"≥ {target:g}× {'✅' if ratio >= target else '❌'}"
        rows.append(f"| {measure} | {ours:.4g} {unit} | {baseline:.4g} {unit} | {ratio:.2f}× | {verdict} |")

    if "data" in results:
        d = results["data"]
        for label in ("data", "data+augs"):
            add(f"{label} pipeline @{SIZE}² ({d['source']}, {d['items']} items)", d[label]["ours"],
                d[label]["baseline"], "samples/s", d[label]["ours"] / d[label]["baseline"], TARGETS[label])
        rows.append(f"| one-time cache build | {d['cache_build_s']:.2f} s | | | |")
    if "train" in results:
        t = results["train"]
        ratios = []
        for name, r in t["models"].items():
            ratios.append(r["ours"] / r["baseline"])
            add(f"train {name} {SIZE}² b8 ({r['ours_amp']}+CL vs fp32 NCHW)", r["ours"], r["baseline"], "img/s", ratios[-1])
            rows.append(f"| ↳ {name} achieved FLOP/s | {r['ours_flops'] / 1e9:.0f} G = {r['ours_flops'] / t['ceiling_bf16']:.0%} "
                        f"of bf16 roof | {r['baseline_flops'] / 1e9:.0f} G = {r['baseline_flops'] / t['ceiling_fp32']:.0%} "
                        f"of fp32 roof | | |")
        add("train (geomean)", geomean(r["ours"] for r in t["models"].values()),
            geomean(r["baseline"] for r in t["models"].values()), "img/s", geomean(ratios), TARGETS["train (geomean)"])
        rows.append(f"| matmul roof ({t['device']}) | bf16 {t['ceiling_bf16'] / 1e9:.0f} GFLOP/s | "
                    f"fp32 {t['ceiling_fp32'] / 1e9:.0f} GFLOP/s | | |")
    if "feed" in results:
        f = results["feed"]
        target = TARGETS["feed (cuda)"] if f["device"].startswith("cuda") else None  # a GPU target
        for name, r in f["models"].items():
            add(f"feed {name} {SIZE}² b8: loader ({f['workers']} workers, {f['source']}, augs) vs synthetic batch "
                f"on {f['device']}", r["loader"], r["synthetic"], "img/s", r["loader"] / r["synthetic"], target)
    if "infer" in results:
        i = results["infer"]
        ratios = []
        for name, r in i["models"].items():
            ratios.append(r["baseline"] / r["ours"])
            add(f"infer {name}, one {i['image']} end to end", r["ours"], r["baseline"], "ms", ratios[-1])
        add("infer (geomean)", geomean(r["ours"] for r in i["models"].values()),
            geomean(r["baseline"] for r in i["models"].values()), "ms", geomean(ratios), TARGETS["infer (geomean)"])
        int8 = {name: r for name, r in i["models"].items() if "int8" in r}
        for name, r in int8.items():
            add(f"infer {name} int8 runtime (load {r['int8_load_s']:.1f} s)", r["int8"], r["baseline"], "ms",
                r["baseline"] / r["int8"])
        if int8:
            add("infer int8 (geomean)", geomean(r["int8"] for r in int8.values()),
                geomean(r["baseline"] for r in int8.values()), "ms",
                geomean(r["baseline"] / r["int8"] for r in int8.values()), TARGETS["infer int8 (geomean)"])
    if "quality" in results:
        q = results["quality"]
        budget = f" after {q['epochs']} epochs" if "epochs" in q else ""  # (results from before it was recorded)
        which = f" ({q['seeds'][0]}–{q['seeds'][-1]})" if q["seeds"][0] else ""
        rows.append(f"| quality guard: demo mean fg IoU{budget}, mean of {len(q['seeds'])} seed(s){which} | "
                    f"{q['ours']['mean_fg_iou']:.4f} ({q['ours']['seconds']:.0f} s/run) | "
                    f"{q['baseline']['mean_fg_iou']:.4f} ({q['baseline']['seconds']:.0f} s/run) | "
                    f"Δ {q['difference']:.4f} ± {q['difference_se']:.4f} (1 SE) | < 0.01 {guard_verdict(q)} |")

        def seeds(r):
            return f"{', '.join(f'{v:.3f}' for v in r['per_seed'])} (stdev {r['seed_stdev']:.3f})"
        rows.append(f"| ↳ per seed | {seeds(q['ours'])} | {seeds(q['baseline'])} | | |")
        accepted = [r for r in q.get("int8", []) if "refused" not in r]
        if accepted:
            int8, float32 = (statistics.fmean(r[k] for r in accepted) for k in ("int8", "float32"))
            rows.append(f"| int8 runtime on the fast path's best checkpoints ({len(accepted)} of {len(q['int8'])}): "
                        f"demo mean fg IoU | {int8:.4f} (int8) | {float32:.4f} (float32) | Δ {int8 - float32:+.4f} | |")
        for r in q.get("int8", []):
            if "refused" in r:
                rows.append(f"| ↳ int8 refused | {r['refused']} | | | |")
    memory = ", ".join(f"{k} {v['peak_rss_mb']:.0f} MB" for k, v in results.items())
    cuda = ", ".join(f"{k} {v['cuda_peak_mb']:.0f} MB" for k, v in results.items() if v.get("cuda_peak_mb"))
    rows.append(f"\nPeak RSS per section: {memory}." + (f" CUDA max allocated: {cuda}." if cuda else ""))
    return "\n".join(rows)


def guard_verdict(quality: dict) -> str:
    """✅ under 0.01; ❌ only when the gap is over 0.01 by more than two standard errors; in between
    the seeds cannot tell a precision effect from run-to-run noise, and the verdict says so."""
    difference, se = quality["difference"], quality.get("difference_se", 0.0)
    if difference < 0.01:
        return "✅"
    return "❌" if math.isnan(se) or difference - 2 * se >= 0.01 else "❔ within noise"


def machine() -> str:
    import torch
    from custom_net.hardware import cpu_model
    cpu = cpu_model()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}{gpu}")


def whole_number(minimum: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return int(text)
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--models", nargs="+",
                        help=f"architectures for train, feed and infer (default: all; feed: {' '.join(FEED_MODELS)})")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--workers", type=whole_number(0), metavar="N",
                        help="feed section: loader worker processes (default: 8 on a GPU, none on a CPU)")
    parser.add_argument("--seeds", type=whole_number(1), default=5, help="quality guard: training runs per side")
    parser.add_argument("--first-seed", type=whole_number(0), default=0,
                        help="quality guard: seeds K..K+N-1 (runs are deterministic: a later run can add seeds)")
    parser.add_argument("--guard-epochs", type=whole_number(1), default=8, help="quality guard: epochs per run")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: one section, JSON out
    args = parser.parse_args(argv)
    if args.section:
        print(json.dumps(BENCHES[args.section](args)))
        return 0
    results, failed = {}, {}
    for name in args.only:
        started = time.perf_counter()
        try:
            results[name] = run_section(name, args)
        except RuntimeError as e:  # the other sections still run: a one-shot run on a lent GPU keeps what it got
            failed[name] = str(e)
            print(f"[bench] {e}", file=sys.stderr, flush=True)
            continue
        # Each section's rows as soon as it ends, and the JSON so far: a run cut short keeps them.
        print(f"[bench] {name} done in {time.perf_counter() - started:.0f} s\n{table({name: results[name]})}\n",
              file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    text = table(results) + "".join(f"\n\nSection {name} failed: {error.strip().splitlines()[-1]}"
                                    for name, error in failed.items())
    header = f"## {datetime.date.today().isoformat()} — {machine()}\n\n`python bench/run.py {' '.join(argv or sys.argv[1:])}`\n\n"
    print(header + text)
    if args.record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + header + text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
