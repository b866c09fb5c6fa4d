#!/usr/bin/env bash
# The main job, end to end on this machine: an operator makes signing keys and a trust
# policy, builds a bundle of the example claims model, signs and verifies it; a device
# agent then verifies it with the same policy and self-tests the model before it would
# activate it. Every step is a real fleetctl / fleet-agent command, echoed as it runs.
#
# Usage: scripts/demo.sh [WORKDIR]     (default: a fresh temporary directory)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
work=${1:-$(mktemp -d -t fleetml-demo.XXXXXX)}
mkdir -p "$work"

echo "==> building fleetctl and fleet-agent (target dir $CARGO_TARGET_DIR)"
cargo build --quiet --locked --manifest-path "$root/Cargo.toml" --workspace --bins
bin="$CARGO_TARGET_DIR/debug"
claims="$root/models/claims"

step() {
    echo
    echo "\$ $*"
    "$@"
}

cd "$work"
echo "==> working in $work"
if [ ! -f keys/release.key ]; then
    step "$bin/fleetctl" keys generate --out keys --name release
fi
step "$bin/fleetctl" keys trust-policy --public keys/release.pub --threshold 1 --out trust.toml --force
step "$bin/fleetctl" bundle build \
    --model "$claims/model.onnx" --name claims --version 1 --label demo \
    --features "$claims/features.toml" --lineage "$claims/lineage.toml" \
    --reference "$claims/reference.csv" --golden "$claims/holdout.csv" \
    --out claims-v1.fmb
step "$bin/fleetctl" bundle sign claims-v1.fmb --key keys/release.key
step "$bin/fleetctl" bundle verify claims-v1.fmb --trust trust.toml
step "$bin/fleetctl" bundle inspect claims-v1.fmb
step "$bin/fleet-agent" verify-bundle claims-v1.fmb --trust trust.toml

echo
echo "==> done: the signed bundle is $work/claims-v1.fmb"
