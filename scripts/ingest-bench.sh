#!/usr/bin/env bash
# Fleet messaging load figures for docs/BENCHMARKS.md: messages/s the control plane's
# ingest stores from DEVICES simulated devices (real MQTT clients, sealed window reports,
# QoS 1) through the embedded broker — plain and over TLS — and through mosquitto, in one
# run; the API's latency per call (a new connection each, plain and over TLS); and the
# agent's outbox cost per message next to a plain append + fdatasync of the same bytes.
# Each figure is run REPEATS times; every run's JSON line is printed, then the medians.
#
# Usage: scripts/ingest-bench.sh [DEVICES] [MESSAGES_PER_DEVICE] [REPEATS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
devices=${1:-20}
messages=${2:-250}
repeats=${3:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
# FLEETML_BENCH_PROFILE=release measures the quicker-to-build profile (same code, no LTO).
profile=${FLEETML_BENCH_PROFILE:-dist}
cargo build --quiet --profile "$profile" --locked --manifest-path "$root/Cargo.toml" --workspace --bins
bin="$CARGO_TARGET_DIR/$profile/ingest-load"
out=$(mktemp -t fleetml-ingest.XXXXXX)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$repeats"); do
    for broker in embedded mosquitto; do
        RUST_LOG=warn "$bin" --devices "$devices" --messages "$messages" --broker "$broker" 2>/dev/null | tee -a "$out"
    done
    RUST_LOG=warn "$bin" --devices "$devices" --messages "$messages" --broker embedded --tls 2>/dev/null | tee -a "$out"
    RUST_LOG=warn "$bin" --api 500 2>/dev/null | tee -a "$out"
    RUST_LOG=warn "$bin" --api 500 --tls 2>/dev/null | tee -a "$out"
    "$bin" --outbox --messages 2000 | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def med(sel, key):
    xs = [r[key] for r in rows if sel(r)]
    return statistics.median(xs) if xs else float("nan")
for b, tls in (("embedded", False), ("embedded", True), ("mosquitto", False)):
    sel = lambda r, b=b, tls=tls: r["bench"] == "ingest" and r["broker"] == b and r.get("tls", False) == tls
    print(f"ingest via {b}{' over TLS' if tls else ''}: median {med(sel, 'stored_per_s'):.0f} stored messages/s")
for tls in (False, True):
    sel = lambda r, tls=tls: r["bench"] == "api" and r["tls"] == tls
    print(f"API call{' over TLS' if tls else ''} (new connection each): median p50 {med(sel, 'p50_us'):.0f} us, p95 {med(sel, 'p95_us'):.0f} us")
sel = lambda r: r["bench"] == "outbox_push"
print(f"outbox push: median {med(sel, 'us_per_message'):.0f} us/message "
      f"(plain append + fdatasync: {med(sel, 'file_append_fdatasync_us'):.0f} us)")
PY
