#!/usr/bin/env bash
# Drift detection compared for docs/BENCHMARKS.md: fleetml's monitor, Evidently's default
# data-drift preset and NannyML's univariate and data-reconstruction drift, from PyPI, on
# the same windows of fresh claims streams (the claims generator with seed SEED, which
# the committed files were not made with). Prints the Markdown tables and writes the JSON
# to OUT.
#
# Usage: scripts/drift-bench.sh [SEED] [OUT]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seed=${1:-1042}
out=${2:-drift-bench.json}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
venv=${FLEETML_DRIFT_VENV:-/var/tmp/fleetml-drift-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements-drift-bench.txt"
cargo build --quiet --release --locked --manifest-path "$root/Cargo.toml" \
    -p fleet-control --example drift-compare -p fleetml-claims --bin claims-train
streams=$(mktemp -d -t fleetml-streams.XXXXXX)
trap 'rm -rf "$streams"' EXIT
# 220,000 undrifted and 20,000 shifted claims (the tiny training run is not used).
"$CARGO_TARGET_DIR/release/claims-train" --seed "$seed" --out "$streams" \
    --rows 200 --holdout 220000 --drifted 20000 --epochs 1 > /dev/null
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$venv/bin/python" "$root/scripts/drift_compare.py" \
    --fleetml "$CARGO_TARGET_DIR/release/examples/drift-compare" \
    --reference "$root/models/claims/reference.csv" \
    --features "$root/models/claims/features.toml" \
    --streams "$streams" --out "$out"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
