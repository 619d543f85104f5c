//! The coordinator process: one Raft node of the cluster, its QUIC endpoint, and the links to
//! the other coordinators.
//!
//! One task owns the [`RaftNode`] (and with it the replicated [`ClusterState`]), see
//! [`node_task`]; everything else talks to it through a [`NodeHandle`]. Connections are told
//! apart by the role in their certificate (or a client token): coordinators send Raft messages
//! on unidirectional streams ([`node_task`]), workers ([`workers`]) and clients ([`clients`],
//! [`membership`]) ask on bidirectional streams, and the leader's duties run in one loop
//! ([`leader`]).

mod clients;
mod leader;
mod local;
mod membership;
mod node_task;
mod progress_log;
mod workers;

pub use local::{LocalCluster, WorkerCall};
pub use node_task::{NodeHandle, NodeView};

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_shared::tls::{self, ClientTokens, Identity, PeerIdentity, Role};
use strata_shared::wire::{self, Welcome};
use tokio::sync::watch;

use crate::config::CoordinatorConfig;
use crate::raft::{self, RaftNode};
use crate::state;

/// How long a proposal may wait for its entry to commit before the caller is told.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting for one peer before new ones are dropped (Raft resends what matters).
const PEER_QUEUE: usize = 1024;

/// The replicated state under Raft: [`state::StateMachine`] with its responses as JSON.
#[derive(Debug, Default)]
pub struct ClusterState(pub state::StateMachine);

impl raft::StateMachine for ClusterState {
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let response = self.0.apply_bytes(index, data);
        serde_json::to_vec(&response).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.0.restore(data).map_err(|e| e.to_string())
    }
}

/// Why the coordinator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Raft(#[from] raft::RaftError),
    #[error("{0}")]
    Start(String),
}

/// Why a proposal did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    #[error("no quorum: the entry did not commit within {}s", PROPOSAL_TIMEOUT.as_secs())]
    NoQuorum,
    #[error("{0}")]
    Failed(String),
}

/// Reads the configured PEM files.
fn read(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path).map_err(|source| ServerError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Runs a coordinator until the process is asked to stop (SIGINT or SIGTERM).
pub async fn serve(config: CoordinatorConfig) -> Result<(), ServerError> {
    let ca_pem = read(&config.tls.ca)?;
    let identity = Identity::load(&config.tls.cert, &config.tls.key)?;
    let endpoint = tls::server_endpoint(
        config.listen,
        tls::server_config(&ca_pem, &identity, false)?,
    )?;
    run(config, endpoint, strata_shared::signal::stop_requested()).await
}

/// Runs a coordinator on `endpoint` (a QUIC server endpoint with this node's certificate, on
/// any address: tests bind port 0) until `shutdown` resolves, naming why.
pub async fn run(
    config: CoordinatorConfig,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), ServerError> {
    let ca_pem = read(&config.tls.ca)?;
    let identity = Identity::load(&config.tls.cert, &config.tls.key)?;
    let tokens = match &config.tls.client_tokens {
        Some(path) => {
            let text = read(path)?;
            ClientTokens::new(text.lines().map(str::trim).filter(|l| !l.is_empty()))
        }
        None => ClientTokens::none(),
    };
    let local: SocketAddr = SocketAddr::new(config.listen.ip(), 0);
    let dialer = tls::client_endpoint(local, tls::client_config(&ca_pem, Some(&identity))?)?;

    // A joining node starts empty and waits for the leader to add it (and send a snapshot).
    let voters: Vec<u64> = if config.join {
        Vec::new()
    } else {
        config.peers.iter().map(|p| p.id).collect()
    };
    let raft_config = raft::RaftConfig {
        heartbeat_ticks: config.raft.heartbeat_ticks,
        election_ticks: config.raft.election_ticks,
        snapshot_threshold: config.raft.snapshot_entries,
        ..raft::RaftConfig::default()
    };
    let node = RaftNode::open(
        config.node_id,
        &config.data_dir.join("raft"),
        &voters,
        ClusterState::default(),
        raft_config,
    )?;
    tracing::info!(node = config.node_id, name = %config.name, listen = ?endpoint.local_addr().ok(), "coordinator listening");
    let shared = Shared::start(node, config, tokens, Some(dialer));
    let mut view = shared.node.watch();
    let stop = shutdown;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(incoming, shared).await {
                        tracing::debug!(%remote, error = %e, "connection ended");
                    }
                });
            }
            _ = removed_and_handed_over(&mut view) => {
                tracing::warn!(node = shared.config.node_id, "this coordinator was removed from the cluster; stopping");
                endpoint.close(0u32.into(), b"removed from the cluster");
                break;
            }
            signal = &mut stop => {
                // A leader that stops hands over first: the cluster does not wait out an
                // election timeout (what a rolling restart would otherwise cost each time).
                if let Some(successor) = shared.node.hand_over().await {
                    tracing::info!(node = shared.config.node_id, successor, %signal, "stopping: leadership handed over");
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while shared.node.view().leader == Some(shared.config.node_id)
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } else {
                    tracing::info!(node = shared.config.node_id, %signal, "stopping");
                }
                endpoint.close(0u32.into(), b"coordinator stopping");
                break;
            }
        }
    }
    Ok(())
}

/// Resolves once this node has applied its own removal and no longer leads (a removed
/// leader first hands leadership over), plus a grace period for its last messages.
async fn removed_and_handed_over(view: &mut watch::Receiver<NodeView>) {
    loop {
        let done = {
            let v = view.borrow_and_update();
            v.removed && v.leader != Some(v.id)
        };
        if done {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let v = view.borrow();
            if v.removed && v.leader != Some(v.id) {
                return;
            }
            continue;
        }
        if view.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What the connection handlers and the leader's loop share.
struct Shared {
    node: NodeHandle,
    config: CoordinatorConfig,
    tokens: ClientTokens,
    /// Workers connected to this node, by name.
    workers: Mutex<HashMap<String, WorkerLink>>,
    /// Progress events of the builds this node led, by build: what `WatchBuild` streams.
    events: Mutex<progress_log::ProgressLog>,
    /// Wakes the leader's loop before its next tick: a build was submitted, a job finished or
    /// failed, a worker registered.
    wake: tokio::sync::Notify,
    /// Wakes the watchers of builds: progress arrived or a build may have ended.
    progressed: tokio::sync::watch::Sender<u64>,
}

/// A worker's live link to this coordinator.
struct WorkerLink {
    channel: WorkerChannel,
    last_seen: Instant,
    running: Vec<u64>,
}

/// How the coordinator asks a worker something (offers, cancellations): over its QUIC
/// connection, or in this process for the embedded worker.
#[derive(Clone)]
enum WorkerChannel {
    Quic(quinn::Connection),
    Local(tokio::sync::mpsc::Sender<WorkerCall>),
}

impl WorkerChannel {
    /// Sends one request and waits for the worker's answer.
    async fn request(&self, msg: &wire::CoordinatorToWorker) -> Result<wire::WorkerMsg, String> {
        match self {
            WorkerChannel::Quic(conn) => wire::request(conn, msg).await.map_err(|e| e.to_string()),
            WorkerChannel::Local(tx) => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                tx.send(WorkerCall {
                    msg: msg.clone(),
                    reply,
                })
                .await
                .map_err(|_| "the embedded worker has stopped".to_string())?;
                answer
                    .await
                    .map_err(|_| "the embedded worker dropped the request".to_string())
            }
        }
    }

    /// Whether two channels are the same link (a worker that reconnected has a new one).
    fn same(&self, other: &WorkerChannel) -> bool {
        match (self, other) {
            (WorkerChannel::Quic(a), WorkerChannel::Quic(b)) => a.stable_id() == b.stable_id(),
            (WorkerChannel::Local(a), WorkerChannel::Local(b)) => a.same_channel(b),
            _ => false,
        }
    }
}

impl Shared {
    /// Starts the Raft task and the leader's loop around `node`.
    fn start(
        node: RaftNode<ClusterState>,
        config: CoordinatorConfig,
        tokens: ClientTokens,
        dialer: Option<quinn::Endpoint>,
    ) -> Arc<Shared> {
        let handle = node_task::start_node(node, &config, dialer);
        let shared = Arc::new(Shared {
            node: handle,
            config,
            tokens,
            workers: Mutex::new(HashMap::new()),
            events: Mutex::new(progress_log::ProgressLog::default()),
            wake: tokio::sync::Notify::new(),
            progressed: tokio::sync::watch::Sender::new(0),
        });
        tokio::spawn(leader::leader_loop(shared.clone()));
        shared
    }

    /// Keeps one progress event of `build` for its watchers, and wakes them.
    fn record_event(&self, build: u64, event: strata_shared::progress::Event) {
        {
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            events.push(build, event);
        }
        self.progressed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Something the leader's loop acts on happened: run it now, and wake the watchers.
    fn changed(&self) {
        self.wake.notify_one();
        self.progressed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn is_leader(&self) -> bool {
        let v = self.node.view();
        v.leader == Some(v.id)
    }

    fn not_leader(&self) -> wire::NotLeader {
        wire::NotLeader {
            leader: self.node.leader_addr(),
        }
    }

    /// Proposes a command; the state machine's response.
    async fn submit(&self, cmd: &state::Command) -> Result<state::Response, ProposeError> {
        let bytes = self.node.propose(cmd.encode()).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ProposeError::Failed(format!("undecodable response: {e}")))
    }
}

/// Milliseconds since the Unix epoch: the leader's clock, stamped into commands.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves one incoming connection according to the role of the other side.
async fn connection(incoming: quinn::Incoming, shared: Arc<Shared>) -> Result<(), wire::WireError> {
    let conn = tls::accept(incoming)
        .await
        .map_err(|e| wire::WireError::Refused(e.to_string()))?;
    let greeting = wire::receive_hello(&conn, &shared.tokens).await?;
    let auth = greeting.auth();
    let view = shared.node.view();
    let welcome = Welcome {
        node_id: shared.config.node_id,
        leader: shared.node.leader_addr(),
        term: view.term,
        members: view
            .voters
            .iter()
            .chain(&view.learners)
            .filter_map(|id| shared.node.peer(*id))
            .map(|p| p.addr.to_string())
            .collect(),
    };
    let peer: PeerIdentity = greeting.welcome(welcome).await?;
    match peer.role {
        Role::Coordinator => {
            node_task::serve_peer(&conn, &shared.node).await;
            Ok(())
        }
        Role::Client => {
            while let Some((send, recv)) = wire::accept_stream(&conn).await? {
                tokio::spawn(clients::client_request(shared.clone(), send, recv, auth));
            }
            Ok(())
        }
        Role::Worker => workers::worker_connection(shared, conn, peer.name).await,
    }
}
