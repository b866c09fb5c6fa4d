#!/usr/bin/env bash
# Benchmarks inference in one run on one machine: the claims model and PP-OCR's
# direction classifier (cls, 1x3x48x192), detector (det, 1x3x640x640) and recogniser
# (rec, 1x3x48x320), each
#   - called directly on tract (1 and 2 threads) and on ONNX Runtime (1 thread),
#   - through the agent's HTTP API over TCP (binary tensors for the image models), one
#     agent on tract and two on ONNX Runtime (the PyPI wheel's libonnxruntime; `ort`
#     with its default intra-op threads, one per core, `ort1` with one), at 1, 2 and 4
#     clients for claims and cls, 1 client for det and rec,
#   - and through Python onnxruntime (the peer) with 1 and 2 threads at the same clients.
# Each cell runs REPEATS times for SECONDS (det at least 5 s); the table shows medians.
# Then the agents' idle memory and threads, with the claims model and with cls.
# Results go to docs/BENCHMARKS.md by hand, with this command.
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

# tract-threads for `api-bench direct --threads 2`; the agents run on boards without
# `intra_op_threads`, so tract runs each of their requests on one thread.
cargo build --quiet --profile dist --locked --manifest-path "$root/Cargo.toml" --workspace --bins \
    --features hil-tests/tract-threads
R="$CARGO_TARGET_DIR/dist"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
models=$("$py" -c "import os, rapidocr_onnxruntime as r; print(os.path.join(os.path.dirname(r.__file__), 'models'))")
lib=$("$py" -c "import glob, os, onnxruntime as o; print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), 'capi', 'libonnxruntime.so.*')))[0])")
declare -A onnx=(
    [claims]="$root/models/claims/model.onnx"
    [cls]="$models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    [det]="$models/ch_PP-OCRv4_det_infer.onnx"
    [rec]="$models/ch_PP-OCRv4_rec_infer.onnx"
)
declare -A shape=([cls]="x=N,3,48,192" [det]="x=N,3,H,W" [rec]="x=N,3,48,W")
work=$(mktemp -d -t fleetml-bench.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
c="$root/models/claims"
"$R/fleetctl" keys generate --out keys --name k >/dev/null 2>&1
"$R/fleetctl" keys trust-policy --public keys/k.pub --out trust.toml >/dev/null
"$R/fleetctl" bundle build --model "$c/model.onnx" --name claims --version 1 --features "$c/features.toml" \
    --golden "$c/holdout.csv" --key keys/k.key --out claims.fmb >/dev/null
for m in cls det rec; do
    "$R/fleetctl" bundle build --model "${onnx[$m]}" --name "$m" --version 1 --input-shape "${shape[$m]}" \
        --key keys/k.key --out "$m.fmb" >/dev/null
done
board() { # NAME BACKENDS [ONNXRUNTIME SECTION]
    printf 'name = "%s"\ntarget = "x86_64-unknown-linux-gnu"\ncpu_cores = %s\nmemory_mb = 4096\nbackends = [%s]\n%s\n[agent]\nmemory_budget_mb = 2048\n[paths]\ndata_dir = "/var/lib/fleetml"\nconfig_dir = "/etc/fleetml"\n' \
        "$1" "$(nproc)" "$2" "${3:-}" >"$1.toml"
}
board tract '"cpu"'
board ort '"onnxruntime"' "$(printf '[onnxruntime]\nlibrary = "%s"\nproviders = ["cpu"]\n' "$lib")"
# ONNX Runtime with one intra-op thread per prediction (the board's
# `agent.intra_op_threads = 1`); `ort` above uses its default, one per core.
board ort1 '"onnxruntime"' "$(printf '[onnxruntime]\nlibrary = "%s"\nproviders = ["cpu"]\n' "$lib")"
sed -i 's/^memory_budget_mb = 2048$/memory_budget_mb = 2048\nintra_op_threads = 1/' ort1.toml
for b in tract ort ort1; do
    for m in claims cls det rec; do
        "$R/fleet-agent" install-bundle "$m.fmb" --data-dir "data-$b" --trust trust.toml --board "$b.toml" >/dev/null
    done
done

ready() { # PORT
    "$py" - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(3000):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.05)
sys.exit("the agent did not become ready")
PY
}
declare -A port
for b in tract ort ort1; do
    port[$b]=$((20000 + RANDOM % 20000))
    RUST_LOG=warn "$R/fleet-agent" run --data-dir "data-$b" --trust trust.toml --board "$b.toml" \
        --listen "127.0.0.1:${port[$b]}" --workers 2 --queue 256 --max-body-bytes 16777216 >/dev/null 2>&1 &
    pids+=($!)
    ready "${port[$b]}"
done

out="$work/results.txt"
for _ in $(seq "$repeats"); do
    for m in claims cls det rec; do
        s=$seconds
        [ "$m" = det ] && [ "$s" -lt 5 ] && s=5
        for t in 1 2; do
            "$R/api-bench" direct --model "$m" --onnx "${onnx[$m]}" --threads "$t" --seconds "$s" >>"$out"
        done
        "$R/api-bench" direct --model "$m" --onnx "${onnx[$m]}" --backend onnxruntime --onnxruntime "$lib" \
            --threads 1 --seconds "$s" >>"$out"
        clients="1 2 4"
        case $m in det | rec) clients=1 ;; esac
        for n in $clients; do
            for b in tract ort ort1; do
                "$R/api-bench" http --model "$m" --addr "127.0.0.1:${port[$b]}" --clients "$n" \
                    --seconds "$s" --label "$b" >>"$out"
            done
            if [ "$m" = claims ]; then
                "$R/api-bench" http --model claims --addr "127.0.0.1:${port[tract]}" --clients "$n" \
                    --seconds "$s" --features >>"$out"
            fi
            for t in 1 2; do
                "$py" "$root/scripts/ort_bench.py" "${onnx[$m]}" "$m" "$t" "$n" "$s" >>"$out"
            done
        done
    done
done
kill "${pids[@]}" 2>/dev/null || true
wait 2>/dev/null || true
pids=()

# Idle memory: a fresh agent with only the claims model, then only cls, on the tract
# board; resident memory and threads after it has been ready and idle for 3 s.
idle="$work/idle.txt"
for m in claims cls; do
    "$R/fleet-agent" install-bundle "$m.fmb" --data-dir "idle-$m" --trust trust.toml --board tract.toml >/dev/null
    p=$((20000 + RANDOM % 20000))
    RUST_LOG=warn "$R/fleet-agent" run --data-dir "idle-$m" --trust trust.toml --board tract.toml \
        --listen "127.0.0.1:$p" >/dev/null 2>&1 &
    pid=$!
    pids+=("$pid")
    ready "$p"
    sleep 3
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$pid/status")
    threads=$(awk '/^Threads:/{print $2}' "/proc/$pid/status")
    echo "$m $rss $threads" >>"$idle"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
done

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB; date: $(date -u +%F); load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "onnxruntime: $("$py" -c 'import onnxruntime; print(onnxruntime.__version__)') ($lib)"
echo "each cell: median of $repeats runs of ${seconds}s (det at least 5 s)"
"$py" - "$out" <<'PY'
import collections, statistics, sys
cells = collections.defaultdict(list)
for line in open(sys.argv[1]):
    mode, model, clients, p50, p99, rps = line.split()
    cells[(model, mode, int(clients))].append((float(p50), float(p99), float(rps)))
order = {"claims": 0, "cls": 1, "det": 2, "rec": 3}
print("| model | path | clients | p50 µs | p99 µs | requests/s |")
print("|---|---|---|---|---|---|")
for (model, mode, clients), runs in sorted(cells.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], kv[0][1])):
    med = lambda i: statistics.median(r[i] for r in runs)
    print(f"| {model} | {mode} | {clients} | {med(0):.1f} | {med(1):.1f} | {med(2):.1f} |")
PY
echo
echo "| idle agent with | VmRSS KiB | threads |"
echo "|---|---|---|"
while read -r m rss threads; do echo "| $m | $rss | $threads |"; done <"$idle"
