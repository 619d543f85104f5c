//! The coordinator's configuration file (TOML). Every key is documented here and in
//! `deploy/coordinator.toml`; unknown keys are refused so that a misspelt key is an error, not
//! a silent default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use strata_shared::config::{self, ConfigError};

/// `strata coordinator --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// This node's Raft id: unique in the cluster, never reused, not 0.
    pub node_id: u64,
    /// This node's name: the name in its certificate (the CN), which peers, workers and clients
    /// dial.
    pub name: String,
    /// The UDP address the QUIC endpoint listens on, for clients, workers and peers alike.
    pub listen: SocketAddr,
    /// Where the Raft log, hard state and snapshots are kept.
    pub data_dir: PathBuf,
    /// The blob store every node of the cluster shares: a local directory (on a shared
    /// filesystem for several machines).
    pub store: PathBuf,
    pub tls: TlsConfig,
    /// The cluster's coordinators when it is first started (this node among them). Later
    /// membership changes go through Raft; this list only bootstraps an empty data directory
    /// and tells where the initial coordinators are.
    pub peers: Vec<Peer>,
    /// Join a running cluster instead of starting a new one: the node starts with an empty
    /// group and waits for `strata coordinator add`. `peers` then lists the running cluster's
    /// coordinators (at least one) and this node. Ignored once the data directory holds state.
    #[serde(default)]
    pub join: bool,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
}

/// Certificates (see `strata coordinator init`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA's certificate (PEM): every node and worker certificate must chain to it.
    pub ca: PathBuf,
    /// This node's certificate (PEM, role `coordinator`).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// A file of client tokens, one per line: clients without a certificate present one.
    #[serde(default)]
    pub client_tokens: Option<PathBuf>,
}

/// A coordinator of the initial cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u64,
    /// The name in its certificate.
    pub name: String,
    pub addr: SocketAddr,
}

/// Raft timing. A tick is `tick_ms`; elections start after `election_ticks` without a leader.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log once this many entries were applied since the last.
    pub snapshot_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_entries: 1000,
        }
    }
}

/// Job leases and placement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// A worker that has not been heard from for this long loses its leases.
    pub lease_ms: u64,
    /// Workers are expected to heartbeat this often.
    pub heartbeat_ms: u64,
    /// Whether builds may run stages under emulation unless they say otherwise.
    pub emulation: String,
    /// How long a finished build (its request, jobs, results and progress) is kept before it
    /// is forgotten; the layers it built stay in the cache.
    pub retain_finished_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease_ms: 10_000,
            heartbeat_ms: 1_000,
            emulation: "allow".into(),
            retain_finished_ms: 3_600_000,
        }
    }
}

impl CoordinatorConfig {
    /// Reads and checks a configuration file; relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        config::load(path, Self::parse)
    }

    /// Parses a configuration; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<CoordinatorConfig, String> {
        let mut c: CoordinatorConfig = toml::from_str(text).map_err(|e| e.to_string())?;
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
        config::resolve(base, c.tls.client_tokens.as_mut());
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must not be 0".into());
        }
        if !self.peers.iter().any(|p| p.id == self.node_id) {
            return Err(format!(
                "peers must list this node (node_id {})",
                self.node_id
            ));
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() || ids.contains(&0) {
            return Err("peer ids must be distinct and not 0".into());
        }
        let names: std::collections::BTreeSet<&str> =
            self.peers.iter().map(|p| p.name.as_str()).collect();
        if names.len() != self.peers.len() {
            return Err("peer names must be distinct".into());
        }
        if self.join {
            if self.peers.len() < 2 {
                return Err(
                    "join = true needs peers listing this node and a coordinator of the running cluster"
                        .into(),
                );
            }
        } else if ![1, 3, 5].contains(&self.peers.len()) {
            return Err(format!(
                "a cluster has 1, 3 or 5 coordinators, not {}",
                self.peers.len()
            ));
        }
        if !matches!(self.scheduler.emulation.as_str(), "allow" | "deny") {
            return Err(format!(
                "scheduler.emulation is {:?}: expected allow or deny",
                self.scheduler.emulation
            ));
        }
        if self.raft.heartbeat_ticks == 0 || self.raft.election_ticks <= self.raft.heartbeat_ticks {
            return Err(
                "raft.election_ticks must be greater than raft.heartbeat_ticks (> 0)".into(),
            );
        }
        if self.scheduler.lease_ms <= 2 * self.scheduler.heartbeat_ms {
            return Err("scheduler.lease_ms must be more than twice scheduler.heartbeat_ms".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let c = CoordinatorConfig::parse(&example(), Path::new("/etc/strata")).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.peers.len(), 3);
        assert!(c.tls.ca.starts_with("/etc/strata"));
        assert_eq!(c.raft, RaftConfig::default());
    }

    #[test]
    fn mistakes_are_named() {
        let bad = example().replace("node_id = 1", "node_id = 7");
        let err = CoordinatorConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("peers must list this node"), "{err}");
        let bad = example().replace("node_id = 1", "node_id = 1\nnode_idd = 2");
        let err = CoordinatorConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("unknown field `node_idd`"), "{err}");
        let bad = format!("{}\n[scheduler]\nemulation = \"sometimes\"\n", example());
        let err = CoordinatorConfig::parse(&bad, Path::new("/")).unwrap_err();
        assert!(err.contains("expected allow or deny"), "{err}");
    }

    #[test]
    fn a_joining_node_lists_itself_and_the_running_cluster() {
        let four = example()
            .replace("node_id = 1", "node_id = 4\njoin = true")
            .replacen("name = \"c1\"", "name = \"c4\"", 1)
            + "\n[[peers]]\nid = 4\nname = \"c4\"\naddr = \"127.0.0.1:7104\"\n";
        let c = CoordinatorConfig::parse(&four, Path::new("/")).unwrap();
        assert!(c.join);
        assert_eq!(c.peers.len(), 4);
        let err =
            CoordinatorConfig::parse(&four.replace("join = true", ""), Path::new("/")).unwrap_err();
        assert!(err.contains("1, 3 or 5"), "{err}");
        let alone = example().replace("node_id = 1", "node_id = 1\njoin = true");
        let alone = alone
            .split("[[peers]]")
            .take(2)
            .collect::<Vec<_>>()
            .join("[[peers]]");
        let err = CoordinatorConfig::parse(&alone, Path::new("/")).unwrap_err();
        assert!(err.contains("join = true needs peers"), "{err}");
    }
}
