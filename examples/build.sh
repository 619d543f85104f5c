#!/usr/bin/env bash
# Builds examples/hello with strata on a fresh Debian machine, offline, and runs the image:
#   1. installs runc, docker-registry and skopeo/umoci if missing;
#   2. serves busybox images (made from Debian's busybox-static packages) from a loopback
#      registry, since nothing is pulled from the internet;
#   3. `strata build` writes an OCI archive, which skopeo inspects and runc runs.
# Usage: bash examples/build.sh [EXTRA strata build FLAGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in runc:runc skopeo:skopeo umoci:umoci docker-registry:docker-registry; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
echo "== building strata"
cargo build --release --quiet -p strata -p strata-testkit --bins
bin="$CARGO_TARGET_DIR/release"

work=$(mktemp -d /tmp/strata-example.XXXXXX)
registry_pid=""
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== serving busybox on a loopback registry"
mkfifo "$work/hold"
"$bin/strata-fixture-registry" <"$work/hold" >"$work/addr" &
registry_pid=$!
exec 3>"$work/hold"
for _ in $(seq 1 120); do
  [ -s "$work/addr" ] && break
  kill -0 "$registry_pid" 2>/dev/null || { echo "the fixture registry failed" >&2; exit 1; }
  sleep 0.5
done
addr=$(head -n1 "$work/addr")
[ -n "$addr" ] || { echo "the fixture registry did not start in 60 s" >&2; exit 1; }
echo "busybox is at $addr/library/busybox:latest"

echo "== strata build"
"$bin/strata" build examples/hello \
  --build-arg "BUSYBOX=$addr/library/busybox:latest" \
  -t hello:dev --output "type=oci,dest=hello.oci.tar" "$@"

echo "== skopeo inspect oci-archive:hello.oci.tar"
skopeo inspect oci-archive:hello.oci.tar | grep -E '"(Digest|Architecture|Created)"'

echo "== running the image with runc"
mkdir -p "$work/layout"
tar -xf hello.oci.tar -C "$work/layout"
umoci unpack --image "$work/layout:dev" "$work/bundle" >/dev/null
sed -i 's/"terminal": *true/"terminal":false/' "$work/bundle/config.json"
runc run --bundle "$work/bundle" "strata-example-$$" </dev/null
