#!/usr/bin/env bash
# What a shadow version costs the requests a device serves: three agents on this machine
# serve claims v1 through their HTTP API — one alone, one with v2 (the same weights) in
# shadow on every request, one with it on 10 % — and `api-bench http` measures each with
# 1 and 2 clients, the agents alternating, ROUNDS times. Prints one line per run (mode
# model clients p50_us p99_us requests_per_second, prefixed with the agent) and the
# medians. Release build (`--release`); run it on an idle machine.
#   scripts/shadow-bench.sh [SECONDS] [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-3}
rounds=${2:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
cargo build --quiet --release --locked --manifest-path "$root/Cargo.toml" \
    -p fleet-agent -p hil-tests --bin fleet-agent --bin api-bench
cargo build --quiet --locked --manifest-path "$root/Cargo.toml" -p fleet-control --bin fleetctl
R="$CARGO_TARGET_DIR/release"
F="$CARGO_TARGET_DIR/debug/fleetctl"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
work=$(mktemp -d -t fleetml-shadow-bench.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
c="$root/models/claims"
"$F" keys generate --out keys --name k >/dev/null 2>&1
"$F" keys trust-policy --public keys/k.pub --out trust.toml >/dev/null
for v in 1 2; do
    "$F" bundle build --model "$c/model.onnx" --name claims --version $v --features "$c/features.toml" \
        --golden "$c/holdout.csv" --reference "$c/reference.csv" --key keys/k.key --out "v$v.fmb" >/dev/null
done
board="$root/boards/generic-x86_64.toml"
declare -A sample=([alone]="" [shadow100]="100%" [shadow10]="10%")
declare -A port
for a in alone shadow100 shadow10; do
    "$R/fleet-agent" install-bundle v1.fmb --data-dir "data-$a" --trust trust.toml --board "$board" >/dev/null
    if [ -n "${sample[$a]}" ]; then
        "$R/fleet-agent" install-bundle v2.fmb --shadow --shadow-sample "${sample[$a]}" \
            --data-dir "data-$a" --trust trust.toml --board "$board" >/dev/null
    fi
    port[$a]=$((20000 + RANDOM % 20000))
    RUST_LOG=warn "$R/fleet-agent" run --data-dir "data-$a" --trust trust.toml --board "$board" \
        --listen "127.0.0.1:${port[$a]}" --workers 2 --queue 256 >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do
        curl -fs "http://127.0.0.1:${port[$a]}/readyz" >/dev/null 2>&1 && break
        sleep 0.05
    done
done
out="$work/runs.txt"
for round in $(seq "$rounds"); do
    for n in 1 2; do
        for a in alone shadow100 shadow10; do
            line=$("$R/api-bench" http --model claims --name claims --addr "127.0.0.1:${port[$a]}" \
                --clients "$n" --seconds "$seconds" --features)
            echo "$a $line" | tee -a "$out"
        done
    done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "medians (agent clients p50_us p99_us requests_per_second):"
python3 - "$out" <<'PY'
import statistics, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    agent, clients = f[0], int(f[3])
    runs[(agent, clients)].append((float(f[4]), float(f[5]), float(f[6])))
for (agent, clients), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    med = [statistics.median(x) for x in zip(*rs)]
    print(f"{agent:<10} {clients} {med[0]:.0f} {med[1]:.0f} {med[2]:.0f}")
PY
for a in shadow100 shadow10; do
    curl -fs "http://127.0.0.1:${port[$a]}/v1/models/claims/monitoring?limit=1" |
        python3 -c "import json,sys; w=json.load(sys.stdin)['windows']; s=(w[-1] if w else {}).get('shadow'); print('$a last window shadow:', s and {k: s[k] for k in ('runs','shed','rows','agreement')})"
done
