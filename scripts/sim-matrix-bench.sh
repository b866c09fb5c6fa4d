#!/bin/bash
# docs/BENCHMARKS.md, "The deployment matrix": fleetctl sim with N devices (default
# 1000) in each layout — embedded; mosquitto + sled; mosquitto + PostgreSQL; a 3-node
# NATS cluster + 2 replicas + PostgreSQL + S3 (moto) — ROUNDS rounds (default 3), the
# layouts interleaved within a round. JSON reports, stderr and `uptime` before and
# after each run go to $OUT. Run as root (initdb runs as postgres) on an idle machine,
# after `cargo build --release -p fleet-control` and `scripts/test.sh` (its venv holds
# moto). LAYOUTS (default "embedded mosquitto-sled mosquitto-pg nats-replicas") picks
# layouts, FIRST (default 1) the first round's number.
set -u
BIN=${FLEETCTL:-${CARGO_TARGET_DIR:-target}/release/fleetctl}
VENV=${FLEETML_VENV:-/var/tmp/fleetml-venv}
N=${N:-1000}
RATE=${RATE:-0.2}
DURATION=${DURATION:-30}
ROUNDS=${ROUNDS:-3}
LAYOUTS=${LAYOUTS:-embedded mosquitto-sled mosquitto-pg nats-replicas}
OUT=${OUT:-/var/tmp/simmatrix}; mkdir -p "$OUT"

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
PGD=/tmp/simpg; rm -rf $PGD; mkdir -p $PGD; chown postgres:postgres $PGD
runuser -u postgres -- "$PGBIN/initdb" -D $PGD/data -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D $PGD/data -o "-p 25432 -k $PGD/data -c listen_addresses=127.0.0.1 -c max_connections=200" -l $PGD/log -w start >/dev/null
"$VENV/bin/moto_server" -H 127.0.0.1 -p 25433 > "$OUT/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; runuser -u postgres -- "$PGBIN/pg_ctl" -D $PGD/data -m fast stop >/dev/null' EXIT
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:25433/ && break; sleep 0.2; done

fresh_db() {
  runuser -u postgres -- "$PGBIN/psql" -h 127.0.0.1 -p 25432 -U postgres -qc "DROP DATABASE IF EXISTS sim" -c "CREATE DATABASE sim"
}

uptime > "$OUT/load.txt"
for run in $(seq "${FIRST:-1}" "$ROUNDS"); do
  for layout in $LAYOUTS; do
    args=(sim --devices "$N" --rate "$RATE" --duration "$DURATION" --json)
    env=()
    case $layout in
      embedded) args+=(--broker embedded) ;;
      mosquitto-sled) args+=(--broker mosquitto) ;;
      mosquitto-pg) fresh_db; args+=(--broker mosquitto --database postgres://postgres@127.0.0.1:25432/sim) ;;
      nats-replicas)
        fresh_db
        bucket=sim$run$RANDOM
        curl -s -X PUT "http://127.0.0.1:25433/$bucket" > /dev/null
        args+=(--broker nats --replicas 2 --database postgres://postgres@127.0.0.1:25432/sim --blobs "s3://$bucket/bundles")
        env=(AWS_ENDPOINT_URL=http://127.0.0.1:25433 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
             AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing) ;;
    esac
    env "${env[@]}" "$BIN" "${args[@]}" > "$OUT/$layout-$N-$run.json" 2> "$OUT/$layout-$N-$run.err"
    echo "$layout N=$N run $run rc=$?" >> "$OUT/load.txt"; uptime >> "$OUT/load.txt"
  done
done
