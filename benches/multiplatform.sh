#!/usr/bin/env bash
# Multi-platform build benchmark: one `strata build --platform linux/amd64,linux/arm64` run
# against building the two platforms one after the other, each cold (empty state), and the
# share of the run's step time spent in emulated (linux/arm64 under QEMU) steps.
#
# Usage: bash benches/multiplatform.sh [--report FILE]
# The Dockerfile (benches/shapes/multiplatform/Dockerfile) has a cross-compile stage built once
# on the build platform and per-platform CPU-bound stages. Installs what is missing (runc,
# docker-registry, skopeo, qemu-user-static, binfmt-support, python3), builds strata in release
# (STRATA_BENCH_TARGET, default /var/tmp/strata-bench-target), serves busybox from the loopback
# fixture registry. Every build is bounded by BUILD_TIMEOUT (default 900 s).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
REPORT="$REPO/benches/results/multiplatform-$(date +%F).txt"
TARGET_DIR="${STRATA_BENCH_TARGET:-/var/tmp/strata-bench-target}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-900}"
while [ $# -gt 0 ]; do
  case "$1" in
    --report) REPORT="$2"; shift 2 ;;
    *) echo "usage: bash benches/multiplatform.sh [--report FILE]" >&2; exit 2 ;;
  esac
done

need=()
for pair in runc:runc docker-registry:docker-registry skopeo:skopeo qemu-aarch64-static:qemu-user-static \
  update-binfmts:binfmt-support python3:python3; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

echo "== building strata (release)" >&2
(cd "$REPO" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet -p strata -p strata-testkit --bins)
BIN="$TARGET_DIR/release"

WORK="$(mktemp -d /var/tmp/strata-mp.XXXXXX)"
REG_PID=""
cleanup() {
  [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null || true
  exec 3>&- 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkfifo "$WORK/hold"
"$BIN/strata-fixture-registry" <"$WORK/hold" >"$WORK/addr" &
REG_PID=$!
exec 3>"$WORK/hold"
for _ in $(seq 1 240); do [ -s "$WORK/addr" ] && break; sleep 0.5; done
ADDR="$(head -n1 "$WORK/addr")"
[ -n "$ADDR" ] || { echo "the fixture registry did not start" >&2; exit 1; }
BASE="$ADDR/library/busybox:latest"
CTX="$REPO/benches/shapes/multiplatform"

# build NAME PLATFORMS: a cold build in a fresh state dir; prints seconds, keeps the rawjson log.
build() {
  local state="$WORK/state-$1" start end
  rm -rf "$state"
  start=$(date +%s.%N)
  STRATA_STATE_DIR="$state" timeout "$BUILD_TIMEOUT" "$BIN/strata" build "$CTX" \
    --build-arg "BASE=$BASE" --platform "$2" --progress=rawjson 2>"$WORK/$1.jsonl"
  end=$(date +%s.%N)
  python3 -c "print($end - $start)"
}

echo "== two platforms in one run" >&2
both=$(build both linux/amd64,linux/arm64)
echo "== linux/amd64 alone, then linux/arm64 alone" >&2
amd=$(build amd64 linux/amd64)
arm=$(build arm64 linux/arm64)

python3 - "$WORK/both.jsonl" "$both" "$amd" "$arm" <<'PY' | tee "$REPORT"
import json, sys, os, platform, datetime
log, both, amd, arm = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
labels, total, emulated = {}, 0.0, 0.0
for line in open(log):
    e = json.loads(line)
    if e["event"] == "started":
        labels[(e["job"], e["n"])] = e["label"]
    elif e["event"] == "done":
        secs = e["elapsed"]
        total += secs
        if labels.get((e["job"], e["n"]), "").startswith("linux/arm64"):
            emulated += secs
seq = amd + arm
print(f"strata multi-platform benchmark, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC")
print(f"machine: {os.cpu_count()} cores, {platform.machine()}; linux/arm64 runs under QEMU user emulation")
print("all builds cold (empty state, base image pull included); wall seconds")
print()
print(f"linux/amd64 + linux/arm64 in one run   {both:8.2f}")
print(f"linux/amd64 alone                      {amd:8.2f}")
print(f"linux/arm64 alone                      {arm:8.2f}")
print(f"one after the other (sum)              {seq:8.2f}")
print(f"one run / one after the other         {both / seq:8.2f}")
print()
print(f"step time in the two-platform run: {total:.2f} s, of which emulated (linux/arm64): "
      f"{emulated:.2f} s = {100 * emulated / total if total else 0:.0f}%")
PY
