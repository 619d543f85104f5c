#!/usr/bin/env bash
# Starts a strata cluster on this machine in one command: 3 coordinators (a Raft group) and 2
# workers, all on loopback, sharing one blob store, with a development PKI.
#
# Usage: bash deploy/local-cluster.sh [DIR]     (default DIR: /tmp/strata-cluster)
# Prints the environment a client needs (STRATA_COORDINATOR, STRATA_CA, STRATA_TOKEN,
# STRATA_STORE) and runs until interrupted (Ctrl-C stops every process it started).
# Ports: coordinators on UDP 127.0.0.1:7101-7103 (STRATA_CLUSTER_PORT changes the first).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-/tmp/strata-cluster}"
PORT="${STRATA_CLUSTER_PORT:-7101}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
cargo build --release --quiet -p strata
STRATA="$CARGO_TARGET_DIR/release/strata"

if [ ! -f "$DIR/coordinator-c1.toml" ]; then
  "$STRATA" coordinator init --out "$DIR" --coordinators 3 --workers 2 --listen "127.0.0.1:$PORT" >/dev/null
fi
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for c in c1 c2 c3; do
  STRATA_LOG="${STRATA_LOG:-info}" "$STRATA" coordinator --config "$DIR/coordinator-$c.toml" 2>"$DIR/$c.log" &
  pids+=($!)
done
for w in w1 w2; do
  STRATA_LOG="${STRATA_LOG:-info}" "$STRATA" worker --config "$DIR/worker-$w.toml" 2>"$DIR/$w.log" &
  pids+=($!)
done
coordinators="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
cat <<ENV
cluster running (logs in $DIR/*.log). For a client:
export STRATA_COORDINATOR=$coordinators
export STRATA_CA=$DIR/pki/ca.crt
export STRATA_TOKEN=$(cat "$DIR/pki/client-tokens")
export STRATA_STORE=$DIR/store
then: $STRATA status; $STRATA build CONTEXT ...
ENV
wait
