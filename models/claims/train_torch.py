#!/usr/bin/env python3
"""PyTorch trainer of the claims model: trains on the GPU when one is present and
exports ONNX the fleetml agent serves.

What a fleetml training job runs with `command = ["python3", "models/claims/train_torch.py",
"--data", "{train_csv}", "--out", "{out}", "--seed", "{seed}"]` (see
control-plane/src/jobs.rs). It reads the claims feature schema (features.toml) and
encodes rows exactly as the agent does (numbers as they are, categories one-hot, into
the 25-column `input` tensor), so the exported model takes the agent's input. The
network standardizes inside the graph, then a 25-16-2 MLP with softmax
(`probabilities`). Writes model.onnx, features.toml and metrics.json; metrics.json
carries what the job records in the lineage: framework and version, the device, CUDA
and cuDNN versions.

Needs torch and onnx (`pip install torch onnx`); Python 3.11+ (tomllib).
"""

import argparse
import csv
import json
import math
import os
import pathlib
import shutil
import sys
import tomllib

import torch

HERE = pathlib.Path(__file__).resolve().parent


def load_schema(path):
    with open(path, "rb") as f:
        return tomllib.load(f)["features"]


def width(schema):
    cols = 0
    for f in schema:
        n = len(f["values"]) if f["type"] == "category" and f.get("encoding", "one-hot") == "one-hot" else 1
        cols = max(cols, f["column"] + n)
    return cols


def encode(schema, row, cols):
    """One row of named cells into the model's input columns (as the agent encodes)."""
    out = [0.0] * cols
    for f in schema:
        cell = (row.get(f["name"]) or "").strip()
        col = f["column"]
        if f["type"] in ("float", "int"):
            try:
                v = float(cell)
            except ValueError:
                v = f.get("impute", float("nan"))
            out[col] = v
        elif f.get("encoding", "one-hot") == "one-hot":
            if cell in f["values"]:
                out[col + f["values"].index(cell)] = 1.0
        else:
            out[col] = float(f["values"].index(cell)) if cell in f["values"] else -1.0
    return out


def read(paths, schema, label, cols):
    xs, ys = [], []
    for p in paths:
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                y = (r.get(label) or "").strip()
                if y == "":
                    continue
                xs.append(encode(schema, r, cols))
                ys.append(1 if y in ("1", "1.0", "true", "yes") else 0)
    return torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.long)


class Net(torch.nn.Module):
    def __init__(self, mean, std, hidden):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(mean.numel(), hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
        )

    def forward(self, x):
        # A missing number (NaN) becomes the training mean. `x != x` rather than
        # nan_to_num: the agent's runtime (tract) evaluates Equal/Not/Where, not IsInf.
        x = torch.where(x != x, self.mean, x)
        return torch.softmax(self.body((x - self.mean) / self.std), dim=-1)


def auc(scores, labels):
    pairs = sorted(zip(scores, labels))
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return 0.5
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        rank_sum += rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--data", action="append", required=True, help="training CSV (repeat)")
    a.add_argument("--holdout", default=os.environ.get("FLEETML_HOLDOUT_CSV"))
    a.add_argument("--features", default=str(HERE / "features.toml"))
    a.add_argument("--label", default="investigate")
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--epochs", type=int, default=30)
    a.add_argument("--hidden", type=int, default=16)
    a.add_argument("--lr", type=float, default=0.01)
    a.add_argument("--out", required=True)
    args = a.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    schema = load_schema(args.features)
    cols = width(schema)
    x, y = read(args.data, schema, args.label, cols)
    if len(y) < 10:
        sys.exit(f"{len(y)} labelled rows are too few to train on")
    mean = torch.nanmean(x, dim=0)
    std = torch.sqrt(torch.nanmean((x - mean) ** 2, dim=0)).clamp_min(1e-6)
    model = Net(mean, std, args.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    xd, yd = x.to(device), y.to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    for _ in range(args.epochs):
        order = torch.randperm(len(yd), generator=g)
        for start in range(0, len(yd), 64):
            idx = order[start:start + 64].to(device)
            p = model(xd[idx])
            loss = torch.nn.functional.nll_loss(torch.log(p + 1e-9), yd[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    model.eval()
    ex, ey = read([args.holdout], schema, args.label, cols) if args.holdout else (x, y)
    with torch.no_grad():
        probs = model(ex.to(device)).cpu()
    scores = probs[:, 1].tolist()
    labels = ey.tolist()
    accuracy = sum(1 for s, t in zip(scores, labels) if (s >= 0.5) == bool(t)) / len(labels)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    torch.onnx.export(
        model,
        (torch.zeros(1, cols),),
        str(out / "model.onnx"),
        input_names=["input"],
        output_names=["probabilities"],
        dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    shutil.copy(args.features, out / "features.toml")
    metrics = {
        "accuracy": accuracy,
        "auc": auc(scores, labels),
        "rows": len(y),
        "eval_rows": len(labels),
        "framework": {"name": "torch", "version": torch.__version__},
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.uname().machine})",
    }
    if device.type == "cuda":
        metrics["cuda"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            metrics["cudnn"] = str(torch.backends.cudnn.version())
    (out / "metrics.json").write_text(json.dumps(metrics) + "\n")
    print(f"trained on {len(y)} rows on {metrics['device']}: accuracy {accuracy:.4f}, AUC {metrics['auc']:.4f}")
    if not math.isfinite(metrics["auc"]):
        sys.exit("training diverged")


if __name__ == "__main__":
    main()
