#!/usr/bin/env bash
# GPU checks in one run on a lent GPU machine (see README "Speed"). Prints everything; copies logs to $OUT if set.
#   bash bench/gpu.sh            # uses the python on PATH; .whl/*.whl (carried wheels) are installed first if present
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported())
PY
# 1) correctness on the GPU: a tiny run end to end on cuda (bf16 autocast, channels_last, pinned memory, workers)
python3 custom_net/train.py --demo --epochs 2 --gpu-id cuda:0 --num-workers auto --output /tmp/gpu_demo --reporter jsonl \
    2>&1 | tail -n 5 | tee "$out/demo.log"
# 2) the speed bench on cuda (the feed section: the real loader with 8 workers against a synthetic batch on the
#    GPU), then torch.compile on the fast path for two architectures (compiling all five would take minutes)
python3 bench/run.py --device cuda --json "$out/bench.json" 2>&1 | tee "$out/bench.md"
python3 bench/run.py --device cuda --only train --compile --models UNet11 LinkNet34 2>&1 | tee "$out/bench_compile.md"
