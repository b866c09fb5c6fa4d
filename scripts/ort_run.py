"""Runs an ONNX model with onnxruntime (the peer fleetml is compared against).

stdin: {"model": PATH, "inputs": {NAME: {"shape": [...], "data": [...], "dtype": "f32"}},
        "threads": 1}
stdout: {OUTPUT: {"shape": [...], "dtype": "f32", "data": [...]}}

`dtype` is one of f32, f16, f64, i8, i32, i64, u8, bool (f32 when absent). Outputs keep
their type: floats as numbers (f16 widened exactly), integers exactly, booleans as 0/1.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

DTYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "f64": np.float64,
    "i8": np.int8,
    "i32": np.int32,
    "i64": np.int64,
    "u8": np.uint8,
    "bool": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def main() -> None:
    request = json.load(sys.stdin)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(request.get("threads", 1))
    session = ort.InferenceSession(request["model"], options, providers=["CPUExecutionProvider"])
    feeds = {
        name: np.asarray(t["data"], dtype=DTYPES[t.get("dtype", "f32")]).reshape(t["shape"])
        for name, t in request["inputs"].items()
    }
    outputs = session.run(None, feeds)
    result = {}
    for spec, value in zip(session.get_outputs(), outputs):
        value = np.asarray(value)
        dtype = NAMES.get(value.dtype, "f32")
        if dtype in ("f32", "f16", "f64"):
            data = value.astype(np.float64).ravel().tolist()
        else:
            data = value.astype(np.int64).ravel().tolist()
        result[spec.name] = {"shape": list(value.shape), "dtype": dtype, "data": data}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
