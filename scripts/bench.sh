#!/usr/bin/env bash
# Benchmarks the agent's backend call, its HTTP API over TCP and over a Unix socket, and
# onnxruntime (Python, 1 and 2 threads) on the claims model and PP-OCR's text-direction
# classifier, at 1, 2 and 4 concurrent clients, in one run on one machine. Each cell is
# run REPEATS times for SECONDS; the table shows medians. Results go to docs/BENCHMARKS.md
# by hand, with this command.
#
# Usage: scripts/bench.sh [SECONDS] [REPEATS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-3}
repeats=${2:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
venv=${FLEETML_VENV:-/var/tmp/fleetml-venv}
py="$venv/bin/python"
[ -x "$py" ] || { echo "no $py: run scripts/test.sh once to prepare the onnxruntime venv" >&2; exit 1; }

cargo build --quiet --release --locked --manifest-path "$root/Cargo.toml" --workspace --bins
R="$CARGO_TARGET_DIR/release"
cls=$("$py" -c "import os, rapidocr_onnxruntime as r; print(os.path.join(os.path.dirname(r.__file__), 'models', 'ch_ppocr_mobile_v2.0_cls_infer.onnx'))")
work=$(mktemp -d -t fleetml-bench.XXXXXX)
cd "$work"
c="$root/models/claims"
"$R/fleetctl" keys generate --out keys --name k >/dev/null 2>&1
"$R/fleetctl" keys trust-policy --public keys/k.pub --out trust.toml >/dev/null
"$R/fleetctl" bundle build --model "$c/model.onnx" --name claims --version 1 --features "$c/features.toml" \
    --golden "$c/holdout.csv" --key keys/k.key --out claims.fmb >/dev/null
"$R/fleetctl" bundle build --model "$cls" --name textdir --version 1 --input-shape x=N,3,48,192 \
    --key keys/k.key --out textdir.fmb >/dev/null
"$R/fleet-agent" install-bundle claims.fmb --data-dir data --trust trust.toml >/dev/null
"$R/fleet-agent" install-bundle textdir.fmb --data-dir data --trust trust.toml >/dev/null
port=$((20000 + RANDOM % 20000))
RUST_LOG=warn "$R/fleet-agent" run --data-dir data --trust trust.toml --listen "127.0.0.1:$port" \
    --socket "$work/agent.sock" --workers 2 --queue 256 --max-body-bytes 8388608 >/dev/null 2>&1 &
agent=$!
trap 'kill $agent 2>/dev/null; rm -rf "$work"' EXIT
sleep 2

out="$work/results.txt"
for _ in $(seq "$repeats"); do
    for model in claims cls; do
        "$R/api-bench" direct --model "$model" --onnx "$cls" --seconds "$seconds" >>"$out"
        for clients in 1 2 4; do
            "$R/api-bench" http --model "$model" --addr "127.0.0.1:$port" --clients "$clients" --seconds "$seconds" >>"$out"
            "$R/api-bench" http --model "$model" --socket "$work/agent.sock" --clients "$clients" --seconds "$seconds" >>"$out"
            if [ "$model" = claims ]; then
                "$R/api-bench" http --model claims --addr "127.0.0.1:$port" --clients "$clients" --seconds "$seconds" --features >>"$out"
            fi
            for threads in 1 2; do
                model_path="$c/model.onnx"; [ "$model" = cls ] && model_path="$cls"
                "$py" "$root/scripts/ort_bench.py" "$model_path" "$model" "$threads" "$clients" "$seconds" >>"$out"
            done
        done
    done
done

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB; date: $(date -u +%F)"
echo "each cell: median of $repeats runs of ${seconds}s"
"$py" - "$out" <<'PY'
import collections, statistics, sys
cells = collections.defaultdict(list)
for line in open(sys.argv[1]):
    mode, model, clients, p50, p99, rps = line.split()
    cells[(model, mode, int(clients))].append((float(p50), float(p99), float(rps)))
print("| model | path | clients | p50 µs | p99 µs | requests/s |")
print("|---|---|---|---|---|---|")
for (model, mode, clients), runs in sorted(cells.items()):
    med = lambda i: statistics.median(r[i] for r in runs)
    print(f"| {model} | {mode} | {clients} | {med(0):.1f} | {med(1):.1f} | {med(2):.0f} |")
PY
