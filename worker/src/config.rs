//! The worker's configuration file (TOML): who the worker is, which coordinators it dials, where
//! it keeps its state and finds the shared blob store, how many jobs it runs at once. Every key
//! is documented here and in `deploy/worker.toml`; unknown keys are refused so that a misspelt
//! key is an error, not a silent default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use strata_shared::config::{self, ConfigError};

/// The default heartbeat interval, in milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// `strata worker --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// This worker's name: the name in its certificate (the CN, role `worker`), unique in the
    /// cluster. The coordinators know the worker by it.
    pub name: String,
    /// Addresses of the cluster's coordinators (any of them: a follower names the leader). The
    /// worker dials them in turn until one registers it. `--coordinator` replaces this list.
    pub coordinators: Vec<SocketAddr>,
    /// The worker's state, kept between runs: the engine's snapshots and blob cache, and the
    /// build contexts it materialised (`contexts/`).
    pub data_dir: PathBuf,
    /// The blob store the whole cluster shares: a local directory (on a shared filesystem when
    /// the cluster spans machines). Layers and build contexts are read and written there.
    pub store: PathBuf,
    /// How many jobs run at once. Default: the number of CPUs.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// How often the worker tells the leader it is alive and which jobs it runs, in
    /// milliseconds. Default 1000; keep it well under the coordinators' `scheduler.lease_ms`.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// On SIGTERM or Ctrl-C, how long running jobs may go on to finish (no new ones are
    /// taken) before they are stopped and handed back, in milliseconds. Default 25000, inside
    /// Kubernetes' default 30 s grace period; 0 stops them at once.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u64,
    /// Free-form labels for placement (`pool = "fast-disks"`). Default: none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub tls: TlsConfig,
}

/// Certificates (see `strata coordinator init`, which issues worker certificates too).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA's certificate (PEM): the coordinators' certificates must chain to it.
    pub ca: PathBuf,
    /// This worker's certificate (PEM, role `worker`, common name = `name`).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

fn default_capacity() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

fn default_heartbeat_ms() -> u64 {
    DEFAULT_HEARTBEAT_MS
}

fn default_drain_ms() -> u64 {
    25_000
}

impl WorkerConfig {
    /// Reads and checks a configuration file; relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<WorkerConfig, ConfigError> {
        config::load(path, Self::parse)
    }

    /// Parses a configuration; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<WorkerConfig, String> {
        let mut c: WorkerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config::resolve(
            base,
            [
                &mut c.data_dir,
                &mut c.store,
                &mut c.tls.ca,
                &mut c.tls.cert,
                &mut c.tls.key,
            ],
        );
        c.check()?;
        Ok(c)
    }

    /// Checks what serde cannot: a usable name, at least one coordinator, sane numbers.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        if self.coordinators.is_empty() {
            return Err("coordinators must list at least one coordinator address".into());
        }
        if self.capacity == 0 {
            return Err("capacity must be at least 1".into());
        }
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/worker.toml");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let c = WorkerConfig::parse(&example(), Path::new("/etc/strata")).unwrap();
        assert_eq!(c.name, "w1");
        assert_eq!(c.coordinators.len(), 3);
        assert_eq!(c.coordinators[0], SocketAddr::from(([127, 0, 0, 1], 7101)));
        assert_eq!(c.data_dir, Path::new("/etc/strata/data/w1"));
        assert!(c.tls.ca.starts_with("/etc/strata"));
        assert!(c.tls.key.starts_with("/etc/strata"));
        assert_eq!(c.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
        assert_eq!(c.capacity, default_capacity());
        assert_eq!(c.labels.get("pool").map(String::as_str), Some("default"));
    }

    #[test]
    fn defaults_and_absolute_paths() {
        let text = r#"
            name = "w9"
            coordinators = ["10.0.0.1:7400"]
            data_dir = "/var/lib/strata/worker"
            store = "/srv/store"
            [tls]
            ca = "/etc/strata/ca.crt"
            cert = "worker-w9.crt"
            key = "worker-w9.key"
        "#;
        let c = WorkerConfig::parse(text, Path::new("/etc/strata")).unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/strata/worker"));
        assert_eq!(c.tls.cert, Path::new("/etc/strata/worker-w9.crt"));
        assert!(c.capacity >= 1);
        assert_eq!(c.heartbeat_ms, 1000);
        assert!(c.labels.is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let bad = example().replace("name = \"w1\"", "name = \"w1\"\nnmae = \"w2\"");
        let err = WorkerConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("unknown field `nmae`"), "{err}");

        let bad = format!("capacity = 0\n{}", example());
        let err = WorkerConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("capacity must be at least 1"), "{err}");

        let bad = format!("heartbeat_ms = 0\n{}", example());
        let err = WorkerConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("heartbeat_ms"), "{err}");

        let bad = example().replace("\"127.0.0.1:7101\",", "\"c1:7101\",");
        let err = WorkerConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(
            err.contains("invalid socket address") && err.contains("c1:7101"),
            "{err}"
        );

        let start = example().find("coordinators = [").unwrap();
        let end = start + example()[start..].find(']').unwrap() + 1;
        let bad = format!(
            "{}coordinators = []{}",
            &example()[..start],
            &example()[end..]
        );
        let err = WorkerConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("coordinators must list"), "{err}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        let err = WorkerConfig::load(&path).unwrap_err();
        assert!(err.to_string().contains("worker.toml"), "{err}");
        std::fs::write(&path, "name = \"w1\"\n").unwrap();
        let err = WorkerConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("worker.toml") && err.contains("missing field"),
            "{err}"
        );
        std::fs::write(&path, example()).unwrap();
        let c = WorkerConfig::load(&path).unwrap();
        assert_eq!(c.store, dir.path().join("store"));
    }
}
