"""Serving throughput and latency over HTTP: PyTorch (fast path, float32, int8) and ONNX Runtime.

    python bench/serve_bench.py                          # a fixed-seed UNet at 256x256 (no int8: untrained)
    python bench/serve_bench.py --run results/exp1 --requests 50 --clients 4 --output serve.md   # then add the table to bench/RESULTS.md

For each runtime the serving app runs under uvicorn on 127.0.0.1 (as deployed), and for a 256x256
and a 1067x800 image (a lemons photo when ../shared is present) it measures sequential latency
(p50 / p95) and requests per second with one and with ``--clients`` concurrent clients.
Whole-image mode: both images are resized to the training size, so the difference between them is
decoding, resizing and encoding the masks. The int8 runtime needs a trained run with its calibration
images (``info/calibration_images.npz``); it is left out for runs without them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parent.parent
# runtime name -> serving app environment: PyTorch on its fast path (bf16 where fast), in float32 and in int8
# (CPU only), ONNX Runtime
VARIANTS = {"pytorch": {"UNET_RUNTIME": "pytorch"}, "pytorch-fp32": {"UNET_RUNTIME": "pytorch", "UNET_AMP": "off"},
            "pytorch-int8": {"UNET_RUNTIME": "int8"}, "onnx": {"UNET_RUNTIME": "onnx"}}
BASELINE = "pytorch-fp32"
LEMON = REPO.parent / "shared" / "data" / "lemons_test" / "ds1" / "img" / "IMG_0315.jpeg"


def fixed_seed_run(root: Path, size: int = 256) -> Path:
    """A run folder with an untrained UNet (speed does not depend on the weights)."""
    from custom_net.model import build_model
    from custom_net.run_folder import RunFolder

    folder = RunFolder(root)
    folder.checkpoints.mkdir(parents=True)
    folder.info.mkdir()
    classes = [{"title": t, "shape": "bitmap", "color": c} for t, c in (("__bg__", "#000000"), ("lemon", "#FFC800"),
                                                                       ("kiwi", "#28A028"))]
    folder.model_classes.write_text(json.dumps(classes))
    folder.ui_state.write_text(json.dumps({"selectedModel": "UNet", "imgSize": {"width": size, "height": size}}))
    torch.manual_seed(0)
    torch.save(build_model("UNet", len(classes), "none").state_dict(), folder.checkpoint(1, "best"))
    return root


def start_server(run: Path, runtime: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **VARIANTS[runtime], "UNET_CHECKPOINT": str(run), "UNET_DEVICE": "auto",
           "UNET_MODEL_DIR": str(workdir / runtime)}
    log = open(workdir / f"server_{runtime}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--app-dir",
                                str(REPO / "supervisely" / "serve" / "src"), "--host", "127.0.0.1", "--port", str(port),
                                "--log-level", "warning"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.post(f"{url}/is_deployed", timeout=5).json().get("deployed"):
                return process, url
        except (requests.ConnectionError, requests.Timeout, ValueError):
            pass
        time.sleep(0.5)
    process.kill()
    log.close()  # the work folder goes away on exit: show the log's end here
    tail = "".join(Path(log.name).read_text().splitlines(keepends=True)[-15:])
    sys.exit(f"the {runtime} server did not start; the end of its log:\n{tail}")


def timed_requests(url: str, payload: bytes, count: int) -> list[float]:
    latencies = []
    with requests.Session() as session:
        for _ in range(count):
            start = time.perf_counter()
            response = session.post(f"{url}/inference_image", files={"files": ("image.jpg", payload)}, timeout=300)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
    return latencies


def measure(url: str, payload: bytes, requests_per_case: int, clients: int) -> dict:
    timed_requests(url, payload, 3)  # warm-up: first calls build kernels and caches
    latencies = timed_requests(url, payload, requests_per_case)
    per_client = max(1, requests_per_case // clients)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: timed_requests(url, payload, per_client), range(clients)))
    concurrent_rps = clients * per_client / (time.perf_counter() - start)
    return {"p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * float(np.percentile(latencies, 95)),
            "rps": len(latencies) / sum(latencies), "concurrent_rps": concurrent_rps}


def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    small = cv2.resize(rng.integers(0, 256, (16, 16, 3), np.uint8), (256, 256), interpolation=cv2.INTER_CUBIC)
    if LEMON.is_file():
        large, source = LEMON.read_bytes(), LEMON.name
    else:
        picture = cv2.resize(rng.integers(0, 256, (50, 67, 3), np.uint8), (1067, 800), interpolation=cv2.INTER_CUBIC)
        large, source = cv2.imencode(".jpg", picture)[1].tobytes(), "synthetic"
    return {"256x256 (png)": cv2.imencode(".png", small)[1].tobytes(), f"1067x800 (jpeg, {source})": large}


def int8_if_calibrated(run: Path) -> list[str]:
    """All runtimes, less int8 for a run without calibration images (an untrained or older run)."""
    from custom_net.run_folder import RunFolder, resolve_checkpoint

    calibration = RunFolder.of_checkpoint(resolve_checkpoint(run)).calibration
    if calibration.is_file():
        return list(VARIANTS)
    print(f"{run}: no calibration images ({calibration}), so no pytorch-int8 rows (pass --run with a trained run)",
          flush=True)
    return [runtime for runtime in VARIANTS if runtime != "pytorch-int8"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run folder or checkpoint (default: a fixed-seed UNet at 256x256)")
    parser.add_argument("--runtimes", nargs="+", choices=list(VARIANTS),
                        help="default: all (pytorch-int8 only for a run with calibration images)")
    parser.add_argument("--requests", type=int, default=30, help="sequential requests per image and runtime")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the throughput run")
    parser.add_argument("--output", help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run = Path(args.run) if args.run else fixed_seed_run(workdir / "run")
        rows = []
        for runtime in args.runtimes or int8_if_calibrated(run):
            process, url = start_server(run, runtime, workdir)
            try:
                info = requests.post(f"{url}/get_session_info", timeout=30).json()
                for name, payload in images().items():
                    result = measure(url, payload, args.requests, args.clients)
                    rows.append((runtime, info, name, result))
                    print(runtime, name, {k: round(v, 1) for k, v in result.items()}, flush=True)
            finally:
                process.terminate()
                process.wait(timeout=30)

    info = rows[0][1]
    lines = [f"# Serving benchmark ({datetime.date.today().isoformat()})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads visible, "
             f"torch {torch.__version__}, load average before the run {os.getloadavg()[0]:.1f}. "
             f"Model: {info['model_name']} at {info['input_size']['height']}x{info['input_size']['width']}, "
             f"{info['number_of_classes']} classes, device {info['device']}, whole-image mode, "
             f"`/inference_image` over HTTP on 127.0.0.1; {args.requests} sequential requests after 3 warm-up ones, "
             f"then {args.clients} concurrent clients.", "",
             "| runtime | precision | image | p50 ms | p95 ms | req/s (1 client) | req/s (%d clients) |" % args.clients,
             "|---|---|---|---|---|---|---|"]
    for runtime, info, name, r in rows:
        lines.append(f"| {runtime} | {info['precision']} | {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['rps']:.2f} "
                     f"| {r['concurrent_rps']:.2f} |")
    by_key = {(rt, name): r for rt, _, name, r in rows}
    lines.append("")
    for name in dict.fromkeys(name for _, _, name, _ in rows):
        for runtime in VARIANTS:
            if runtime != BASELINE and (runtime, name) in by_key and (BASELINE, name) in by_key:
                ratio = by_key[(runtime, name)]["rps"] / by_key[(BASELINE, name)]["rps"]
                lines.append(f"- {runtime} / {BASELINE} requests per second (1 client), {name}: {ratio:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
