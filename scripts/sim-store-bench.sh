#!/bin/bash
# docs/BENCHMARKS.md, "sled vs PostgreSQL": fleetctl sim with mosquitto, sled vs
# PostgreSQL (a private server on port 25432), N devices (default 1000), 3 rounds
# interleaved; JSON reports and uptime in $OUT. Run as root (initdb runs as postgres)
# on an idle machine, after cargo build --release -p fleet-control.
set -u
BIN=${FLEETCTL:-${CARGO_TARGET_DIR:-target}/release/fleetctl}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
PGD=/tmp/simpg; rm -rf $PGD; mkdir -p $PGD; chown postgres:postgres $PGD
runuser -u postgres -- $PGBIN/initdb -D $PGD/data -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- $PGBIN/pg_ctl -D $PGD/data -o "-p 25432 -k $PGD/data -c listen_addresses=127.0.0.1" -l $PGD/log -w start >/dev/null
OUT=${OUT:-/var/tmp/simbench}; mkdir -p $OUT
uptime > $OUT/load.txt
for run in 1 2 3; do
  for store in sled pg; do
    args=(sim --devices ${N:-1000} --broker mosquitto --rate 0.2 --duration 30 --json)
    if [ $store = pg ]; then
      runuser -u postgres -- $PGBIN/psql -h 127.0.0.1 -p 25432 -U postgres -qc "DROP DATABASE IF EXISTS sim" -c "CREATE DATABASE sim"
      args+=(--database postgres://postgres@127.0.0.1:25432/sim)
    fi
    $BIN "${args[@]}" > $OUT/$store-$run.json 2> $OUT/$store-$run.err
    echo "$store run $run rc=$?" >> $OUT/load.txt; uptime >> $OUT/load.txt
  done
done
runuser -u postgres -- $PGBIN/pg_ctl -D $PGD/data -m fast stop >/dev/null
