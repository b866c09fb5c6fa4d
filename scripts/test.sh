#!/usr/bin/env bash
# The test command: prepares the Python peers the tests compare against (a venv with
# onnxruntime and onnx, once), then runs every test of the workspace, and the agent's
# tests again built with the `gpu` feature (wonnx). GPU tests run on whatever Vulkan
# adapter exists (CI installs Mesa's software one, llvmpipe) and skip, saying why, when
# there is none; the fallback to the CPU is tested either way.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/fleetml-target}
export FLEETML_VENV=${FLEETML_VENV:-/var/tmp/fleetml-venv}

stamp="$FLEETML_VENV/.requirements.sha256"
want=$( (cat "$root/requirements-test.txt" "$root/requirements-nodeps.txt"; echo "old onnxruntime 1.19.2") | sha256sum | cut -d' ' -f1)
if [ ! -x "$FLEETML_VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> preparing $FLEETML_VENV (onnxruntime and friends, from requirements-test.txt and requirements-nodeps.txt)"
    python3 -m venv "$FLEETML_VENV"
    "$FLEETML_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements-test.txt"
    "$FLEETML_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$root/requirements-nodeps.txt"
    # An ONNX Runtime older than the C API the agent is built for (1.20): the test that
    # the agent refuses it loads this wheel's library (1.19 is the oldest wheel that ships
    # libonnxruntime.so). Only the .so is taken.
    old="$FLEETML_VENV/old-onnxruntime"
    rm -rf "$old" && mkdir -p "$old"
    "$FLEETML_VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_27_x86_64 -d "$old" onnxruntime==1.19.2
    "$FLEETML_VENV/bin/python" - "$old" <<'PY'
import glob, os, sys, zipfile
old = sys.argv[1]
for wheel in glob.glob(os.path.join(old, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if "/capi/libonnxruntime.so" in name:
                with open(os.path.join(old, os.path.basename(name)), "wb") as out:
                    out.write(z.read(name))
    os.remove(wheel)
PY
    echo "$want" > "$stamp"
fi
export FLEETML_PYTHON="$FLEETML_VENV/bin/python"

cd "$root"
cargo test --workspace --locked "$@"
echo "==> tract's multithreaded matrix products (feature tract-threads)"
cargo test -p fleetml-inference --features tract-threads --locked tract_threads "$@"
echo "==> the agent built without sinks and capture (they refuse what they cannot serve)"
cargo test -p fleet-agent --no-default-features --features onnxruntime --locked --test it features "$@"
echo "==> the agent again, built with the gpu feature (wonnx)"
FLEETML_GPU_ALLOW_SOFTWARE=${FLEETML_GPU_ALLOW_SOFTWARE:-1} \
    cargo test -p fleet-agent -p fleetml-inference --features fleet-agent/gpu --locked "$@"
