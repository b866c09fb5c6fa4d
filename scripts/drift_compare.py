"""Drift detection compared on the same windows: fleetml's monitor, Evidently's default
data-drift preset and NannyML's univariate (and data-reconstruction) drift, as installed
from PyPI (requirements-drift-bench.txt). Run by scripts/drift-bench.sh; writes JSON and
prints the Markdown tables of docs/BENCHMARKS.md.

Every tool gets the same reference (models/claims/reference.csv, 4,000 rows) and the same
windows: consecutive windows of 100, 250 and 1,000 rows cut from fresh claims streams
(the claims generator with another seed). Per window each tool says which features it
flags; no tool keeps state across windows (fleetml runs with alerts after one window, so
its verdicts are per window like the others').

- False alarms: undrifted windows (`holdout.csv` of the fresh seed). Reported per
  feature-window and per window (any feature flagged).
- Detection: windows of the documented shift (`drifted.csv`: claim_amount, customer_age,
  channel) and of a quarter of rows drawn from it (the rest undrifted). Delay: for every
  starting window, windows until a shifted feature is flagged, averaged over starts and
  the three features (a window that flags it: 1). Also the share of the unshifted
  features flagged in those windows.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

# Neither library may phone home (NannyML reports usage to segment.io by default).
os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

warnings.filterwarnings("ignore")

CATEGORICAL = ["claim_type", "channel", "region", "police_report"]
SHIFTED = ["claim_amount", "customer_age", "channel"]
LABEL = "investigate"


def windows_of(df, size, count):
    return [df.iloc[i * size:(i + 1) * size] for i in range(min(count, len(df) // size))]


def fleetml(binary, reference, features, sizes, count, streams):
    out = subprocess.run(
        [binary, reference, features, ",".join(map(str, sizes)), str(count)] + list(streams.values()),
        check=True, capture_output=True, text=True,
    ).stdout
    by_path = {p: name for name, p in streams.items()}
    verdicts = {}
    for line in out.splitlines():
        r = json.loads(line)
        verdicts.setdefault((by_path[r["stream"]], r["size"]), []).append(set(r["flagged"]))
    return verdicts


def evidently(ref, windows):
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    numeric = [c for c in ref.columns if c not in CATEGORICAL]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=CATEGORICAL)
    reference = Dataset.from_pandas(ref, data_definition=definition)
    verdicts, methods = [], {}
    for w in windows:
        snap = Report([DataDriftPreset()]).run(Dataset.from_pandas(w.reset_index(drop=True), data_definition=definition), reference)
        flagged = set()
        for m in snap.dict()["metrics"]:
            c = m["config"]
            if not c.get("type", "").endswith("ValueDrift"):
                continue
            methods[c["column"]] = f'{c["method"]} {c["threshold"]}'
            p_value = "p_value" in c["method"]
            v = m["value"]
            if (p_value and v < c["threshold"]) or (not p_value and v >= c["threshold"]):
                flagged.add(c["column"])
        verdicts.append(flagged)
    return verdicts, methods


def nannyml(ref, stream, size, count):
    import nannyml as nml

    columns = list(ref.columns)
    data = stream.iloc[: size * count].reset_index(drop=True)
    calc = nml.UnivariateDriftCalculator(column_names=columns, chunk_size=size)
    calc.fit(ref)
    res = calc.calculate(data).filter(period="analysis").to_df()
    verdicts = []
    for _, row in res.iterrows():
        verdicts.append({c for c in columns if any(bool(row[(c, m, "alert")]) for m in res[c].columns.get_level_values(0).unique())})
    methods = {c: ",".join(res[c].columns.get_level_values(0).unique()) for c in columns}
    numeric = [c for c in columns if c not in CATEGORICAL]
    drd = nml.DataReconstructionDriftCalculator(column_names=numeric, chunk_size=size)
    drd.fit(ref)
    mres = drd.calculate(data).filter(period="analysis").to_df()
    multivariate = [bool(a) for a in mres[("reconstruction_error", "alert")]]
    return verdicts[:count], methods, multivariate[:count]


def rates(verdicts, features):
    n = len(verdicts)
    feature_windows = sum(len(v & set(features)) for v in verdicts)
    return {
        "windows": n,
        "feature_window_rate": feature_windows / (n * len(features)) if n else None,
        "any_window_rate": sum(1 for v in verdicts if v & set(features)) / n if n else None,
    }


def delay(verdicts, features):
    """Mean windows until each shifted feature is flagged, over every starting window
    (starts after which it never is flagged count as the windows left + 1)."""
    n = len(verdicts)
    delays = []
    for f in SHIFTED:
        for s in range(n):
            hit = next((i - s + 1 for i in range(s, n) if f in verdicts[i]), None)
            delays.append(hit if hit is not None else n - s + 1)
    unshifted = [f for f in features if f not in SHIFTED]
    extra = sum(len(v & set(unshifted)) for v in verdicts) / (n * len(unshifted)) if n else None
    return {"mean_windows": float(np.mean(delays)), "unshifted_flag_rate": extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleetml", required=True, help="the drift-compare example binary")
    ap.add_argument("--reference", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--streams", required=True, help="folder with a fresh seed's holdout.csv and drifted.csv")
    ap.add_argument("--sizes", default="100,250,1000")
    ap.add_argument("--undrifted-windows", type=int, default=100)
    ap.add_argument("--drifted-windows", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    ref = pd.read_csv(a.reference).drop(columns=[LABEL])
    features = list(ref.columns)
    holdout = pd.read_csv(os.path.join(a.streams, "holdout.csv")).drop(columns=[LABEL])
    drifted = pd.read_csv(os.path.join(a.streams, "drifted.csv")).drop(columns=[LABEL])
    # Undrifted windows from the first half of the fresh holdout; the quarter-shift
    # stream mixes the second half with drifted rows (seeded).
    half = len(holdout) // 2
    undrifted = holdout.iloc[:half].reset_index(drop=True)
    rng = np.random.default_rng(7)
    rest = holdout.iloc[half:half + len(drifted)].reset_index(drop=True)
    pick = rng.random(len(rest)) < 0.25
    quarter = rest.copy()
    quarter.loc[pick] = drifted.iloc[: len(rest)].reset_index(drop=True).loc[pick].values
    tmp = tempfile.mkdtemp(prefix="drift-compare-")
    streams = {}
    for name, df in [("undrifted", undrifted), ("documented shift", drifted), ("a quarter shifted", quarter)]:
        path = os.path.join(tmp, name.replace(" ", "_") + ".csv")
        df.to_csv(path, index=False)
        streams[name] = path
    count = {"undrifted": a.undrifted_windows, "documented shift": a.drifted_windows, "a quarter shifted": a.drifted_windows}

    results = {"sizes": sizes, "tools": {}, "seconds": {}}
    t = time.time()
    fm = fleetml(a.fleetml, a.reference, a.features, sizes, max(count.values()), streams)
    results["seconds"]["fleetml"] = time.time() - t
    tools = {"fleetml": {}, "Evidently DataDriftPreset": {}, "NannyML univariate": {}}
    multivariate = {"fleetml reconstruction error": {}, "NannyML data reconstruction": {}}
    methods = {}
    t_ev = t_nm = 0.0
    for size in sizes:
        for name, df in [("undrifted", undrifted), ("documented shift", drifted), ("a quarter shifted", quarter)]:
            n = count[name]
            f = fm[(name, size)][:n]
            t = time.time()
            ev, methods["Evidently DataDriftPreset"] = evidently(ref, windows_of(df, size, n))
            t_ev += time.time() - t
            t = time.time()
            nm, methods["NannyML univariate"], nm_multi = nannyml(ref, df, size, n)
            t_nm += time.time() - t
            for tool, v in [("fleetml", f), ("Evidently DataDriftPreset", ev), ("NannyML univariate", nm)]:
                entry = tools[tool].setdefault(str(size), {})
                entry[name] = rates(v, features) if name == "undrifted" else delay(v, features)
            for tool, flags in [("fleetml reconstruction error", ["reconstruction_error" in v for v in f]), ("NannyML data reconstruction", nm_multi)]:
                entry = multivariate[tool].setdefault(str(size), {})
                entry[name] = sum(flags) / len(flags) if flags else None
            print(f"size {size} {name}: done", file=sys.stderr)
    results["seconds"]["evidently"] = t_ev
    results["seconds"]["nannyml"] = t_nm
    results["tools"] = tools
    results["multivariate"] = multivariate
    results["methods"] = methods
    with open(a.out, "w") as fh:
        json.dump(results, fh, indent=1)

    for size in sizes:
        print(f"\n**Windows of {size} rows**\n")
        print("| tool | false alarms per feature-window | windows with any false alarm | windows to flag the documented shift | unshifted features flagged then | windows to flag a quarter shifted |")
        print("|---|---|---|---|---|---|")
        for tool, by in tools.items():
            r = by[str(size)]
            u, d, q = r["undrifted"], r["documented shift"], r["a quarter shifted"]
            print(f'| {tool} | {u["feature_window_rate"]:.3f} | {u["any_window_rate"]:.2f} | {d["mean_windows"]:.2f} | {d["unshifted_flag_rate"]:.3f} | {q["mean_windows"]:.2f} |')
    print("\n**Multivariate: share of windows flagged**\n")
    print("| monitor | " + " | ".join(f"{s} rows: undrifted / documented / quarter" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for tool, by in multivariate.items():
        cells = []
        for s in sizes:
            r = by[str(s)]
            cells.append(f'{r["undrifted"]:.2f} / {r["documented shift"]:.2f} / {r["a quarter shifted"]:.2f}')
        print(f"| {tool} | " + " | ".join(cells) + " |")
    print("\nmethods:", json.dumps(methods, indent=1))
    print("seconds:", json.dumps(results["seconds"]))


if __name__ == "__main__":
    main()
