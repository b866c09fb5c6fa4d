#!/usr/bin/env python3
"""Writes the ONNX project's backend test cases out of the pip `onnx` package.

    onnx_cases.py OUT_DIR

Node cases come from `onnx.backend.test.case.node.collect_testcases(None)` and are
written as OUT_DIR/node/<name>/model.onnx + test_data_set_<i>/{input,output}_<j>.pb (the
layout of `onnx.backend.test.cmd_tools`). The wheel's model-level cases under
onnx/backend/test/data/{simple,pytorch-operator,pytorch-converted} are copied next to
them. OUT_DIR/cases.tsv lists every case: kind, name, rtol, atol, and `tensor` or the
first non-tensor value kind (sequence, map, optional) the case uses.
"""
import os
import shutil
import sys

import onnx
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases

MODEL_KINDS = ("simple", "pytorch-operator", "pytorch-converted")


def value_kind(vi):
    for kind in ("map_type", "sequence_type", "optional_type"):
        if vi.type.HasField(kind):
            return kind.split("_")[0]
    return "tensor"


def serialize(vi, value):
    kind = value_kind(vi)
    if kind == "map":
        return numpy_helper.from_dict(value, vi.name).SerializeToString()
    if kind == "sequence":
        return numpy_helper.from_list(value, vi.name).SerializeToString()
    if kind == "optional":
        return numpy_helper.from_optional(value, vi.name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(value, vi.name).SerializeToString()


def main():
    out = sys.argv[1]
    if os.path.exists(out):
        shutil.rmtree(out)
    rows = []
    for case in collect_testcases(None):
        case_dir = os.path.join(out, "node", case.name)
        os.makedirs(case_dir)
        graph = case.model.graph
        with open(os.path.join(case_dir, "model.onnx"), "wb") as f:
            f.write(case.model.SerializeToString())
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = os.path.join(case_dir, f"test_data_set_{i}")
            os.makedirs(ds)
            for j, value in enumerate(inputs):
                with open(os.path.join(ds, f"input_{j}.pb"), "wb") as f:
                    f.write(serialize(graph.input[j], value))
            for j, value in enumerate(outputs):
                with open(os.path.join(ds, f"output_{j}.pb"), "wb") as f:
                    f.write(serialize(graph.output[j], value))
        kinds = [value_kind(v) for v in list(graph.input) + list(graph.output)]
        kind = next((k for k in kinds if k != "tensor"), "tensor")
        rows.append(("node", case.name, case.rtol, case.atol, kind))
    data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    for kind in MODEL_KINDS:
        for name in sorted(os.listdir(os.path.join(data, kind))):
            src = os.path.join(data, kind, name)
            if not os.path.exists(os.path.join(src, "model.onnx")):
                continue
            shutil.copytree(src, os.path.join(out, kind, name))
            model = onnx.load(os.path.join(src, "model.onnx"))
            kinds = [value_kind(v) for v in list(model.graph.input) + list(model.graph.output)]
            vk = next((k for k in kinds if k != "tensor"), "tensor")
            rows.append((kind, name, 1e-3, 1e-7, vk))
    with open(os.path.join(out, "cases.tsv"), "w") as f:
        f.write(f"# onnx {onnx.__version__}\n")
        for row in rows:
            f.write("\t".join(str(c) for c in row) + "\n")
    print(f"wrote {len(rows)} cases (onnx {onnx.__version__}) to {out}")


if __name__ == "__main__":
    main()
