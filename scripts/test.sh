#!/usr/bin/env bash
# The test command: prepares the Python peers the tests compare against (a venv with
# onnxruntime, once), then runs every test of the workspace.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
export FLEETML_VENV=${FLEETML_VENV:-/var/tmp/fleetml-venv}

stamp="$FLEETML_VENV/.requirements.sha256"
want=$(sha256sum "$root/requirements-test.txt" | cut -d' ' -f1)
if [ ! -x "$FLEETML_VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> preparing $FLEETML_VENV (onnxruntime and friends, from requirements-test.txt)"
    python3 -m venv "$FLEETML_VENV"
    "$FLEETML_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements-test.txt"
    echo "$want" > "$stamp"
fi
export FLEETML_PYTHON="$FLEETML_VENV/bin/python"

cd "$root"
cargo test --workspace --locked "$@"
