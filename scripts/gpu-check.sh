#!/usr/bin/env bash
# The GPU check, as one script for a machine with a Vulkan-capable GPU (the device
# machine: `run` it there; under 5 minutes once built): names the card and driver, runs
# the GPU backend's tests, the ONNX backend cases through wonnx, and the cls benchmark
# (GPU backend call vs the CPU backend call and onnxruntime) in the same run.
#
# Usage: scripts/gpu-check.sh [OUT_DIR]     (results land in OUT_DIR, default ./gpu-check)
# Software Vulkan (llvmpipe) is refused unless FLEETML_GPU_ALLOW_SOFTWARE=1.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-gpu-check}
mkdir -p "$out"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
venv=${FLEETML_VENV:-/var/tmp/fleetml-venv}
py="$venv/bin/python"
cd "$root"

{ command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | sed -n '/Devices:/,$p'; \
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv; } \
  > "$out/device.txt" || true
cat "$out/device.txt"

# PROFILE=dev gives a quicker build (for trying the script; report dist numbers, the
# profile packages are built with).
profile=${PROFILE:-dist}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --profile "$profile" --locked -p hil-tests --features gpu --bins
R="$CARGO_TARGET_DIR/$dir"
FLEETML_PYTHON="$py" cargo test --profile "$profile" --locked -p fleet-agent --features gpu --test it gpu:: \
    -- --nocapture 2>&1 | tee "$out/agent-gpu-tests.txt"

cases=$(mktemp -d)
"$py" scripts/onnx_cases.py "$cases/cases" >/dev/null
"$R/onnx-conformance" --backend gpu --cases "$cases/cases" --report "$out/onnx-gpu.tsv" \
    --timeout-s 20 | tee "$out/onnx-gpu-summary.txt"

cls=$("$py" -c "import os, rapidocr_onnxruntime as r; print(os.path.join(os.path.dirname(r.__file__), 'models', 'ch_ppocr_mobile_v2.0_cls_infer.onnx'))")
{
    for _ in 1 2 3; do
        "$R/api-bench" gpu --model cls --onnx "$cls" --seconds 5
        "$R/api-bench" direct --model cls --onnx "$cls" --seconds 5
        "$py" scripts/ort_bench.py "$cls" cls 1 1 5
    done
} 2>&1 | tee "$out/cls-bench.txt"
rm -rf "$cases"
