#!/bin/bash
# docs/BENCHMARKS.md, "The ingest's storing ceiling": `fleetctl sim --ingest-only`, sled
# vs PostgreSQL (a private server on port 25434), ROUNDS rounds interleaved (default 3),
# N devices (default 1000) x M window reports each (default 100), IN_FLIGHT the broker's
# in-flight window (default: what `fleetctl broker acl` sets); JSON reports and
# uptime in $OUT. Run as root (initdb runs as postgres) on an idle machine, after
# cargo build --release -p fleet-control (or FLEETCTL=path).
set -u
BIN=${FLEETCTL:-${CARGO_TARGET_DIR:-target}/release/fleetctl}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
PGD=/tmp/fleetml-cappg; rm -rf $PGD; mkdir -p $PGD; chown postgres:postgres $PGD
runuser -u postgres -- $PGBIN/initdb -D $PGD/data -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- $PGBIN/pg_ctl -D $PGD/data -o "-p 25434 -k $PGD/data -c listen_addresses=127.0.0.1" -l $PGD/log -w start >/dev/null
OUT=${OUT:-/var/tmp/capbench}; mkdir -p $OUT
uptime > $OUT/load.txt
for run in $(seq 1 ${ROUNDS:-3}); do
  for store in sled pg; do
    args=(sim --ingest-only --devices ${N:-1000} --messages ${M:-100} --json)
    if [ -n "${IN_FLIGHT:-}" ]; then args+=(--in-flight $IN_FLIGHT); fi
    if [ $store = pg ]; then
      runuser -u postgres -- $PGBIN/psql -h 127.0.0.1 -p 25434 -U postgres -qc "DROP DATABASE IF EXISTS cap" -c "CREATE DATABASE cap"
      args+=(--database postgres://postgres@127.0.0.1:25434/cap)
    fi
    $BIN "${args[@]}" > $OUT/$store-$run.json 2> $OUT/$store-$run.err
    echo "$store run $run rc=$?" >> $OUT/load.txt; uptime >> $OUT/load.txt
  done
done
runuser -u postgres -- $PGBIN/pg_ctl -D $PGD/data -m fast stop >/dev/null
rm -rf $PGD
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
for store in ("sled", "pg"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(sys.argv[1], f"{store}-*.json")))]
    rates = [round(r["stored_per_s"]) for r in runs]
    if rates:
        print(f"{store}: median {statistics.median(rates):.0f} stored msg/s (runs {rates})")
PY
