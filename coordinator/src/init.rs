//! `strata coordinator init`: a development cluster's certificates and configuration files in
//! one directory: the cluster CA, one identity per coordinator, worker and client, a client
//! token, and `coordinator-<name>.toml` for each coordinator, all pointing at one shared store.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use strata_shared::tls::{TlsError, generate_token, write_dev_pki};

/// What to generate.
#[derive(Debug, Clone)]
pub struct InitPlan {
    /// Coordinators `c1..cN` (1, 3 or 5) listening on consecutive ports from `first_addr`.
    pub coordinators: usize,
    pub first_addr: SocketAddr,
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

/// Writes everything into `out` (created if needed).
pub fn init(out: &Path, plan: &InitPlan) -> Result<InitReport, InitError> {
    if ![1, 3, 5].contains(&plan.coordinators) {
        return Err(InitError::Invalid(format!(
            "a cluster has 1, 3 or 5 coordinators, not {}",
            plan.coordinators
        )));
    }
    let addresses: Vec<SocketAddr> = (0..plan.coordinators)
        .map(|i| {
            let port = plan
                .first_addr
                .port()
                .checked_add(i as u16)
                .ok_or_else(|| {
                    InitError::Invalid(format!("ports from {} run past 65535", plan.first_addr))
                })?;
            Ok(SocketAddr::new(plan.first_addr.ip(), port))
        })
        .collect::<Result<_, InitError>>()?;
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

    let mut peers = String::new();
    for (i, (name, addr)) in coordinators.iter().enumerate() {
        let _ = write!(
            peers,
            "\n[[peers]]\nid = {}\nname = \"{name}\"\naddr = \"{addr}\"\n",
            i + 1
        );
    }
    let mut configs = Vec::new();
    for (i, (name, addr)) in coordinators.iter().enumerate() {
        let text = format!(
            "# Written by `strata coordinator init`; see deploy/coordinator.toml for every key.\n\
             node_id = {id}\nname = \"{name}\"\nlisten = \"{addr}\"\ndata_dir = \"data/{name}\"\n\
             store = \"store\"\n\n[tls]\nca = \"pki/ca.crt\"\ncert = \"pki/coordinator-{name}.crt\"\n\
             key = \"pki/coordinator-{name}.key\"\nclient_tokens = \"pki/client-tokens\"\n{peers}",
            id = i + 1
        );
        let path = out.join(format!("coordinator-{name}.toml"));
        write(&path, &text, false)?;
        configs.push(path);
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
            coordinators: 3,
            first_addr: "127.0.0.1:7400".parse().unwrap(),
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
        let err = init(
            dir.path(),
            &InitPlan {
                coordinators: 2,
                ..plan
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("1, 3 or 5"), "{err}");
    }
}
