#!/usr/bin/env bash
# A real cluster build against the embedded engine: 8 independent CPU-heavy stages
# (benches/shapes/fanout8) built cold on a 3-coordinator, 2-worker cluster on this machine and
# cold with `strata build` embedded; also the time from a job becoming ready (the build
# accepted) to a worker starting it, read from the coordinator's and workers' logs.
#
# Usage: bash benches/cluster.sh [--report FILE]
# Builds strata in release (STRATA_BENCH_TARGET, default /var/tmp/strata-bench-target),
# serves busybox from the loopback fixture registry; every wait is bounded.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
REPORT="$REPO/benches/results/cluster-$(date +%F).txt"
[ "${1:-}" = "--report" ] && REPORT="$2"
TARGET_DIR="${STRATA_BENCH_TARGET:-/var/tmp/strata-bench-target}"
(cd "$REPO" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet -p strata -p strata-testkit --bins)
BIN="$TARGET_DIR/release"
WORK="$(mktemp -d /var/tmp/strata-cluster-bench.XXXXXX)"
pids=()
cleanup() {
  [ "${#pids[@]}" -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkfifo "$WORK/hold"
"$BIN/strata-fixture-registry" <"$WORK/hold" >"$WORK/addr" &
pids+=($!)
exec 3>"$WORK/hold"
for _ in $(seq 1 240); do [ -s "$WORK/addr" ] && break; sleep 0.5; done
BASE="$(head -n1 "$WORK/addr")/library/busybox:latest"
CTX="$REPO/benches/shapes/fanout8"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# Embedded, cold.
t0=$(now)
STRATA_STATE_DIR="$WORK/embedded" timeout 900 "$BIN/strata" build "$CTX" --build-arg "BASE=$BASE" --progress plain >"$WORK/embedded.log" 2>&1
embedded=$(secs "$t0" "$(now)")

# The cluster, cold (its own store and worker state).
PORT=$((20000 + RANDOM % 20000))
"$BIN/strata" coordinator init --out "$WORK/cluster" --listen "127.0.0.1:$PORT" >/dev/null
for c in c1 c2 c3; do
  STRATA_LOG=info "$BIN/strata" coordinator --config "$WORK/cluster/coordinator-$c.toml" 2>"$WORK/$c.log" &
  pids+=($!)
done
for w in w1 w2; do
  STRATA_LOG=info "$BIN/strata" worker --config "$WORK/cluster/worker-$w.toml" 2>"$WORK/$w.log" &
  pids+=($!)
done
export STRATA_COORDINATOR="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
export STRATA_CA="$WORK/cluster/pki/ca.crt" STRATA_TOKEN="$(cat "$WORK/cluster/pki/client-tokens")"
export STRATA_STORE="$WORK/cluster/store"
for _ in $(seq 1 150); do
  "$BIN/strata" status 2>/dev/null | grep -qx "workers: 2" && break
  sleep 0.2
done
t0=$(now)
STRATA_STATE_DIR="$WORK/client" timeout 900 "$BIN/strata" build "$CTX" --build-arg "BASE=$BASE" --progress plain >"$WORK/cluster.log" 2>&1
cluster=$(secs "$t0" "$(now)")
placed=$(grep -c "runs on worker" "$WORK/cluster.log" || true)
w1=$(grep -c "runs on worker w1" "$WORK/cluster.log" || true)
w2=$(grep -c "runs on worker w2" "$WORK/cluster.log" || true)

# Ready to started: from the build's acceptance to the first offers taken (jobs ready at once).
latency=$(python3 - "$WORK" <<'PY'
import re, sys, datetime, glob
work = sys.argv[1]
def stamps(path, needle):
    out = []
    for line in open(path, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if needle in line:
            out.append(datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")))
    return out
accepted = [t for c in ("c1", "c2", "c3") for t in stamps(f"{work}/{c}.log", "build accepted")]
taken = sorted(t for w in ("w1", "w2") for t in stamps(f"{work}/{w}.log", "offer taken"))
if accepted and taken:
    first = (taken[0] - accepted[0]).total_seconds() * 1000
    print(f"{first:.0f} ms to the first job, {(taken[min(len(taken), 8) - 1] - accepted[0]).total_seconds() * 1000:.0f} ms to the eighth (4 slots: the eighth waits for a free one)")
else:
    print("not measured")
PY
)
{
  echo "strata cluster benchmark, $(date -u '+%F %H:%M') UTC"
  echo "machine: $(nproc) cores; 3 coordinators and 2 workers on this machine (so the workers share its cores)"
  echo "shape fanout8: 8 independent CPU-heavy stages joined at the end; all builds cold"
  echo
  echo "embedded (one process)            ${embedded} s"
  echo "cluster (3 coordinators, 2 workers) ${cluster} s  ($placed stages placed: $w1 on w1, $w2 on w2)"
  echo "job ready -> started on a worker  $latency"
  echo
  echo "raft commits and the scheduler simulation: cargo bench --bench cluster"
} | tee "$REPORT"
