//! `strata coordinator init`: a development cluster's certificates and configuration files in
//! one directory: the cluster CA, one identity per coordinator, worker and client, a client
//! token, and `coordinator-<name>.toml` for each coordinator, all pointing at one shared store.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use strata_shared::tls::{ClusterCa, Role, TlsError, generate_token, write_dev_pki};

use crate::config::{CoordinatorConfig, Peer};

/// What to generate.
#[derive(Debug, Clone)]
pub struct InitPlan {
    /// The addresses of coordinators `c1..cN` (1, 3 or 5, distinct); see [`consecutive`].
    pub coordinators: Vec<SocketAddr>,
    /// Workers `w1..wM`.
    pub workers: usize,
    /// Clients with a certificate (`client1..`); a token is written as well.
    pub clients: usize,
}

/// The files written.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub coordinator_configs: Vec<PathBuf>,
    /// `worker-<name>.toml` for each worker.
    pub worker_configs: Vec<PathBuf>,
    pub addresses: Vec<SocketAddr>,
    pub token_file: PathBuf,
    pub store: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), InitError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| InitError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

/// Writes `coordinator-<name>.toml` for `me`, naming `peers`.
fn write_coordinator_config(
    out: &Path,
    me: &Peer,
    peers: &[Peer],
    join: bool,
) -> Result<PathBuf, InitError> {
    let name = &me.name;
    let mut text = format!(
        "# Written by `strata coordinator init`; see deploy/coordinator.toml for every key.\n\
         node_id = {id}\nname = \"{name}\"\nlisten = \"{addr}\"\ndata_dir = \"data/{name}\"\n\
         store = \"store\"\n",
        id = me.id,
        addr = me.addr,
    );
    if join {
        text.push_str("# Joins the running cluster: `strata coordinator add` makes it a member.\njoin = true\n");
    }
    let _ = write!(
        text,
        "\n[tls]\nca = \"pki/ca.crt\"\ncert = \"pki/coordinator-{name}.crt\"\n\
         key = \"pki/coordinator-{name}.key\"\nclient_tokens = \"pki/client-tokens\"\n"
    );
    for p in peers {
        let _ = write!(
            text,
            "\n[[peers]]\nid = {}\nname = \"{}\"\naddr = \"{}\"\n",
            p.id, p.name, p.addr
        );
    }
    let path = out.join(format!("coordinator-{name}.toml"));
    write(&path, &text, false)?;
    Ok(path)
}

/// What [`init_join`] wrote.
#[derive(Debug, Clone)]
pub struct JoinReport {
    pub id: u64,
    pub name: String,
    pub addr: SocketAddr,
    pub config: PathBuf,
}

/// Prepares one more coordinator for a development cluster written by [`init`] into `out`:
/// the next free id and name `c<id>`, a certificate from the cluster CA kept in `out/pki`,
/// and `coordinator-c<id>.toml` with `join = true` listing the coordinators already
/// configured there. `strata coordinator add` then makes it a member.
pub fn init_join(out: &Path, listen: SocketAddr) -> Result<JoinReport, InitError> {
    let mut known: Vec<Peer> = Vec::new();
    let entries = std::fs::read_dir(out).map_err(|source| InitError::Io {
        path: out.display().to_string(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(file.starts_with("coordinator-") && file.ends_with(".toml")) {
            continue;
        }
        let config =
            CoordinatorConfig::load(&path).map_err(|e| InitError::Invalid(e.to_string()))?;
        for p in config.peers {
            if !known.iter().any(|k| k.id == p.id) {
                known.push(p);
            }
        }
    }
    if known.is_empty() {
        return Err(InitError::Invalid(format!(
            "{} holds no coordinator-*.toml: run `strata coordinator init --out {}` first",
            out.display(),
            out.display()
        )));
    }
    if let Some(p) = known.iter().find(|p| p.addr == listen) {
        return Err(InitError::Invalid(format!(
            "{listen} is already the address of coordinator {} ({})",
            p.id, p.name
        )));
    }
    known.sort_by_key(|p| p.id);
    let id = known.iter().map(|p| p.id).max().unwrap_or(0) + 1;
    let me = Peer {
        id,
        name: format!("c{id}"),
        addr: listen,
    };
    let pki = out.join("pki");
    let read = |name: &str| {
        let path = pki.join(name);
        std::fs::read_to_string(&path).map_err(|source| InitError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let ca = ClusterCa::from_pem(&read("ca.crt")?, &read("ca.key")?)?;
    ca.issue(Role::Coordinator, &me.name, &[listen.ip().to_string()])?
        .save(&pki)?;
    known.push(me.clone());
    let config = write_coordinator_config(out, &me, &known, true)?;
    Ok(JoinReport {
        id,
        name: me.name,
        addr: listen,
        config,
    })
}

/// `count` addresses on `first`'s host, on consecutive ports from `first`'s.
pub fn consecutive(count: usize, first: SocketAddr) -> Result<Vec<SocketAddr>, InitError> {
    (0..count)
        .map(|i| {
            let port = u16::try_from(i)
                .ok()
                .and_then(|i| first.port().checked_add(i))
                .ok_or_else(|| InitError::Invalid(format!("ports from {first} run past 65535")))?;
            Ok(SocketAddr::new(first.ip(), port))
        })
        .collect()
}

/// Writes everything into `out` (created if needed).
pub fn init(out: &Path, plan: &InitPlan) -> Result<InitReport, InitError> {
    let addresses = plan.coordinators.clone();
    if ![1, 3, 5].contains(&addresses.len()) {
        return Err(InitError::Invalid(format!(
            "a cluster has 1, 3 or 5 coordinators, not {}",
            addresses.len()
        )));
    }
    let distinct: std::collections::BTreeSet<&SocketAddr> = addresses.iter().collect();
    if distinct.len() != addresses.len() {
        return Err(InitError::Invalid(format!(
            "coordinator addresses must be distinct: {addresses:?}"
        )));
    }
    let coordinators: Vec<(String, String)> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("c{}", i + 1), a.to_string()))
        .collect();
    let workers: Vec<String> = (1..=plan.workers).map(|i| format!("w{i}")).collect();
    let clients: Vec<String> = (1..=plan.clients).map(|i| format!("client{i}")).collect();
    let pki_dir = out.join("pki");
    write_dev_pki(&pki_dir, &coordinators, &workers, &clients)?;
    let token_file = pki_dir.join("client-tokens");
    write(&token_file, &format!("{}\n", generate_token()?), true)?;
    let store = out.join("store");
    std::fs::create_dir_all(&store).map_err(|source| InitError::Io {
        path: store.display().to_string(),
        source,
    })?;

    let peers: Vec<Peer> = coordinators
        .iter()
        .zip(&addresses)
        .enumerate()
        .map(|(i, ((name, _), addr))| Peer {
            id: i as u64 + 1,
            name: name.clone(),
            addr: *addr,
        })
        .collect();
    let mut configs = Vec::new();
    for me in &peers {
        configs.push(write_coordinator_config(out, me, &peers, false)?);
    }
    let coordinator_list = addresses
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut worker_configs = Vec::new();
    for name in &workers {
        let text = format!(
            "# Written by `strata coordinator init`; see deploy/worker.toml for every key.\n\
             name = \"{name}\"\ncoordinators = [{coordinator_list}]\ndata_dir = \"data/{name}\"\n\
             store = \"store\"\n\n[tls]\nca = \"pki/ca.crt\"\ncert = \"pki/worker-{name}.crt\"\n\
             key = \"pki/worker-{name}.key\"\n"
        );
        let path = out.join(format!("worker-{name}.toml"));
        write(&path, &text, false)?;
        worker_configs.push(path);
    }
    Ok(InitReport {
        coordinator_configs: configs,
        worker_configs,
        addresses,
        token_file,
        store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CoordinatorConfig;

    #[test]
    fn written_configs_load_and_name_their_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let plan = InitPlan {
            coordinators: consecutive(3, "127.0.0.1:7400".parse().unwrap()).unwrap(),
            workers: 2,
            clients: 1,
        };
        let report = init(dir.path(), &plan).unwrap();
        assert_eq!(report.coordinator_configs.len(), 3);
        let c2 = CoordinatorConfig::load(&report.coordinator_configs[1]).unwrap();
        assert_eq!((c2.node_id, c2.name.as_str()), (2, "c2"));
        assert_eq!(c2.listen.to_string(), "127.0.0.1:7401");
        assert!(c2.tls.cert.exists() && c2.tls.key.exists() && c2.tls.ca.exists());
        assert!(dir.path().join("pki/worker-w2.crt").exists());
        assert_eq!(report.worker_configs.len(), 2);
        let w2 = std::fs::read_to_string(&report.worker_configs[1]).unwrap();
        assert!(
            w2.contains("127.0.0.1:7402") && w2.contains("worker-w2.key"),
            "{w2}"
        );
        assert!(dir.path().join("pki/client-client1.key").exists());
        let token = std::fs::read_to_string(&report.token_file).unwrap();
        assert_eq!(token.trim().len(), 64);
        let two = InitPlan {
            coordinators: plan.coordinators[..2].to_vec(),
            ..plan.clone()
        };
        let err = init(dir.path(), &two).unwrap_err();
        assert!(err.to_string().contains("1, 3 or 5"), "{err}");
        let same = InitPlan {
            coordinators: vec![plan.coordinators[0]; 3],
            ..plan.clone()
        };
        let err = init(dir.path(), &same).unwrap_err();
        assert!(err.to_string().contains("distinct"), "{err}");
        let err = consecutive(3, "127.0.0.1:65534".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("past 65535"), "{err}");

        // One host per coordinator: each certificate names its own address.
        let hosts = tempfile::tempdir().unwrap();
        let spread = InitPlan {
            coordinators: ["10.0.0.1:7101", "10.0.0.2:7101", "10.0.0.3:7101"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            ..plan
        };
        let report = init(hosts.path(), &spread).unwrap();
        let c3 = CoordinatorConfig::load(&report.coordinator_configs[2]).unwrap();
        assert_eq!(c3.listen.to_string(), "10.0.0.3:7101");
        assert_eq!(c3.peers[1].addr.to_string(), "10.0.0.2:7101");
    }

    #[test]
    fn a_joining_coordinator_gets_the_next_id_a_certificate_and_the_peers() {
        let dir = tempfile::tempdir().unwrap();
        let plan = InitPlan {
            coordinators: consecutive(3, "127.0.0.1:7400".parse().unwrap()).unwrap(),
            workers: 1,
            clients: 0,
        };
        init(dir.path(), &plan).unwrap();
        let report = init_join(dir.path(), "127.0.0.1:7404".parse().unwrap()).unwrap();
        assert_eq!((report.id, report.name.as_str()), (4, "c4"));
        let c4 = CoordinatorConfig::load(&report.config).unwrap();
        assert!(c4.join);
        assert_eq!(
            c4.peers.iter().map(|p| p.id).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let identity = strata_shared::tls::Identity::load(&c4.tls.cert, &c4.tls.key).unwrap();
        assert_eq!(identity.peer().unwrap().name, "c4");
        // The next one counts c4 too; an address in use is refused.
        let c5 = init_join(dir.path(), "127.0.0.1:7405".parse().unwrap()).unwrap();
        assert_eq!(c5.id, 5);
        let err = init_join(dir.path(), "127.0.0.1:7401".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("already the address of coordinator 2"),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        let err = init_join(empty.path(), "127.0.0.1:7401".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("no coordinator-*.toml"), "{err}");
    }
}
