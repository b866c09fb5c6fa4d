#!/usr/bin/env python3
"""The table of docs/BENCHMARKS.md's deployment matrix from scripts/sim-matrix-bench.sh's
JSON reports: `python3 scripts/sim-matrix-table.py $OUT` prints one markdown row per
(layout, N): medians over the runs, every run's value in brackets; "lost" is the
largest loss of any run, and a run stopped before it wrote its report is "no report"."""
import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/simmatrix"
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    m = re.match(r"(.+)-(\d+)-(\d+)\.json$", os.path.basename(path))
    if not m:
        continue
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = None
    runs.setdefault((m.group(1), int(m.group(2))), []).append(report)


def get(r, *path):
    for p in path:
        if not isinstance(r, dict) or r.get(p) is None:
            return None
        r = r[p]
    return r


def cell(reports, fn, fmt="{:.2f}", each=True):
    values = [fn(r) if r else None for r in reports]
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    med = fmt.format(statistics.median(got))
    if len(values) == 1 or not each:
        return med
    return "{} ({})".format(med, ", ".join("-" if v is None else fmt.format(v) for v in values))


print("| layout | N | connect (s) | ingested msg/s (sent) | rollout to all (s) | rollback (s) "
      "| control plane KiB/device | control plane peak RSS (MiB) | broker KiB/device | sealed = stored, lost |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (layout, n), reports in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    def lost(r):
        c = r["checks"]
        return c["sealed"] - c["stored"]
    oks = ["no report" if r is None else "FAILED" if r["failures"] else "yes" for r in reports]
    # A loss in any run is the run's result: the largest, not the median.
    losses = [lost(r) for r in reports if r]
    print("| {} | {:,} | {} | {} ({}) | {} | {} | {} | {} | {} | {}, lost {} |".format(
        layout, n,
        cell(reports, lambda r: get(r, "connect_s")),
        cell(reports, lambda r: get(r, "steady", "ingested_per_s"), "{:.0f}"),
        cell(reports, lambda r: get(r, "steady", "sent_per_s"), "{:.0f}", each=False),
        cell(reports, lambda r: get(r, "rollout", "control_plane_s")),
        cell(reports, lambda r: get(r, "rollback", "control_plane_s")),
        cell(reports, lambda r: get(r, "memory", "control_plane_per_device_kib"), "{:.1f}"),
        cell(reports, lambda r: (get(r, "memory", "control_plane_peak_kib") or 0) / 1024 or None, "{:.0f}"),
        cell(reports, lambda r: get(r, "memory", "broker_per_device_kib"), "{:.1f}"),
        "/".join(oks),
        "{:,}".format(max(losses)) if losses else "-",
    ))
    for r in reports:
        for f in (r or {}).get("failures", []):
            print(f"<!-- {layout} {n}: {f} -->")
