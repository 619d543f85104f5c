#!/usr/bin/env bash
# End-to-end comparison of `strata build` with Docker's embedded BuildKit and with buildah.
#
# Usage: bash benches/compare.sh [--only SHAPE[,SHAPE]] [--builders strata,buildkit,buildah]
#                                [--report FILE] [--no-build] [--keep]
#
# Shapes (benches/shapes/<name>/Dockerfile, all `FROM ${BASE}`):
#   seq40    40 sequential small RUN steps (per-step overhead)
#   fanout8  8 independent CPU-heavy stages (~3 s of busybox awk each) joined at the end
#   prune10  10 stages of which the target needs 2 (the other 8 are CPU-heavy)
#   context  a context of 20,000 files / 300 MiB (benches/gen-context.py) copied with COPY . /ctx
#
# Each shape is built twice per builder: cold (empty cache, the base image pull included) and
# warm (the same build again, cache kept). The base image is the busybox fixture served on
# 127.0.0.1 by `strata-fixture-registry`; nothing is pulled from the internet.
#
# How each builder is run (RUN steps get no network in all three: strata's default is a network
# namespace with only loopback, so the others get `--network none`):
#   strata    STRATA_STATE_DIR=<fresh dir> strata build CTX -f DF --build-arg BASE=... --progress plain
#             (no --output: the result stays in strata's cache, as the others keep theirs in
#             their image store)
#   buildkit  a private dockerd (Debian's docker.io), DOCKER_BUILDKIT=1 /usr/bin/docker build
#             --network none -t ...; cold = `docker system prune -af` + `docker builder prune -af`
#   buildah   buildah --root <fresh dir> --storage-driver overlay (vfs if overlay fails) build
#             --layers --jobs 8 --runtime runc --isolation oci --network none --tls-verify=false
#
# Installs what is missing (docker.io, buildah, runc, docker-registry, skopeo, python3), builds
# strata in release with its own target dir (STRATA_BENCH_TARGET, default
# /var/tmp/strata-bench-target), writes the report (environment, table, ratios, per-step cost,
# context hashing rate) to stdout and to --report (default benches/results/compare-DATE.txt).
# Every wait is bounded: BUILD_TIMEOUT (default 1800 s) per build; before each build it waits
# up to QUIET_WAIT s (default 300) for the machine to be at most QUIET_PCT % busy (default 15).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
BENCHES="$REPO/benches"
ALL_SHAPES=(seq40 fanout8 prune10 context)
ALL_BUILDERS=(strata buildkit buildah)
SHAPES=("${ALL_SHAPES[@]}")
BUILDERS=("${ALL_BUILDERS[@]}")
REPORT="$BENCHES/results/compare-$(date +%F).txt"
DO_BUILD=1
KEEP=0
BUILD_TIMEOUT="${BUILD_TIMEOUT:-1800}"
TARGET_DIR="${STRATA_BENCH_TARGET:-/var/tmp/strata-bench-target}"
CONTEXT_MIB=300

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --only) IFS=, read -r -a SHAPES <<<"$2"; shift 2 ;;
    --builders) IFS=, read -r -a BUILDERS <<<"$2"; shift 2 ;;
    --report) REPORT="$2"; shift 2 ;;
    --no-build) DO_BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
for s in "${SHAPES[@]}"; do
  [ -f "$BENCHES/shapes/$s/Dockerfile" ] || { echo "unknown shape: $s (${ALL_SHAPES[*]})" >&2; exit 2; }
done
for b in "${BUILDERS[@]}"; do
  case " ${ALL_BUILDERS[*]} " in *" $b "*) ;; *) echo "unknown builder: $b (${ALL_BUILDERS[*]})" >&2; exit 2 ;; esac
done
uses() { case " ${BUILDERS[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
log() { echo "== $*" >&2; }

WORK="$(mktemp -d /var/tmp/strata-bench.XXXXXX)"
RESULTS="$WORK/results.tsv" # shape builder phase seconds status busy%-before
: >"$RESULTS"
FAILURES="$WORK/failures.txt"
: >"$FAILURES"
mkdir -p "$WORK/logs"

# ---------------------------------------------------------------------------------------------
# Cleanup: everything started here is stopped by its pid, with bounded waits.
REG_PID="" REG_FEEDER_PID="" DOCKERD_PID=""
wait_gone() { # pid seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  return 1
}
umount_under() { # dir: unmounts whatever is mounted below it, deepest first
  local m
  awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}
cleanup() {
  set +e
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    log "stopping dockerd ($DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID"
    wait_gone "$DOCKERD_PID" 60 || kill -KILL "$DOCKERD_PID"
  fi
  if [ -n "$REG_FEEDER_PID" ]; then
    # Closing the registry's standard input stops it (and its docker-registry child).
    kill "$REG_FEEDER_PID" 2>/dev/null
    if [ -n "$REG_PID" ] && ! wait_gone "$REG_PID" 20; then
      local child
      for child in $(pgrep -P "$REG_PID"); do kill "$child" 2>/dev/null; done
      kill "$REG_PID" 2>/dev/null
    fi
  fi
  if [ "$KEEP" = 1 ]; then
    log "kept $WORK"
  else
    umount_under "$WORK"
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Tools.
need_apt=()
for pair in runc:runc docker-registry:docker-registry skopeo:skopeo python3:python3 \
  dpkg-deb:dpkg; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
uses buildkit && { [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || need_apt+=(docker.io); }
uses buildah && { command -v buildah >/dev/null 2>&1 || need_apt+=(buildah); }
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64 # the fixture index holds arm64 busybox too (apt-get download)
  need_apt+=(ca-certificates)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 1200 apt-get install -y -qq "${need_apt[@]}"
fi

STRATA="$TARGET_DIR/release/strata"
FIXTURE_REGISTRY="$TARGET_DIR/release/strata-fixture-registry"
if [ "$DO_BUILD" = 1 ]; then
  # The tree may be mid-edit by others: retry a failed build a few times.
  for attempt in 1 2 3 4 5; do
    log "building strata (release, CARGO_TARGET_DIR=$TARGET_DIR), attempt $attempt"
    if (cd "$REPO" && CARGO_TARGET_DIR="$TARGET_DIR" timeout 3600 \
      cargo build --release -p strata -p strata-testkit --bins); then
      break
    fi
    [ "$attempt" = 5 ] && { echo "strata does not build" >&2; exit 1; }
    sleep 60
  done
fi
STRATA_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
STRATA_REV="$STRATA_REV ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files changed in the working tree)"
[ "$DO_BUILD" = 1 ] || STRATA_REV="existing binary in $TARGET_DIR (--no-build), tree at $STRATA_REV"
if [ ! -x "$STRATA" ] || [ ! -x "$FIXTURE_REGISTRY" ]; then
  echo "missing $STRATA or $FIXTURE_REGISTRY" >&2
  exit 1
fi
# Run a copy, so that a rebuild by someone else cannot change the binary mid-run.
cp "$STRATA" "$WORK/strata"
STRATA="$WORK/strata"

# ---------------------------------------------------------------------------------------------
# The fixture registry: serves until its standard input (a fifo fed by a sleeping process
# that only we hold) closes.
log "starting the fixture registry"
mkfifo "$WORK/registry.in"
"$FIXTURE_REGISTRY" <"$WORK/registry.in" >"$WORK/registry.addr" 2>"$WORK/logs/registry.log" &
REG_PID=$!
sleep 86400 >"$WORK/registry.in" &
REG_FEEDER_PID=$!
for _ in $(seq 300); do
  [ -s "$WORK/registry.addr" ] && break
  kill -0 "$REG_PID" 2>/dev/null || break
  sleep 1
done
ADDR="$(head -n1 "$WORK/registry.addr" 2>/dev/null || true)"
case "$ADDR" in
  127.0.0.1:*) ;;
  *) echo "the fixture registry did not start:" >&2; cat "$WORK/logs/registry.log" >&2; exit 1 ;;
esac
BASE="$ADDR/library/busybox:latest"
log "base image $BASE"

# ---------------------------------------------------------------------------------------------
# dockerd (private sockets and directories, so that it cannot meet any other docker).
DOCKER=(/usr/bin/docker --host "unix://$WORK/docker.sock")
start_dockerd() { # extra dockerd flags...
  mkdir -p "$WORK/docker-data" "$WORK/docker-exec"
  /usr/sbin/dockerd --data-root "$WORK/docker-data" --exec-root "$WORK/docker-exec" \
    --pidfile "$WORK/dockerd.pid" --host "unix://$WORK/docker.sock" "$@" \
    >"$WORK/logs/dockerd.log" 2>&1 </dev/null &
  DOCKERD_PID=$!
  for _ in $(seq 60); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || return 1
    timeout 10 "${DOCKER[@]}" info >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}
if uses buildkit; then
  log "starting dockerd"
  if ! start_dockerd; then
    echo "dockerd did not start with default flags:" >&2
    tail -n 20 "$WORK/logs/dockerd.log" >&2
    kill "$DOCKERD_PID" 2>/dev/null && { wait_gone "$DOCKERD_PID" 30 || kill -KILL "$DOCKERD_PID"; }
    log "retrying dockerd with --iptables=false --bridge=none"
    start_dockerd --iptables=false --bridge=none || {
      echo "dockerd cannot start here:" >&2
      tail -n 40 "$WORK/logs/dockerd.log" >&2
      exit 1
    }
  fi
fi

# buildah: overlay storage when this machine allows it, vfs otherwise.
BUILDAH_DRIVER=overlay
if uses buildah; then
  probe="$WORK/buildah-probe"
  if ! timeout 120 buildah --root "$probe/root" --runroot "$probe/run" --storage-driver overlay \
    from scratch >/dev/null 2>"$WORK/logs/buildah-probe.log"; then
    BUILDAH_DRIVER=vfs
    log "buildah: overlay storage fails here, using vfs ($(tail -n1 "$WORK/logs/buildah-probe.log"))"
  fi
  timeout 60 buildah --root "$probe/root" --runroot "$probe/run" --storage-driver overlay \
    rm -a >/dev/null 2>&1 || true
  umount_under "$probe"
  rm -rf "$probe"
fi

# ---------------------------------------------------------------------------------------------
# The shapes' contexts. The 300 MiB context is generated once per run.
shape_context() { # shape -> context directory
  if [ "$1" = context ]; then echo "$WORK/ctx"; else echo "$BENCHES/shapes/$1"; fi
}
if printf '%s\n' "${SHAPES[@]}" | grep -qx context; then
  log "generating the context (20,000 files, $CONTEXT_MIB MiB)"
  python3 "$BENCHES/gen-context.py" "$WORK/ctx" >&2
fi
# A word the cold build's log must show, proof that the step really ran.
expect_in_log() {
  case "$1" in
    prune10) echo needed ;;
    context) echo 20000 ;;
    *) echo "" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# One build per builder. Each takes: shape context dockerfile; stdout+stderr go to the log.
build_strata() {
  # The engine's debug lines time each phase (the context hashing rate is read from them).
  STRATA_LOG=strata_worker::engine=debug STRATA_STATE_DIR="$WORK/strata-state" \
    timeout "$BUILD_TIMEOUT" "$STRATA" build "$2" -f "$3" --build-arg "BASE=$BASE" --progress plain
}
build_buildkit() {
  DOCKER_BUILDKIT=1 timeout "$BUILD_TIMEOUT" "${DOCKER[@]}" build --progress plain --network none \
    -t "strata-bench-$1" -f "$3" --build-arg "BASE=$BASE" "$2"
}
BUILDAH=(buildah --root "$WORK/buildah/root" --runroot "$WORK/buildah/run")
build_buildah() {
  timeout "$BUILD_TIMEOUT" "${BUILDAH[@]}" --storage-driver "$BUILDAH_DRIVER" build --layers \
    --jobs 8 --runtime runc --isolation oci --network none --tls-verify=false \
    -t "strata-bench-$1" -f "$3" --build-arg "BASE=$BASE" "$2"
}
# Empties a builder's cache (and image store), so that the next build is cold.
reset_strata() {
  umount_under "$WORK/strata-state"
  rm -rf "$WORK/strata-state"
}
reset_buildkit() {
  timeout 300 "${DOCKER[@]}" system prune -af >/dev/null
  timeout 300 "${DOCKER[@]}" builder prune -af >/dev/null
}
reset_buildah() {
  if [ -d "$WORK/buildah/root" ]; then
    timeout 300 "${BUILDAH[@]}" --storage-driver "$BUILDAH_DRIVER" rm -a >/dev/null 2>&1 || true
    timeout 300 "${BUILDAH[@]}" --storage-driver "$BUILDAH_DRIVER" rmi -af >/dev/null 2>&1 || true
  fi
  umount_under "$WORK/buildah"
  rm -rf "$WORK/buildah"
}

now() { date +%s.%N; }
# The machine may be shared: before each build, wait (at most QUIET_WAIT s) until the CPUs
# are nearly idle (at most QUIET_PCT % busy over 2 s). A build that starts on a busy machine
# anyway is marked with * in the table.
QUIET_PCT="${QUIET_PCT:-15}"
QUIET_WAIT="${QUIET_WAIT:-300}"
cpu_busy_pct() { # CPU busy % of the whole machine over the next 2 s
  local a b
  a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  sleep 2
  b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    busy = y[1] - x[1]; all = busy + y[2] - x[2]; printf "%d", (all > 0 ? 100 * busy / all : 0) }'
}
wait_quiet() { # prints the last busy %
  local deadline=$((SECONDS + QUIET_WAIT)) pct
  while :; do
    pct=$(cpu_busy_pct)
    [ "$pct" -le "$QUIET_PCT" ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "the machine is still ${pct}% busy after ${QUIET_WAIT}s; measuring anyway"
      break
    fi
  done
  echo "$pct"
}
run_one() { # shape builder phase
  local shape=$1 builder=$2 phase=$3 ctx df logf busy start end secs status=ok want
  ctx="$(shape_context "$shape")"
  df="$BENCHES/shapes/$shape/Dockerfile"
  logf="$WORK/logs/$shape-$builder-$phase.log"
  busy=$(wait_quiet)
  start=$(now)
  if "build_$builder" "$shape" "$ctx" "$df" >"$logf" 2>&1; then
    want="$(expect_in_log "$shape")"
    if [ "$phase" = cold ] && [ -n "$want" ] && ! grep -qw "$want" "$logf"; then
      status=unchecked
    fi
  else
    status="failed($?)"
  fi
  end=$(now)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$shape" "$builder" "$phase" "$secs" "$status" "$busy" >>"$RESULTS"
  log "$shape $builder $phase: ${secs}s $status (machine ${busy}% busy before)"
  if [ "$status" != ok ]; then
    {
      echo "--- $shape / $builder / $phase: $status; last lines of the log:"
      tail -n 30 "$logf"
    } >>"$FAILURES"
  fi
}

for shape in "${SHAPES[@]}"; do
  for builder in "${BUILDERS[@]}"; do
    "reset_$builder"
    run_one "$shape" "$builder" cold
    run_one "$shape" "$builder" warm
  done
done
for builder in "${BUILDERS[@]}"; do "reset_$builder"; done

# ---------------------------------------------------------------------------------------------
# Report.
report() {
  echo "strata end-to-end comparison, $(date -u '+%F %H:%M UTC')"
  echo "machine: $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))," \
    "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
  echo "strata: $STRATA_REV, release build"
  uses buildkit && echo "buildkit: Docker $("${DOCKER[@]}" version --format '{{.Server.Version}}' 2>/dev/null) (embedded BuildKit), storage $("${DOCKER[@]}" info --format '{{.Driver}}' 2>/dev/null)"
  uses buildah && echo "buildah: $(buildah --version | awk '{ print $3 }'), storage $BUILDAH_DRIVER, --jobs 8"
  echo "runc: $(runc --version | head -n1 | awk '{ print $3 }'); RUN steps without network in all builders"
  echo "cold = empty cache, base image pull included; warm = the same build again; wall seconds;"
  echo "each build starts once the machine is at most ${QUIET_PCT}% busy (* = it was not after ${QUIET_WAIT}s)"
  echo
  awk -F'\t' -v quiet="$QUIET_PCT" '
    { t[$1 SUBSEP $2 SUBSEP $3] = ($5 == "ok" ? $4 : $4 " " $5) ($6 > quiet ? "*" : ""); order[++n] = $1 SUBSEP $2 }
    END {
      printf "%-9s %-9s %9s %9s\n", "shape", "builder", "cold s", "warm s"
      for (i = 1; i <= n; i++) {
        k = order[i]; if (k in done) continue; done[k]
        split(k, p, SUBSEP)
        printf "%-9s %-9s %9s %9s\n", p[1], p[2], t[p[1] SUBSEP p[2] SUBSEP "cold"], t[p[1] SUBSEP p[2] SUBSEP "warm"]
      }
    }' "$RESULTS"
  echo
  echo "ratios strata / other (below 1: strata is faster)"
  awk -F'\t' '
    $5 == "ok" { t[$1 SUBSEP $2 SUBSEP $3] = $4; if (!($1 in s)) { s[$1]; sh[++n] = $1 } }
    function r(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.2f", a / b) }
    END {
      printf "%-9s %14s %14s %14s %14s\n", "shape", "/buildkit cold", "/buildkit warm", "/buildah cold", "/buildah warm"
      for (i = 1; i <= n; i++) {
        x = sh[i]
        printf "%-9s %14s %14s %14s %14s\n", x,
          r(t[x SUBSEP "strata" SUBSEP "cold"], t[x SUBSEP "buildkit" SUBSEP "cold"]),
          r(t[x SUBSEP "strata" SUBSEP "warm"], t[x SUBSEP "buildkit" SUBSEP "warm"]),
          r(t[x SUBSEP "strata" SUBSEP "cold"], t[x SUBSEP "buildah" SUBSEP "cold"]),
          r(t[x SUBSEP "strata" SUBSEP "warm"], t[x SUBSEP "buildah" SUBSEP "warm"])
      }
    }' "$RESULTS"
  if grep -q '^seq40	' "$RESULTS"; then
    echo
    echo "per-step cost, shape seq40 (build time / 40 RUN steps)"
    awk -F'\t' '$1 == "seq40" && $5 == "ok" { t[$2 SUBSEP $3] = $4; if (!($2 in s)) { s[$2]; b[++n] = $2 } }
      END {
        printf "%-9s %12s %12s\n", "builder", "cold ms/step", "warm ms/step"
        for (i = 1; i <= n; i++)
          printf "%-9s %12.1f %12.1f\n", b[i], 1000 * t[b[i] SUBSEP "cold"] / 40, 1000 * t[b[i] SUBSEP "warm"] / 40
      }' "$RESULTS"
  fi
  # Context hashing: the cold build hashes every file (its hash cache is empty); the warm one
  # finds every file in the cache (keyed by inode, size and times) and reads none.
  local cold_log="$WORK/logs/context-strata-cold.log"
  if [ -f "$cold_log" ]; then
    local ms
    ms=$(sed 's/\x1b\[[0-9;]*m//g' "$cold_log" | grep -o 'COPY: sources hashed elapsed=[0-9.]*[mµn]*s' | head -n1 |
      sed 's/.*elapsed=//' | awk '/ms$/ { sub(/ms$/, ""); print; next } /µs$/ { sub(/µs$/, ""); print $1 / 1000; next } /s$/ { sub(/s$/, ""); print $1 * 1000 }')
    if [ -n "$ms" ]; then
      echo
      awk -v mib="$CONTEXT_MIB" -v ms="$ms" 'BEGIN { printf "context hashing (strata, cold context build, every file read and hashed with blake3): %d MiB in %.0f ms = %.0f MiB/s\n", mib, ms, mib / (ms / 1000) }'
    fi
  fi
  if awk -F'\t' '$1 == "context" && $2 == "strata" && $3 == "warm" && $5 == "ok" { f = 1 } END { exit !f }' "$RESULTS"; then
    awk -F'\t' '$1 == "context" && $2 == "strata" && $3 == "warm" {
      printf "warm context build (strata): %.2f s, the files recognised by their metadata, none read again\n", $4 }' "$RESULTS"
  fi
  if [ -s "$FAILURES" ]; then
    echo
    echo "failures"
    cat "$FAILURES"
  fi
}
mkdir -p "$(dirname "$REPORT")"
report | tee "$REPORT"
log "report written to $REPORT"
