//! Serves the busybox fixture images (linux/amd64 + linux/arm64, from Debian's busybox-static
//! packages) from Debian's `docker-registry` on a free loopback port, for scripts and
//! benchmarks. Prints `ADDR` (`127.0.0.1:PORT`) on the first line of standard output, then
//! serves until standard input closes or the process is killed.

use std::io::Read;

fn main() {
    let registry = strata_testkit::busybox_registry();
    println!("{}", registry.addr());
    // Let the caller read the address before anything else happens.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(registry);
}
