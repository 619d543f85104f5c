//! Test fixtures shared by strata's tests: real things on this machine, never stand-ins.
//!
//! - [`busybox_layout`]: an OCI image layout holding a linux/amd64 + linux/arm64 busybox image
//!   index, built from Debian's `busybox-static` packages and cached under
//!   `/var/tmp/strata-fixtures/busybox-oci`.
//! - [`Registry`]: Debian's `docker-registry` serving plain HTTP on a free loopback port, with
//!   storage in a temporary directory, optionally behind htpasswd basic auth; killed on drop.
//!   [`busybox_registry`] starts one with the busybox image pushed as `library/busybox`.
//! - [`stub`]: a tiny scripted HTTP/1.1 server for the cases a real registry cannot be made to
//!   produce (a corrupt or truncated blob, a bearer-token challenge); tests say when they use it.
//!
//! A missing tool makes a fixture panic with the command that installs it; nothing here turns
//! a test into a silent pass.

mod busybox;
mod registry;
pub mod stub;

pub use busybox::{BUSYBOX_ENV_PATH, busybox_layout, layout_blob_path, read_layout_blob};
pub use registry::{Registry, busybox_registry};

use std::process::{Command, Output};

/// Runs `cmd`, panicking with `install` in the message when the program is not installed.
fn run_tool(cmd: &mut Command, install: &str) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{:?} is not installed (needed by a strata test fixture); install it with: {install}",
            cmd.get_program()
        ),
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    }
}

/// Runs `cmd` and panics with its exit status and output unless it succeeds.
fn run_ok(cmd: &mut Command, install: &str) -> Output {
    let out = run_tool(cmd, install);
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}
