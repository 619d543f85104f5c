#!/usr/bin/env bash
# Runs every check and test of strata on a fresh Debian machine, installing what is missing.
# Usage: bash tests/run.sh            (from the repository root)
# Environment: CARGO_TARGET_DIR (default /var/tmp/strata-target, outside the clone so that
# repeated runs reuse the build), STRATA_SKIP_LINT=1 to skip fmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Debian packages the end-to-end tests use: the OCI runtime, the registry that serves the
# busybox fixture images, the tools that check strata's outputs, QEMU for emulated platforms,
# iptables to cut a coordinator off the network in the partition test.
need_apt=()
for pair in runc:runc skopeo:skopeo umoci:umoci docker-registry:docker-registry \
  qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support htpasswd:apache2-utils \
  xz:xz-utils bzip2:bzip2 zstd:zstd iptables:iptables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  # The arm64 busybox-static package is fetched with `apt-get download` for the fixture index.
  dpkg --add-architecture arm64
  need_apt+=(ca-certificates)
fi
install_apt() {
  [ "${#need_apt[@]}" -eq 0 ] && return 0
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
}
install_apt

# Emulated platforms: QEMU registered in binfmt_misc with the fix-binary flag (binfmt-support
# does it at boot; a container or a fresh sandbox may need the mount and the registration).
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || echo "note: cannot mount binfmt_misc"
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && command -v update-binfmts >/dev/null; then
  update-binfmts --enable qemu-aarch64 || echo "note: cannot register qemu-aarch64"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is required (install Rust with rustup)" >&2
  exit 1
fi

if [ "${STRATA_SKIP_LINT:-0}" != 1 ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

if [ ! -d ../shared/conformance ]; then
  echo "note: ../shared/conformance is missing: BuildKit conformance tests will report SKIPPED"
fi

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
