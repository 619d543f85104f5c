//! The embedded cluster: a coordinator in the process of `strata build`, for builds with no
//! cluster configured.
//!
//! It is a cluster of one: a single-node Raft group (its log in memory: the group lives as
//! long as the process), the same replicated state machine, the same scheduler and leader's
//! loop, and the same typed messages as a cluster. Only the transport differs: the worker and
//! the client are in this process and talk to the coordinator through channels
//! ([`LocalCluster::attach_worker`], [`LocalCluster::worker_message`],
//! [`LocalCluster::client_request`]) instead of QUIC streams, and may name directories of this
//! machine (the build context, secrets), which a remote client never may.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_shared::tls::ClientTokens;
use strata_shared::wire::{ClientMsg, CoordinatorToClient, CoordinatorToWorker, WorkerMsg};
use tokio::sync::{mpsc, oneshot};

use super::clients::{self, Origin};
use super::workers::worker_request;
use super::{ClusterState, ServerError, Shared, WorkerChannel};
use crate::config::{CoordinatorConfig, Peer, RaftConfig, SchedulerConfig, TlsConfig};
use crate::raft::{self, RaftNode};

/// The node id and name of the embedded coordinator.
const NODE_ID: u64 = 1;
const NAME: &str = "embedded";
/// How long [`LocalCluster::start`] waits for the single node to lead.
const LEADING_WITHIN: Duration = Duration::from_secs(10);

/// A request of the coordinator to the in-process worker (an offer or a cancellation), and
/// where its answer goes.
pub struct WorkerCall {
    pub msg: CoordinatorToWorker,
    pub reply: oneshot::Sender<WorkerMsg>,
}

/// A running embedded cluster. Its tasks end with the runtime that runs them.
#[derive(Clone)]
pub struct LocalCluster {
    shared: Arc<Shared>,
}

impl LocalCluster {
    /// Starts the single-node group and waits until it leads. `state_dir` names where a
    /// cluster would keep its data; nothing is written there (the log is in memory).
    pub async fn start(state_dir: &Path) -> Result<LocalCluster, ServerError> {
        let unbound = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let config = CoordinatorConfig {
            node_id: NODE_ID,
            name: NAME.into(),
            listen: unbound,
            data_dir: state_dir.to_path_buf(),
            store: state_dir.join("store"),
            tls: TlsConfig {
                ca: Default::default(),
                cert: Default::default(),
                key: Default::default(),
                client_tokens: None,
            },
            peers: vec![Peer {
                id: NODE_ID,
                name: NAME.into(),
                addr: unbound,
            }],
            join: false,
            raft: RaftConfig::default(),
            scheduler: SchedulerConfig::default(),
        };
        let raft_config = raft::RaftConfig {
            in_memory: true,
            ..raft::RaftConfig::default()
        };
        let mut node = RaftNode::open(
            NODE_ID,
            &config.data_dir.join("raft"),
            &[NODE_ID],
            ClusterState::default(),
            raft_config,
        )?;
        // The only voter: no election timeout to wait out.
        node.campaign()?;
        let shared = Shared::start(node, config, ClientTokens::none(), None);
        let mut view = shared.node.watch();
        let leading = async {
            loop {
                if view.borrow_and_update().leader == Some(NODE_ID) {
                    return true;
                }
                if view.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(LEADING_WITHIN, leading).await {
            Ok(true) => Ok(LocalCluster { shared }),
            _ => Err(ServerError::Start(format!(
                "the embedded coordinator did not become leader within {}s",
                LEADING_WITHIN.as_secs()
            ))),
        }
    }

    /// Registers the in-process worker (`register` as a remote worker would send it) and
    /// returns the channel of the coordinator's requests to it: the worker answers each
    /// through its `reply`.
    pub async fn attach_worker(
        &self,
        register: strata_shared::wire::RegisterWorker,
    ) -> Result<mpsc::Receiver<WorkerCall>, String> {
        let (tx, rx) = mpsc::channel(64);
        let name = register.name.clone();
        let channel = WorkerChannel::Local(tx);
        match worker_request(&self.shared, &channel, &name, WorkerMsg::Register(register)).await {
            CoordinatorToWorker::Ack(a) if a.accepted => Ok(rx),
            CoordinatorToWorker::Ack(a) => Err(a.reason),
            other => Err(format!("unexpected answer to a registration: {other:?}")),
        }
    }

    /// A message of the in-process worker `name` (heartbeat, progress, result, leave), and the
    /// coordinator's answer.
    pub async fn worker_message(&self, name: &str, msg: WorkerMsg) -> CoordinatorToWorker {
        let channel = {
            let workers = self
                .shared
                .workers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            workers.get(name).map(|l| l.channel.clone())
        };
        match channel {
            Some(channel) => worker_request(&self.shared, &channel, name, msg).await,
            None => CoordinatorToWorker::Error(strata_shared::wire::ErrorReply {
                code: strata_shared::wire::ErrorCode::NotFound,
                message: format!("no worker {name} is attached"),
            }),
        }
    }

    /// A request of the in-process client; its answers (one, or a stream for a watch) arrive
    /// on the returned channel, which closes after the last.
    pub fn client_request(&self, msg: ClientMsg) -> mpsc::Receiver<CoordinatorToClient> {
        let (mut tx, rx) = mpsc::channel(256);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            clients::answer(&shared, msg, Origin::InProcess, &mut tx).await;
        });
        rx
    }
}
