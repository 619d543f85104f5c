//! The task that owns the [`RaftNode`]: it ticks the Raft clock, steps what peers send, takes
//! proposals and membership changes, persists and applies what is ready, and hands outgoing
//! messages to one sender task per peer (started on demand from the address book). Everything
//! else talks to it through a [`NodeHandle`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_shared::tls::{self, Role};
use strata_shared::wire::{self, Hello, PeerMsg, RaftMessage};
use tokio::sync::{mpsc, oneshot, watch};

use super::{ClusterState, PEER_QUEUE, PROPOSAL_TIMEOUT, ProposeError};
use crate::config::{CoordinatorConfig, Peer};
use crate::raft::{self, RaftNode};
use crate::state;

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

type Inspect = Box<dyn FnOnce(&RaftNode<ClusterState>) + Send>;
type Reply = oneshot::Sender<Result<Vec<u8>, ProposeError>>;

enum Request {
    /// A Raft message from peer `from`.
    Step(u64, Vec<u8>),
    /// A member says this node was removed from the group.
    Removed(wire::RemovedNotice),
    /// This node is stopping: if it leads, hand leadership over.
    HandOver(oneshot::Sender<Option<u64>>),
    Unreachable(u64),
    /// A snapshot message to the peer was delivered, or not.
    SnapshotSent(u64, bool),
    Propose(Vec<u8>, Reply),
    ConfChange(raft::MembershipChange, Reply),
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

    /// The view as it changes.
    pub fn watch(&self) -> watch::Receiver<NodeView> {
        self.view.clone()
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

    /// If this node leads, hands leadership to the most caught-up other voter; the successor.
    pub async fn hand_over(&self) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Request::HandOver(tx)).await.ok()?;
        rx.await.ok().flatten()
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
        self.inspect(move |node| f(&node.state_machine().0)).await
    }
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
/// known, and stop when it leaves the group. Without a `dialer` (a single-node group in one
/// process) nothing is ever sent to another node.
pub(super) fn start_node(
    mut node: RaftNode<ClusterState>,
    config: &CoordinatorConfig,
    dialer: Option<quinn::Endpoint>,
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
                        Request::HandOver(reply) => {
                            let _ = reply.send(node.hand_over_leadership());
                        }
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

/// Reads what another coordinator sends on its connection: one message per unidirectional
/// stream, handed to the Raft task.
pub(super) async fn serve_peer(conn: &quinn::Connection, node: &NodeHandle) {
    while let Ok(mut stream) = conn.accept_uni().await {
        let tx = node.tx.clone();
        tokio::spawn(async move {
            match wire::read_frame::<PeerMsg>(&mut stream).await {
                Ok(PeerMsg::Raft(m)) => {
                    let _ = tx.send(Request::Step(m.from, m.bytes)).await;
                }
                Ok(PeerMsg::Removed(notice)) => {
                    let _ = tx.send(Request::Removed(notice)).await;
                }
                Err(e) => tracing::debug!(error = %e, "unreadable peer message"),
            }
        });
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
    dialer: Option<quinn::Endpoint>,
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
            let Some(dialer) = self.dialer.clone() else {
                return false;
            };
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
                dialer,
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
