#!/usr/bin/env bash
# GPU checks in one run on a lent GPU machine (see README "Speed"). Prints everything; copies logs to $OUT if set.
#   bash bench/gpu.sh                                     # uses the python on PATH; .whl/*.whl (carried wheels) first
#   BENCH_DEVICE=cpu BENCH_ARGS=--quick bash bench/gpu.sh  # a dry run of this script on a machine without a GPU
# The GPU targets (train, feed) come first and every step streams its tables to $OUT, so a run cut short keeps them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
device=${BENCH_DEVICE:-cuda}
read -ra extra <<< "${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported())
PY
fi
status=0
# 1) correctness: a tiny run end to end (bf16 autocast, channels_last, pinned memory, workers on a GPU)
python3 custom_net/train.py --demo --epochs 2 --gpu-id "${device/#cuda/cuda:0}" --num-workers auto \
    --output /tmp/gpu_demo --reporter jsonl 2>&1 | tail -n 5 | tee "$out/demo.log" || status=1
# 2) the bench (feed: the real loader with 8 workers against a synthetic batch on the GPU), the GPU targets first
python3 bench/run.py --device "$device" "${extra[@]}" --only train feed infer data quality --json "$out/bench.json" \
    2>&1 | tee "$out/bench.md" || status=1
# 3) torch.compile on the fast path for two architectures (compiling all five would take minutes)
python3 bench/run.py --device "$device" "${extra[@]}" --only train --compile --models UNet11 LinkNet34 \
    2>&1 | tee "$out/bench_compile.md" || status=1
exit $status
