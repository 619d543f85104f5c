//! The coordinator process: one Raft node of the cluster, its QUIC endpoint, and the links to
//! the other coordinators.
//!
//! One task owns the [`RaftNode`] (and with it the replicated [`ClusterState`]): it ticks the
//! Raft clock, steps the messages peers send, takes proposals, persists and applies what is
//! ready, and hands outgoing messages to one sender task per peer. Everything else talks to it
//! through a [`NodeHandle`]. Connections are told apart by the role in their certificate (or a
//! client token): coordinators send Raft messages on unidirectional streams; clients ask on
//! bidirectional streams.

mod membership;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_shared::dag;
use strata_shared::dockerfile::Dockerfile;
use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::job::{ClusterJob, Compression, StageJob, StageOutput};
use strata_shared::platform::Platform;
use strata_shared::tls::{self, ClientTokens, Identity, PeerIdentity, Role};
use strata_shared::wire::{
    self, ClientMsg, CoordinatorToClient, CoordinatorToWorker, ErrorCode, ErrorReply, Hello,
    JobAck, NodeStatus, Outcome, PeerMsg, RaftMessage, RaftState, StatusReply, Welcome, WorkerMsg,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{CoordinatorConfig, Peer};
use crate::placement::{Emulation, WorkerInfo, place_plan};
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

/// What the Raft task publishes after each round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub role: &'static str,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// This node applied its own removal from the group.
    pub removed: bool,
}

type Query = Box<dyn FnOnce(&state::StateMachine) + Send>;
type Inspect = Box<dyn FnOnce(&RaftNode<ClusterState>) + Send>;
type Reply = oneshot::Sender<Result<Vec<u8>, ProposeError>>;

enum Request {
    /// A Raft message from peer `from`.
    Step(u64, Vec<u8>),
    /// A member says this node was removed from the group.
    Removed(wire::RemovedNotice),
    Unreachable(u64),
    /// A snapshot message to the peer was delivered, or not.
    SnapshotSent(u64, bool),
    Propose(Vec<u8>, Reply),
    ConfChange(raft::MembershipChange, Reply),
    Query(Query),
    Inspect(Inspect),
}

/// Where the coordinators are, by Raft id: the configured peers, overlaid with the ones
/// recorded in the replicated state (added at run time).
type AddressBook = Arc<Mutex<BTreeMap<u64, Peer>>>;

/// Talks to the task that owns the Raft node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Request>,
    view: watch::Receiver<NodeView>,
    book: AddressBook,
}

impl NodeHandle {
    /// The latest published view of this node.
    pub fn view(&self) -> NodeView {
        self.view.borrow().clone()
    }

    /// Where coordinator `id` is, if known.
    pub fn peer(&self, id: u64) -> Option<Peer> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.get(&id).cloned()
    }

    /// The address of the leader, when one is known.
    pub fn leader_addr(&self) -> Option<String> {
        let leader = self.view.borrow().leader?;
        self.peer(leader).map(|p| format!("{}={}", p.name, p.addr))
    }

    /// Proposes a command; returns the state machine's response once it is applied here.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        self.ask(|tx| Request::Propose(command, tx)).await
    }

    /// Proposes a membership change; returns once it is applied here.
    pub async fn change_membership(
        &self,
        change: raft::MembershipChange,
    ) -> Result<(), ProposeError> {
        self.ask(|tx| Request::ConfChange(change, tx))
            .await
            .map(drop)
    }

    async fn ask(&self, request: impl FnOnce(Reply) -> Request) -> Result<Vec<u8>, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(request(tx))
            .await
            .map_err(|_| ProposeError::Failed("the raft task has stopped".into()))?;
        match tokio::time::timeout(PROPOSAL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Failed("the raft task has stopped".into())),
            Err(_) => Err(ProposeError::NoQuorum),
        }
    }

    /// Runs `f` on the Raft node itself (progress of peers, membership).
    pub async fn inspect<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RaftNode<ClusterState>) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let i: Inspect = Box::new(move |n| {
            let _ = tx.send(f(n));
        });
        self.tx.send(Request::Inspect(i)).await.ok()?;
        rx.await.ok()
    }

    /// Runs `f` on the current state (as applied on this node).
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&state::StateMachine) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let q: Query = Box::new(move |s| {
            let _ = tx.send(f(s));
        });
        self.tx.send(Request::Query(q)).await.ok()?;
        rx.await.ok()
    }
}

/// Reads the configured PEM files.
fn read(path: &Path) -> Result<String, ServerError> {
    std::fs::read_to_string(path).map_err(|source| ServerError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Runs a coordinator until the process is stopped.
pub async fn serve(config: CoordinatorConfig) -> Result<(), ServerError> {
    let ca_pem = read(&config.tls.ca)?;
    let identity = Identity::load(&config.tls.cert, &config.tls.key)?;
    let tokens = match &config.tls.client_tokens {
        Some(path) => {
            let text = read(path)?;
            ClientTokens::new(text.lines().map(str::trim).filter(|l| !l.is_empty()))
        }
        None => ClientTokens::none(),
    };
    let endpoint = tls::server_endpoint(
        config.listen,
        tls::server_config(&ca_pem, &identity, false)?,
    )?;
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
    let handle = start_node(node, &config, dialer);
    tracing::info!(node = config.node_id, name = %config.name, listen = %config.listen, "coordinator listening");

    let shared = Arc::new(Shared {
        node: handle,
        config,
        tokens,
        workers: Mutex::new(HashMap::new()),
        events: Mutex::new(HashMap::new()),
    });
    tokio::spawn(leader_loop(shared.clone()));
    let mut view = shared.node.view.clone();
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
    events: Mutex<HashMap<u64, Vec<Vec<u8>>>>,
}

/// A worker's live connection to this coordinator.
struct WorkerLink {
    conn: quinn::Connection,
    last_seen: Instant,
    running: Vec<u64>,
}

impl Shared {
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

/// The address book: the configured peers, overlaid by the coordinators recorded in the
/// replicated state (an address recorded later wins; retired ones stay, for their names).
fn address_book(
    configured: &[Peer],
    recorded: &BTreeMap<u64, state::CoordinatorRecord>,
) -> BTreeMap<u64, Peer> {
    let mut book: BTreeMap<u64, Peer> = configured.iter().map(|p| (p.id, p.clone())).collect();
    for (id, r) in recorded {
        if let Ok(addr) = r.addr.parse() {
            book.insert(
                *id,
                Peer {
                    id: *id,
                    name: r.name.clone(),
                    addr,
                },
            );
        }
    }
    book
}

/// Starts the Raft task. Peer senders start on the first message to a peer whose address is
/// known, and stop when it leaves the group.
fn start_node(
    mut node: RaftNode<ClusterState>,
    config: &CoordinatorConfig,
    dialer: quinn::Endpoint,
) -> NodeHandle {
    let (tx, mut rx) = mpsc::channel::<Request>(4096);
    let (view_tx, view_rx) = watch::channel(NodeView::default());
    let book: AddressBook = Arc::new(Mutex::new(address_book(
        &config.peers,
        node.state_machine().0.coordinators(),
    )));
    let tick_every = Duration::from_millis(config.raft.tick_ms.max(1));
    let id = config.node_id;
    let name = config.name.clone();
    let configured = config.peers.clone();
    let requests = tx.clone();
    let task_book = book.clone();
    tokio::spawn(async move {
        let mut peers = PeerSenders {
            senders: HashMap::new(),
            book: task_book,
            dialer,
            me: id,
            my_name: name,
            requests,
            noticed: HashMap::new(),
        };
        let mut told_removed = false;
        let mut ticker = tokio::time::interval(tick_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut waiting: HashMap<raft::ProposalId, Reply> = HashMap::new();
        let mut recorded = node.state_machine().0.coordinators().clone();
        loop {
            tokio::select! {
                _ = ticker.tick() => node.tick(),
                request = rx.recv() => {
                    let Some(request) = request else { break };
                    match request {
                        Request::Step(from, bytes) => {
                            if is_retired(&node, from) {
                                peers.tell_removed(from, node.applied_index());
                            } else if let Err(e) = node.step_bytes(&bytes) {
                                tracing::debug!(error = %e, "raft message refused");
                            }
                        }
                        Request::Removed(notice) => {
                            let conf = node.conf_state();
                            if notice.removed == id && notice.from != id && conf.voters.contains(&notice.from) && !told_removed {
                                tracing::warn!(node = id, by = notice.from, at = notice.applied_index, "a member reports that this coordinator was removed from the cluster");
                                told_removed = true;
                            }
                        }
                        Request::Unreachable(to) => node.report_unreachable(to),
                        Request::SnapshotSent(to, delivered) => node.report_snapshot(to, delivered),
                        Request::Propose(data, reply) => {
                            let proposed = node.propose(data);
                            track(proposed, reply, &mut waiting);
                        }
                        Request::ConfChange(change, reply) => {
                            let proposed = node.propose_conf_change(change);
                            track(proposed, reply, &mut waiting);
                        }
                        Request::Query(q) => q(&node.state_machine().0),
                        Request::Inspect(f) => f(&node),
                    }
                }
            }
            if let Err(e) = node.handle_ready() {
                tracing::error!(node = id, error = %e, "raft node failed; stopping it");
                break;
            }
            if node.state_machine().0.coordinators() != &recorded {
                recorded = node.state_machine().0.coordinators().clone();
                let mut b = peers.book.lock().unwrap_or_else(|e| e.into_inner());
                *b = address_book(&configured, &recorded);
            }
            let conf = node.conf_state();
            // A joining node knows no members until its first snapshot; it answers whoever
            // writes to it.
            if !conf.voters.is_empty() {
                let gone: Vec<u64> = peers
                    .senders
                    .keys()
                    .filter(|p| !conf.voters.contains(p) && !conf.learners.contains(p))
                    .copied()
                    .collect();
                for peer in gone {
                    // The leader stops writing to a removed node before it could apply its
                    // own removal: tell it, then let its sender go.
                    if is_retired(&node, peer) {
                        peers.tell_removed(peer, node.applied_index());
                    }
                    peers.senders.remove(&peer);
                }
            }
            for out in node.take_outgoing() {
                let snapshot = out.is_snapshot();
                let msg = PeerMsg::Raft(RaftMessage {
                    from: id,
                    to: out.to,
                    bytes: out.encode(),
                });
                if !peers.send(out.to, msg, snapshot) {
                    node.report_unreachable(out.to);
                    if snapshot {
                        node.report_snapshot(out.to, false);
                    }
                }
            }
            for r in node.take_responses() {
                if let Some(reply) = waiting.remove(&r.id) {
                    let _ = reply.send(r.result.map_err(|e| ProposeError::Failed(e.to_string())));
                }
            }
            let view = NodeView {
                id,
                leader: node.leader_id(),
                term: node.term(),
                commit_index: node.commit_index(),
                applied_index: node.applied_index(),
                role: match node.role() {
                    ::raft::StateRole::Leader => "leader",
                    ::raft::StateRole::Candidate => "candidate",
                    ::raft::StateRole::PreCandidate => "pre-candidate",
                    ::raft::StateRole::Follower => "follower",
                },
                voters: sorted(&conf.voters),
                learners: sorted(&conf.learners),
                removed: node.is_removed() || told_removed,
            };
            view_tx.send_if_modified(|old| {
                if old.role != view.role && old.term > 0 {
                    tracing::info!(node = id, from = old.role, to = view.role, term = view.term, leader = ?view.leader, "raft role changed");
                }
                let changed = *old != view;
                *old = view;
                changed
            });
        }
    });
    NodeHandle {
        tx,
        view: view_rx,
        book,
    }
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

/// Keeps a proposal's reply until its entry applies, or answers at once when it was refused.
fn track(
    proposed: Result<raft::ProposalId, raft::RaftError>,
    reply: Reply,
    waiting: &mut HashMap<raft::ProposalId, Reply>,
) {
    match proposed {
        Ok(pid) => {
            waiting.insert(pid, reply);
        }
        Err(raft::RaftError::NotLeader { leader_id }) => {
            let _ = reply.send(Err(ProposeError::NotLeader {
                leader: leader_id.map(|l| l.to_string()),
            }));
        }
        Err(e) => {
            let _ = reply.send(Err(ProposeError::Failed(e.to_string())));
        }
    }
}

/// Whether `peer` was removed from the group: retired in the replicated state and no longer a
/// member here.
fn is_retired(node: &RaftNode<ClusterState>, peer: u64) -> bool {
    let retired = node
        .state_machine()
        .0
        .coordinators()
        .get(&peer)
        .is_some_and(|c| c.retired);
    retired && {
        let conf = node.conf_state();
        !conf.voters.is_empty() && !conf.voters.contains(&peer) && !conf.learners.contains(&peer)
    }
}

/// The Raft task's senders, one per peer, started on the first message to a peer whose address
/// is known.
struct PeerSenders {
    senders: HashMap<u64, mpsc::Sender<(PeerMsg, bool)>>,
    book: AddressBook,
    dialer: quinn::Endpoint,
    me: u64,
    my_name: String,
    requests: mpsc::Sender<Request>,
    /// When each removed node was last told so.
    noticed: HashMap<u64, Instant>,
}

impl PeerSenders {
    /// Queues `msg` (a snapshot when `snapshot`) for `to`; false when it cannot be.
    fn send(&mut self, to: u64, msg: PeerMsg, snapshot: bool) -> bool {
        if !self.senders.contains_key(&to) {
            let Some(peer) = self
                .book
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&to)
                .cloned()
            else {
                return false;
            };
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(peer_sender(
                self.dialer.clone(),
                peer,
                self.my_name.clone(),
                rx,
                self.requests.clone(),
            ));
            self.senders.insert(to, tx);
        }
        self.senders
            .get(&to)
            .is_some_and(|s| s.try_send((msg, snapshot)).is_ok())
    }

    /// Tells a removed node it was removed (at most every two seconds).
    fn tell_removed(&mut self, peer: u64, applied_index: u64) {
        if self
            .noticed
            .get(&peer)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.noticed.insert(peer, Instant::now());
        let notice = PeerMsg::Removed(wire::RemovedNotice {
            from: self.me,
            removed: peer,
            applied_index,
        });
        if self.send(peer, notice, false) {
            tracing::info!(node = self.me, removed = peer, "told a removed coordinator");
        }
    }
}

/// Delivers messages to one peer: one connection, kept or redialled, one stream per message.
async fn peer_sender(
    dialer: quinn::Endpoint,
    peer: Peer,
    my_name: String,
    mut rx: mpsc::Receiver<(PeerMsg, bool)>,
    node: mpsc::Sender<Request>,
) {
    let mut conn: Option<quinn::Connection> = None;
    while let Some((msg, snapshot)) = rx.recv().await {
        if conn.as_ref().is_none_or(|c| c.close_reason().is_some()) {
            conn = dial_peer(&dialer, &peer, &my_name).await;
        }
        let Some(c) = &conn else {
            let _ = node.send(Request::Unreachable(peer.id)).await;
            if snapshot {
                let _ = node.send(Request::SnapshotSent(peer.id, false)).await;
            }
            // Drop what queued up meanwhile: Raft retries on its own schedule.
            while rx.try_recv().is_ok() {}
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let notice = matches!(msg, PeerMsg::Removed(_));
        let sent = async {
            let mut stream = c.open_uni().await.map_err(|e| e.to_string())?;
            wire::write_frame(&mut stream, &msg)
                .await
                .map_err(|e| e.to_string())?;
            stream.finish().map_err(|e| e.to_string())?;
            // A notice is often the last message before this sender (and its connection)
            // goes away: see it read before the connection closes.
            if notice {
                let _ = tokio::time::timeout(Duration::from_secs(2), stream.stopped()).await;
            }
            Ok::<_, String>(())
        }
        .await;
        if snapshot {
            let _ = node
                .send(Request::SnapshotSent(peer.id, sent.is_ok()))
                .await;
        }
        if let Err(e) = sent {
            tracing::debug!(peer = %peer.name, error = %e, "sending to a peer failed");
            conn = None;
            let _ = node.send(Request::Unreachable(peer.id)).await;
        }
    }
}

async fn dial_peer(
    dialer: &quinn::Endpoint,
    peer: &Peer,
    my_name: &str,
) -> Option<quinn::Connection> {
    let conn = tokio::time::timeout(
        Duration::from_secs(2),
        tls::connect(dialer, peer.addr, &peer.name),
    )
    .await
    .ok()?
    .ok()?;
    let hello = Hello {
        role: Role::Coordinator,
        name: my_name.to_string(),
        token: None,
    };
    match wire::send_hello(&conn, &hello).await {
        Ok(_) => Some(conn),
        Err(e) => {
            tracing::debug!(peer = %peer.name, error = %e, "peer refused the hello");
            None
        }
    }
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
            while let Ok(mut stream) = conn.accept_uni().await {
                let node = shared.node.clone();
                tokio::spawn(async move {
                    match wire::read_frame::<PeerMsg>(&mut stream).await {
                        Ok(PeerMsg::Raft(m)) => {
                            let _ = node.tx.send(Request::Step(m.from, m.bytes)).await;
                        }
                        Ok(PeerMsg::Removed(notice)) => {
                            let _ = node.tx.send(Request::Removed(notice)).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "unreadable peer message"),
                    }
                });
            }
            Ok(())
        }
        Role::Client => {
            while let Some((send, recv)) = wire::accept_stream(&conn).await? {
                tokio::spawn(client_request(shared.clone(), send, recv, auth));
            }
            Ok(())
        }
        Role::Worker => worker_connection(shared, conn, peer.name).await,
    }
}

/// A worker's connection: its requests on bidirectional streams, its progress on
/// unidirectional ones.
async fn worker_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    name: String,
) -> Result<(), wire::WireError> {
    let progress = {
        let (shared, conn) = (shared.clone(), conn.clone());
        tokio::spawn(async move {
            while let Ok(stream) = conn.accept_uni().await {
                tokio::spawn(progress_stream(shared.clone(), stream));
            }
        })
    };
    let result = async {
        while let Some((mut send, mut recv)) = wire::accept_stream(&conn).await? {
            let (shared, conn, name) = (shared.clone(), conn.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(msg) = wire::read_frame::<WorkerMsg>(&mut recv).await else {
                    return;
                };
                let reply = worker_request(&shared, &conn, &name, msg).await;
                if wire::write_frame(&mut send, &reply).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
        Ok::<(), wire::WireError>(())
    }
    .await;
    progress.abort();
    let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
    if workers
        .get(&name)
        .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
    {
        workers.remove(&name);
    }
    result
}

/// A proposal that did not go through is never a refusal: the worker tries again.
fn worker_propose_error(shared: &Shared, e: ProposeError) -> CoordinatorToWorker {
    match e {
        ProposeError::NotLeader { .. } => CoordinatorToWorker::NotLeader(shared.not_leader()),
        ProposeError::NoQuorum => CoordinatorToWorker::NoQuorum,
        ProposeError::Failed(message) => CoordinatorToWorker::Error(ErrorReply {
            code: ErrorCode::Internal,
            message,
        }),
    }
}

fn ack(accepted: bool, reason: impl Into<String>) -> CoordinatorToWorker {
    CoordinatorToWorker::Ack(JobAck {
        accepted,
        reason: reason.into(),
    })
}

async fn worker_request(
    shared: &Shared,
    conn: &quinn::Connection,
    name: &str,
    msg: WorkerMsg,
) -> CoordinatorToWorker {
    if !shared.is_leader() {
        return CoordinatorToWorker::NotLeader(shared.not_leader());
    }
    match msg {
        WorkerMsg::Register(r) => {
            if r.name != name {
                return ack(
                    false,
                    format!(
                        "the certificate names {name:?}, the registration {:?}",
                        r.name
                    ),
                );
            }
            let parse = |list: &[String]| {
                list.iter()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<_>>()
            };
            let cmd = state::Command::RegisterWorker {
                now_ms: now_ms(),
                name: name.to_string(),
                capabilities: strata_shared::platform::Capabilities {
                    native: parse(&r.native),
                    emulated: parse(&r.emulated),
                },
                capacity: r.capacity.max(1),
                labels: r.labels.into_iter().collect(),
            };
            match shared.submit(&cmd).await {
                Ok(state::Response::WorkerRegistered { rejoined, .. }) => {
                    tracing::info!(worker = %name, rejoined, "worker registered");
                    let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                    workers.insert(
                        name.to_string(),
                        WorkerLink {
                            conn: conn.clone(),
                            last_seen: Instant::now(),
                            running: Vec::new(),
                        },
                    );
                    ack(true, "")
                }
                Ok(other) => ack(false, format!("{other:?}")),
                Err(e) => worker_propose_error(shared, e),
            }
        }
        WorkerMsg::Heartbeat(h) => {
            let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            match workers.get_mut(name) {
                Some(link) => {
                    link.last_seen = Instant::now();
                    link.running = h.running.clone();
                    ack(true, "")
                }
                None => ack(
                    false,
                    "not registered with this coordinator: register first",
                ),
            }
        }
        WorkerMsg::Result(r) => {
            let token = state::LeaseToken {
                term: r.term,
                epoch: r.epoch,
            };
            let job = state::JobId(r.job_id);
            let cmd = match r.outcome {
                Outcome::Ok(json) => {
                    let output: Result<StageOutput, _> = serde_json::from_slice(&json);
                    match output.and_then(|o| state::StageResult::from_output(&o)) {
                        Ok(result) => state::Command::CompleteJob {
                            now_ms: now_ms(),
                            job,
                            token,
                            result,
                        },
                        Err(e) => state::Command::FailJob {
                            now_ms: now_ms(),
                            job,
                            token,
                            failure: state::Failure::Worker {
                                error: format!("the worker's result does not decode: {e}"),
                            },
                        },
                    }
                }
                Outcome::Err(error) => state::Command::FailJob {
                    now_ms: now_ms(),
                    job,
                    token,
                    failure: state::Failure::Step { error },
                },
            };
            match shared.submit(&cmd).await {
                Ok(state::Response::Rejected { reason }) => {
                    tracing::warn!(worker = %name, job = %job, %reason, "result refused");
                    ack(false, reason.to_string())
                }
                Ok(_) => ack(true, ""),
                Err(e) => worker_propose_error(shared, e),
            }
        }
        WorkerMsg::Progress(_) | WorkerMsg::Ack(_) => {
            ack(false, "progress goes on a unidirectional stream")
        }
    }
}

/// Progress events of one job: kept for the build's watchers.
async fn progress_stream(shared: Arc<Shared>, mut stream: quinn::RecvStream) {
    let mut build: Option<u64> = None;
    while let Ok(Some(WorkerMsg::Progress(p))) =
        wire::read_frame_or_eof::<WorkerMsg>(&mut stream).await
    {
        if build.is_none() {
            let job = state::JobId(p.job_id);
            build = shared
                .node
                .query(move |s| s.job(job).map(|j| j.build.0))
                .await
                .flatten();
        }
        if let Some(b) = build {
            let mut events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
            events.entry(b).or_default().push(p.event_json);
        }
    }
}

/// A build as a client submits it to the cluster (the JSON of [`wire::SubmitBuild`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterBuildRequest {
    pub dockerfile: String,
    /// The build context uploaded to the blob store (`worker::context::upload`).
    pub context_id: String,
    pub options: BuildOptions,
    pub platforms: Vec<Platform>,
    pub no_cache: bool,
    pub allow_host_network: bool,
    pub compression: Compression,
    /// `allow` or `deny`.
    pub emulation: String,
    /// The queue it is fair-shared in.
    pub tenant: String,
}

async fn client_request(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    auth: wire::AuthMethod,
) {
    let msg = match wire::read_frame::<ClientMsg>(&mut recv).await {
        Ok(m) => m,
        Err(e) => {
            let reply = CoordinatorToClient::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                message: e.to_string(),
            });
            let _ = wire::write_frame(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    let reply = match msg {
        ClientMsg::Status(_) => CoordinatorToClient::Status(status(&shared).await),
        ClientMsg::Submit(s) => submit_build(&shared, &s.request_json).await,
        ClientMsg::Cancel(c) => {
            if !shared.is_leader() {
                CoordinatorToClient::NotLeader(shared.not_leader())
            } else {
                let cmd = state::Command::CancelBuild {
                    now_ms: now_ms(),
                    build: state::BuildId(c.build_id),
                    reason: "cancelled by the client".into(),
                };
                match shared.submit(&cmd).await {
                    Ok(_) => CoordinatorToClient::Accepted(wire::BuildAccepted {
                        build_id: c.build_id,
                    }),
                    Err(e) => propose_error(&shared, e),
                }
            }
        }
        ClientMsg::Membership(_) if auth != wire::AuthMethod::Certificate => {
            CoordinatorToClient::Error(ErrorReply {
                code: ErrorCode::Forbidden,
                message: "membership changes need a client certificate of the cluster CA; a token \
                          only submits and watches builds"
                    .into(),
            })
        }
        ClientMsg::Membership(change) => membership::change(&shared, change).await,
        ClientMsg::Watch(w) => {
            watch_build(&shared, &mut send, w.build_id, w.from_event).await;
            let _ = send.finish();
            return;
        }
    };
    if wire::write_frame(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
    }
}

fn propose_error(shared: &Shared, e: ProposeError) -> CoordinatorToClient {
    match e {
        ProposeError::NotLeader { .. } => CoordinatorToClient::NotLeader(shared.not_leader()),
        ProposeError::NoQuorum => CoordinatorToClient::NoQuorum,
        ProposeError::Failed(message) => CoordinatorToClient::Error(ErrorReply {
            code: ErrorCode::Internal,
            message,
        }),
    }
}

fn bad_request(message: String) -> CoordinatorToClient {
    CoordinatorToClient::Error(ErrorReply {
        code: ErrorCode::BadRequest,
        message,
    })
}

/// Plans a submitted build and commits it with its jobs.
async fn submit_build(shared: &Shared, request_json: &[u8]) -> CoordinatorToClient {
    if !shared.is_leader() {
        return CoordinatorToClient::NotLeader(shared.not_leader());
    }
    let req: ClusterBuildRequest = match serde_json::from_slice(request_json) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("build request: {e}")),
    };
    let emulation: Emulation = match req.emulation.parse() {
        Ok(e) => e,
        Err(e) => return bad_request(e),
    };
    let df = match Dockerfile::parse(&req.dockerfile) {
        Ok(df) => df,
        Err(e) => return bad_request(e.render("Dockerfile", &req.dockerfile)),
    };
    let plan = match dag::plan(&df, &req.options, &Platform::host(), &req.platforms) {
        Ok(p) => p,
        Err(e) => return bad_request(e.render("Dockerfile", &req.dockerfile)),
    };
    // Strict placement against the workers the cluster knows, before anything is committed.
    let workers = shared
        .node
        .query(|s| {
            s.workers()
                .filter(|w| w.state == state::WorkerState::Active)
                .map(|w| WorkerInfo {
                    name: w.name.clone(),
                    capabilities: w.capabilities.clone(),
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    let mut placed = plan.clone();
    if let Err(e) = place_plan(&mut placed, &workers, emulation) {
        return bad_request(e.message);
    }
    let cmd = state::Command::SubmitBuild {
        now_ms: now_ms(),
        tenant: req.tenant.clone(),
        request: String::from_utf8_lossy(request_json).into_owned(),
        plan: state::PlanSummary::from_plan(&plan),
        policy: state::BuildPolicy {
            emulation,
            ..state::BuildPolicy::default()
        },
    };
    match shared.submit(&cmd).await {
        Ok(state::Response::Submitted { build, .. }) => {
            tracing::info!(build = %build, stages = plan.instances.len(), "build accepted");
            CoordinatorToClient::Accepted(wire::BuildAccepted { build_id: build.0 })
        }
        Ok(state::Response::Rejected { reason }) => bad_request(reason.to_string()),
        Ok(other) => bad_request(format!("unexpected response {other:?}")),
        Err(e) => propose_error(shared, e),
    }
}

/// Streams a build's progress events from `from`, then its end.
async fn watch_build(shared: &Shared, send: &mut quinn::SendStream, build: u64, mut from: u64) {
    loop {
        let fresh: Vec<(u64, Vec<u8>)> = {
            let events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
            events
                .get(&build)
                .map(|list| {
                    list.iter()
                        .enumerate()
                        .skip(from as usize)
                        .map(|(i, e)| (i as u64, e.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        for (seq, event_json) in fresh {
            let ev = CoordinatorToClient::Event(wire::BuildEvent { seq, event_json });
            if wire::write_frame(send, &ev).await.is_err() {
                return;
            }
            from = seq + 1;
        }
        let id = state::BuildId(build);
        let finished = shared
            .node
            .query(move |s| {
                s.build(id).map(|b| match &b.status {
                    state::BuildStatus::Succeeded => {
                        Some(Ok(serde_json::to_vec(&b.result).unwrap_or_default()))
                    }
                    state::BuildStatus::Failed { error } => Some(Err(error.clone())),
                    state::BuildStatus::Cancelled { reason } => {
                        Some(Err(format!("cancelled: {reason}")))
                    }
                    _ => None,
                })
            })
            .await;
        match finished {
            Some(Some(Some(result))) => {
                let done = CoordinatorToClient::Done(wire::BuildDone {
                    build_id: build,
                    result: match result {
                        Ok(json) => Outcome::Ok(json),
                        Err(e) => Outcome::Err(e),
                    },
                });
                let _ = wire::write_frame(send, &done).await;
                return;
            }
            Some(None) => {
                let _ = wire::write_frame(send, &bad_request(format!("no build {build}"))).await;
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The leader's duties, every few hundred milliseconds: renew the leases of workers that
/// heartbeat, expire the others' (after a grace period when leadership is new), lease ready
/// jobs to workers and send them the offers.
async fn leader_loop(shared: Arc<Shared>) {
    let lease_ms = shared.config.scheduler.lease_ms;
    let mut leading_since: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let view = shared.node.view();
        if view.leader != Some(view.id) {
            leading_since = None;
            continue;
        }
        let since = match leading_since {
            Some((term, at)) if term == view.term => at,
            _ => {
                leading_since = Some((view.term, Instant::now()));
                Instant::now()
            }
        };
        let now = now_ms();
        // Renew the leases of live workers that are halfway through theirs.
        let alive: Vec<String> = {
            let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers
                .iter()
                .filter(|(_, l)| l.last_seen.elapsed() < Duration::from_millis(lease_ms / 2))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let renewals = shared
            .node
            .query(move |s| {
                s.jobs()
                    .filter_map(|j| match &j.state {
                        state::JobState::Leased(l)
                            if alive.contains(&l.worker) && l.deadline_ms < now + lease_ms / 2 =>
                        {
                            Some(state::Renewal {
                                job: j.id,
                                token: l.token,
                                deadline_ms: now + lease_ms,
                            })
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
        if !renewals.is_empty() {
            let _ = shared
                .submit(&state::Command::RenewLeases {
                    now_ms: now,
                    leases: renewals,
                })
                .await;
        }
        // Workers silent for a whole lease are gone: their jobs go back to the queue and no
        // new lease goes to them until they register again. A new leader first gives them
        // a lease's time to find it.
        if since.elapsed() > Duration::from_millis(lease_ms) {
            let active = shared
                .node
                .query(|s| {
                    s.workers()
                        .filter(|w| w.state == state::WorkerState::Active)
                        .map(|w| w.name.clone())
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            let silent: Vec<String> = {
                let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                active
                    .into_iter()
                    .filter(|name| {
                        workers
                            .get(name)
                            .is_none_or(|l| l.last_seen.elapsed() > Duration::from_millis(lease_ms))
                    })
                    .collect()
            };
            for name in silent {
                tracing::warn!(worker = %name, "worker silent for a lease; its jobs go back to the queue");
                let _ = shared
                    .submit(&state::Command::RemoveWorker {
                        now_ms: now,
                        name,
                        mode: state::Removal::Gone,
                    })
                    .await;
            }
        }
        // Expire the leases of the silent, once a new leader has given them time to return.
        if since.elapsed() > Duration::from_millis(lease_ms)
            && let Some(cmd) = shared
                .node
                .query(move |s| s.expire_round(now))
                .await
                .flatten()
            && let Ok(resp) = shared.submit(&cmd).await
        {
            tracing::info!(?resp, "expired leases");
        }
        // Lease ready jobs to the workers connected to this leader and offer them: one that
        // has not found the new leader yet would only see its offers fail.
        let term = view.term;
        let connected: BTreeSet<String> = {
            let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.keys().cloned().collect()
        };
        let Some(Some(cmd)) = shared
            .node
            .query(move |s| s.schedule_round_among(term, now, lease_ms, |w| connected.contains(w)))
            .await
        else {
            continue;
        };
        let granted = match shared.submit(&cmd).await {
            Ok(resp) => granted_leases(resp),
            Err(e) => {
                tracing::debug!(error = %e, "scheduling round not committed");
                continue;
            }
        };
        for lease in granted {
            let shared = shared.clone();
            tokio::spawn(async move { offer(&shared, lease).await });
        }
    }
}

fn granted_leases(resp: state::Response) -> Vec<state::GrantedLease> {
    match resp {
        state::Response::Leases { granted, .. } => granted,
        state::Response::Batch { responses } => {
            responses.into_iter().flat_map(granted_leases).collect()
        }
        _ => Vec::new(),
    }
}

/// Sends a leased job to its worker; a worker that cannot take it gives the job back.
async fn offer(shared: &Shared, lease: state::GrantedLease) {
    let job = lease.job;
    let worker = lease.worker.clone();
    let spec = shared
        .node
        .query(move |s| {
            let spec = s.job_spec(job)?;
            let req: ClusterBuildRequest = serde_json::from_str(spec.request).ok()?;
            let inputs: BTreeMap<usize, StageOutput> = spec
                .inputs
                .iter()
                .filter_map(|(i, r)| Some((*i, serde_json::from_str(&r.output).ok()?)))
                .collect();
            let stage_job = StageJob {
                id: job.0 as usize,
                dockerfile: req.dockerfile.clone(),
                options: req.options.clone(),
                build_platform: Platform::host(),
                target_platform: spec
                    .instance
                    .targets
                    .first()
                    .cloned()
                    .unwrap_or_else(|| spec.instance.platform.clone()),
                stage: spec.instance.index,
                inputs,
                context: std::path::PathBuf::new(),
                show_platform: req.platforms.len() > 1,
                no_cache: req.no_cache,
                secrets: BTreeMap::new(),
                allow_host_network: req.allow_host_network,
                compression: req.compression,
            };
            let note = format!(
                "stage {} ({}) runs on worker {}",
                spec.instance.name, spec.instance.platform, worker
            );
            let json = serde_json::to_vec(&ClusterJob {
                job: stage_job,
                context_id: Some(req.context_id),
            })
            .ok()?;
            Some((json, spec.build.0, note))
        })
        .await
        .flatten();
    let conn = {
        let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.get(&lease.worker).map(|l| l.conn.clone())
    };
    let refused = match (spec, conn) {
        (Some((job_json, build, note)), Some(conn)) => {
            let offer = CoordinatorToWorker::Offer(wire::JobOffer {
                job_id: job.0,
                epoch: lease.token.epoch,
                term: lease.token.term,
                deadline_ms: lease.deadline_ms,
                job_json,
            });
            match wire::request::<WorkerMsg>(&conn, &offer).await {
                Ok(WorkerMsg::Ack(a)) if a.accepted => {
                    // Where each stage runs, for the build's watchers.
                    if let Ok(json) =
                        serde_json::to_vec(&strata_shared::progress::Event::Note { text: note })
                    {
                        let mut events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
                        events.entry(build).or_default().push(json);
                    }
                    None
                }
                Ok(WorkerMsg::Ack(a)) => Some(format!("the worker refused the job: {}", a.reason)),
                Ok(other) => Some(format!("unexpected answer to an offer: {other:?}")),
                Err(e) => Some(format!("offering the job failed: {e}")),
            }
        }
        (None, _) => Some("the job's request could not be read".into()),
        (_, None) => Some(format!(
            "worker {} is not connected to the leader",
            lease.worker
        )),
    };
    if let Some(error) = refused {
        tracing::warn!(job = %job, worker = %lease.worker, %error, "offer failed; the job goes back");
        let _ = shared
            .submit(&state::Command::FailJob {
                now_ms: now_ms(),
                job,
                token: lease.token,
                failure: state::Failure::Worker { error },
            })
            .await;
    }
}

/// This node's answer to `strata status`: itself as it sees itself, the other coordinators
/// as configured (with what this node knows of them), and the replicated queue and workers.
async fn status(shared: &Shared) -> StatusReply {
    let config = &shared.config;
    let view = shared.node.view();
    let mut members: BTreeSet<u64> = view.voters.iter().chain(&view.learners).copied().collect();
    if members.is_empty() {
        // Not initialised yet (a joining node): the configured peers.
        members.extend(config.peers.iter().map(|p| p.id));
    }
    members.insert(config.node_id);
    // The leader knows how far each member has replicated and whether it is heard from.
    let asked: Vec<u64> = members.iter().copied().collect();
    let progress: BTreeMap<u64, (u64, bool)> = shared
        .node
        .inspect(move |n| {
            asked
                .iter()
                .filter_map(|m| Some((*m, (n.matched(*m)?, n.recently_active(*m)?))))
                .collect()
        })
        .await
        .unwrap_or_default();
    let nodes = members
        .into_iter()
        .map(|id| {
            let me = id == config.node_id;
            let state = if me && view.removed {
                RaftState::Unknown
            } else if me {
                match view.role {
                    "leader" => RaftState::Leader,
                    "follower" if view.learners.contains(&id) => RaftState::Learner,
                    "follower" => RaftState::Follower,
                    "pre-candidate" => RaftState::PreCandidate,
                    _ => RaftState::Candidate,
                }
            } else if view.leader == Some(id) {
                RaftState::Leader
            } else if view.learners.contains(&id) {
                RaftState::Learner
            } else if progress.contains_key(&id) {
                RaftState::Follower
            } else {
                RaftState::Unknown
            };
            let (matched, active) = progress.get(&id).copied().unwrap_or((0, false));
            let peer = shared.node.peer(id);
            NodeStatus {
                id,
                name: peer
                    .as_ref()
                    .map_or_else(|| format!("node {id}"), |p| p.name.clone()),
                addr: peer.map_or_else(|| "unknown".into(), |p| p.addr.to_string()),
                state,
                term: if me { view.term } else { 0 },
                // Of another member: what it holds, as far as the leader knows.
                commit_index: if me { view.commit_index } else { matched },
                applied_index: if me { view.applied_index } else { 0 },
                reachable: me || active || (progress.is_empty() && view.leader.is_some()),
            }
        })
        .collect();
    let (workers, queue) = shared
        .node
        .query(|s| {
            let workers = s
                .workers()
                .filter(|w| w.state != state::WorkerState::Gone)
                .map(|w| wire::WorkerStatus {
                    name: w.name.clone(),
                    native: w.capabilities.native.iter().map(ToString::to_string).collect(),
                    emulated: w.capabilities.emulated.iter().map(ToString::to_string).collect(),
                    capacity: w.capacity,
                    running: s
                        .jobs()
                        .filter(|j| matches!(&j.state, state::JobState::Leased(l) if l.worker == w.name))
                        .map(|j| j.id.0)
                        .collect(),
                    last_seen_ms: 0,
                    labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
                .collect::<Vec<_>>();
            let queue = s
                .builds()
                .filter(|b| !b.status.is_finished())
                .map(|b| wire::BuildStatus {
                    build_id: b.id.0,
                    submitter: b.tenant.clone(),
                    state: b.status.name().to_string(),
                    jobs_total: b.jobs.len() as u32,
                    jobs_done: b
                        .jobs
                        .iter()
                        .filter(|j| matches!(s.job(**j).map(|j| &j.state), Some(state::JobState::Done { .. })))
                        .count() as u32,
                    submitted_ms: b.submitted_at_ms,
                })
                .collect::<Vec<_>>();
            (workers, queue)
        })
        .await
        .unwrap_or_default();
    StatusReply {
        nodes,
        leader: shared.node.leader_addr(),
        workers,
        queue,
    }
}
