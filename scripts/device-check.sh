#!/usr/bin/env bash
# The offload runtime's GPU checks as one prepared command for a lent GPU machine (the
# workplace's device tool). CI never runs this; the project builds and tests without a GPU.
#
# Prepare, in this checkout, once (that machine cannot reach PyPI, and its image lacks pydantic):
#   scripts/device-check.sh --download-wheels
# The tool sends at most 64 MiB of working tree and the tracked files are 83 MiB, so keep
# the olmoe built-in (not needed here) from travelling for the call, and restore it after:
#   git rm -q --cached -r specmoe/models/builtin/weights/olmoe-64e
#   echo /specmoe/models/builtin/weights/olmoe-64e/ >> .git/info/exclude
#   ... device run: command "bash scripts/device-check.sh", carry [".whl"], timeout_s 540 ...
#   git reset -q; sed -i '\#/specmoe/models/builtin/weights/olmoe-64e/#d' .git/info/exclude
# It writes device.txt, gpu-tests.log and offload-cuda-*.json/.log to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions)
if [ "${1:-}" = "--download-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit 0
fi
OUT=${OUT:-/tmp/specmoe-device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
specmoe() { python3 -m specmoe "$@"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$OUT/device.txt"

# 1. GPU-marked tests: offloaded decoding equals resident decoding on the host->GPU tier.
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" || true

# 2. Routing to replay: the built-in model's traces and two predictors (seconds on 16 cores).
specmoe collect --model switch-128e --text builtin --out runs/switch-200k --max-tokens 200000
for p in token transition; do
    specmoe train --predictor "$p" --traces runs/switch-200k --out "runs/p/$p"
done

# 3. Host -> GPU offload benchmark: the CPU benchmark's settings (Switch-base experts, 9 MiB),
#    then Mixtral-sized experts (4096 x 14336, 336 MiB each; one random set per layer is
#    stored in pinned memory, every copy is a full copy) where the link, not compute, rules.
predictors=(--predictor-dir runs/p/token --predictor-dir runs/p/transition)
specmoe bench offload --device cuda --traces runs/switch-200k "${predictors[@]}" --tokens 96 --warmup 32 \
    --repeats 5 --expert-shape 768,2048 --json "$OUT/offload-cuda-switch.json" 2>&1 | tee "$OUT/offload-cuda-switch.log"
specmoe bench offload --device cuda --traces runs/switch-200k "${predictors[@]}" --tokens 32 --warmup 16 \
    --repeats 3 --cache-fractions 0.1,0.25 --expert-shape 4096,14336 \
    --json "$OUT/offload-cuda-mixtral.json" 2>&1 | tee "$OUT/offload-cuda-mixtral.log"
