"""Runs an ONNX model with onnxruntime (the peer fleetml is compared against).

stdin: {"model": PATH, "inputs": {NAME: {"shape": [...], "data": [...]}}, "threads": 1}
stdout: {OUTPUT: {"shape": [...], "data": [...]}} (float32 values)
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> None:
    request = json.load(sys.stdin)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(request.get("threads", 1))
    session = ort.InferenceSession(request["model"], options, providers=["CPUExecutionProvider"])
    feeds = {
        name: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        for name, t in request["inputs"].items()
    }
    outputs = session.run(None, feeds)
    result = {
        spec.name: {"shape": list(value.shape), "data": value.astype(np.float32).ravel().tolist()}
        for spec, value in zip(session.get_outputs(), outputs)
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
