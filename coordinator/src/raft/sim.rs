//! A deterministic Raft cluster in one process: real [`RaftNode`]s with real redb stores (each in
//! its own directory under a base directory the caller owns, e.g. a `tempfile::TempDir`), a
//! manual clock, and a simulated network whose links can be cut.
//!
//! Time only moves when the test calls [`Cluster::tick`]: every live node ticks once, then the
//! network *settles*: each node handles its Ready, its outgoing messages are delivered (encoded
//! and decoded, as a transport would) in a fixed order, and so on until no message is in flight.
//! Election timeouts are fixed per node (staggered by id) unless the configuration sets its own
//! bounds, so a run is a pure function of the test's actions.
//!
//! Faults: [`Cluster::cut`] / [`Cluster::cut_one_way`] drop a link, [`Cluster::partition`] and
//! [`Cluster::isolate`] drop every link across a group, [`Cluster::heal`] restores all links;
//! [`Cluster::crash`] drops a node without any shutdown step (what is not in redb is lost) and
//! [`Cluster::restart`] reopens it from its directory. Dropped messages are reported to the
//! sender as unreachable (and failed snapshots as such), as the QUIC transport does.
//!
//! [`RecordingMachine`] is a trivial state machine (the list of applied commands) for checking
//! that every node applied the same commands once each, in order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use raft::Storage as _;
use raft::eraftpb::{Message, MessageType};

use super::node::{Outgoing, ProposalId, ProposalResponse, RaftNode};
use super::{MembershipChange, RaftConfig, RaftError, StateMachine};

/// Rounds of message exchange after which a tick is considered not to settle (a livelock).
const MAX_SETTLE_ROUNDS: usize = 10_000;

/// `run_until` gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("condition not reached within {ticks} ticks")]
pub struct Timeout {
    pub ticks: u64,
}

/// What the simulated network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub delivered: u64,
    pub dropped: u64,
    pub snapshots_delivered: u64,
}

struct Slot<S: StateMachine> {
    node: Option<RaftNode<S>>,
    dir: PathBuf,
    config: RaftConfig,
    responses: Vec<ProposalResponse>,
}

/// N in-process nodes on a simulated network. See the module documentation.
pub struct Cluster<S: StateMachine> {
    base: PathBuf,
    config: RaftConfig,
    new_state_machine: Box<dyn Fn(u64) -> S>,
    nodes: BTreeMap<u64, Slot<S>>,
    /// Directed links that drop every message.
    cut: BTreeSet<(u64, u64)>,
    ticks: u64,
    net: NetStats,
}

impl<S: StateMachine> fmt::Debug for Cluster<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Cluster");
        d.field("ticks", &self.ticks);
        for (id, slot) in &self.nodes {
            match &slot.node {
                Some(n) => d.field(
                    &format!("node{id}"),
                    &format_args!(
                        "{:?} term={} leader={:?} commit={} applied={} last={}",
                        n.role(),
                        n.term(),
                        n.leader_id(),
                        n.commit_index(),
                        n.applied_index(),
                        n.last_index()
                    ),
                ),
                None => d.field(&format!("node{id}"), &"crashed"),
            };
        }
        d.field("cut", &self.cut).finish()
    }
}

impl<S: StateMachine> Cluster<S> {
    /// Bootstraps a new cluster of `voters` nodes with ids `1..=voters`, stores under
    /// `base/node-<id>`. `new_state_machine(id)` makes each node's (empty) state machine, also
    /// on restart.
    pub fn new(
        base: &Path,
        voters: u64,
        config: RaftConfig,
        new_state_machine: impl Fn(u64) -> S + 'static,
    ) -> Result<Self, RaftError> {
        let mut cluster = Cluster {
            base: base.to_path_buf(),
            config,
            new_state_machine: Box::new(new_state_machine),
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            ticks: 0,
            net: NetStats::default(),
        };
        let ids: Vec<u64> = (1..=voters).collect();
        for &id in &ids {
            cluster.open_node(id, &ids)?;
        }
        Ok(cluster)
    }

    /// The configuration node `id` runs with: the cluster's, with a fixed election timeout of
    /// `election_ticks + id - 1` unless the cluster's configuration sets the bounds.
    pub fn node_config(&self, id: u64) -> RaftConfig {
        let mut config = self.config.clone();
        if config.min_election_ticks == 0 && config.max_election_ticks == 0 {
            config.min_election_ticks = config.election_ticks + (id as usize - 1);
            config.max_election_ticks = config.min_election_ticks + 1;
        }
        config
    }

    fn open_node(&mut self, id: u64, bootstrap: &[u64]) -> Result<(), RaftError> {
        let dir = self.base.join(format!("node-{id}"));
        let config = self.node_config(id);
        let node = RaftNode::open(
            id,
            &dir,
            bootstrap,
            (self.new_state_machine)(id),
            config.clone(),
        )?;
        let slot = self.nodes.entry(id).or_insert(Slot {
            node: None,
            dir,
            config,
            responses: Vec::new(),
        });
        slot.node = Some(node);
        Ok(())
    }

    /// Every node id ever started (live or crashed), ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The ids of the nodes running now.
    pub fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, s)| s.node.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Node `id`; panics if it is unknown or crashed.
    pub fn node(&self, id: u64) -> &RaftNode<S> {
        self.try_node(id)
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// Node `id`, mutably; panics if it is unknown or crashed.
    pub fn node_mut(&mut self, id: u64) -> &mut RaftNode<S> {
        self.nodes
            .get_mut(&id)
            .and_then(|s| s.node.as_mut())
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// Node `id` if it is running.
    pub fn try_node(&self, id: u64) -> Option<&RaftNode<S>> {
        self.nodes.get(&id).and_then(|s| s.node.as_ref())
    }

    /// Node `id`'s directory.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.nodes
            .get(&id)
            .map(|s| s.dir.clone())
            .unwrap_or_else(|| self.base.join(format!("node-{id}")))
    }

    /// Ticks elapsed since the cluster was made.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Network counters.
    pub fn net_stats(&self) -> NetStats {
        self.net
    }

    /// The leader: the running node that believes it leads, in the highest term if an old,
    /// partitioned leader believes so too.
    pub fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter_map(|(id, s)| s.node.as_ref().map(|n| (*id, n)))
            .filter(|(_, n)| n.is_leader())
            .max_by_key(|(_, n)| n.term())
            .map(|(id, _)| id)
    }

    /// One tick of the clock on every running node, then the network settles.
    pub fn tick(&mut self) {
        self.ticks += 1;
        for slot in self.nodes.values_mut() {
            if let Some(node) = slot.node.as_mut() {
                node.tick();
            }
        }
        self.settle();
    }

    /// `n` ticks.
    pub fn run_ticks(&mut self, n: u64) {
        for _ in 0..n {
            self.tick();
        }
    }

    /// Settles, then ticks until `cond` holds (checked before every tick), at most `max_ticks`
    /// times. Returns the ticks used.
    pub fn run_until(
        &mut self,
        mut cond: impl FnMut(&Self) -> bool,
        max_ticks: u64,
    ) -> Result<u64, Timeout> {
        self.settle();
        for used in 0..=max_ticks {
            if cond(self) {
                return Ok(used);
            }
            if used < max_ticks {
                self.tick();
            }
        }
        Err(Timeout { ticks: max_ticks })
    }

    /// Runs until some node leads (and every running node in its partition agrees).
    pub fn wait_for_leader(&mut self, max_ticks: u64) -> Result<u64, Timeout> {
        self.run_until(|c| c.leader().is_some(), max_ticks)?;
        Ok(self.leader().expect("a leader"))
    }

    /// Proposes on node `id` (which must lead); settle or tick to make progress.
    pub fn propose(&mut self, id: u64, data: impl Into<Vec<u8>>) -> Result<ProposalId, RaftError> {
        self.node_mut(id).propose(data.into())
    }

    /// Proposes a membership change on node `id`.
    pub fn propose_conf_change(
        &mut self,
        id: u64,
        change: MembershipChange,
    ) -> Result<ProposalId, RaftError> {
        self.node_mut(id).propose_conf_change(change)
    }

    /// The outcome of proposal `proposal` made on node `id`, once known.
    pub fn response(&self, id: u64, proposal: ProposalId) -> Option<&ProposalResponse> {
        self.nodes
            .get(&id)?
            .responses
            .iter()
            .find(|r| r.id == proposal)
    }

    /// Every outcome collected from node `id` so far.
    pub fn responses(&self, id: u64) -> &[ProposalResponse] {
        self.nodes
            .get(&id)
            .map(|s| s.responses.as_slice())
            .unwrap_or_default()
    }

    /// Drops every message between `a` and `b`, both ways.
    pub fn cut(&mut self, a: u64, b: u64) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    /// Drops every message from `from` to `to`.
    pub fn cut_one_way(&mut self, from: u64, to: u64) {
        self.cut.insert((from, to));
    }

    /// Cuts every link between `group` and the other nodes (known now or added later is not
    /// covered: call again after adding nodes).
    pub fn partition(&mut self, group: &[u64]) {
        let others: Vec<u64> = self
            .ids()
            .into_iter()
            .filter(|id| !group.contains(id))
            .collect();
        for &a in group {
            for &b in &others {
                self.cut(a, b);
            }
        }
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&mut self, id: u64) {
        self.partition(&[id]);
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Drops node `id` on the floor: no shutdown step, in-flight messages to it are lost.
    /// What it made durable stays in its directory.
    pub fn crash(&mut self, id: u64) {
        if let Some(slot) = self.nodes.get_mut(&id) {
            slot.node = None;
        }
    }

    /// Reopens a crashed node from its directory with a fresh state machine.
    pub fn restart(&mut self, id: u64) -> Result<(), RaftError> {
        assert!(
            self.try_node(id).is_none(),
            "node {id} is running; crash it first"
        );
        self.open_node(id, &[])
    }

    /// Starts a new, empty node `id` that waits to be added with a membership change.
    pub fn add_node(&mut self, id: u64) -> Result<(), RaftError> {
        assert!(!self.nodes.contains_key(&id), "node {id} exists");
        self.open_node(id, &[])
    }

    /// Handles Readies and delivers messages until nothing is in flight.
    pub fn settle(&mut self) {
        for _ in 0..MAX_SETTLE_ROUNDS {
            let mut batch: Vec<(u64, Outgoing)> = Vec::new();
            for (id, slot) in self.nodes.iter_mut() {
                let Some(node) = slot.node.as_mut() else {
                    continue;
                };
                if let Err(e) = node.handle_ready() {
                    panic!("node {id}: handle_ready failed: {e}");
                }
                batch.extend(node.take_outgoing().into_iter().map(|o| (*id, o)));
                slot.responses.extend(node.take_responses());
            }
            if batch.is_empty() {
                return;
            }
            for (from, outgoing) in batch {
                self.deliver(from, outgoing);
            }
        }
        panic!("the network did not settle within {MAX_SETTLE_ROUNDS} rounds: {self:?}");
    }

    fn deliver(&mut self, from: u64, outgoing: Outgoing) {
        if let Some(sender) = self.try_node(from) {
            check_persisted_before_sent(sender, &outgoing.message);
        }
        let to = outgoing.to;
        let snapshot = outgoing.is_snapshot();
        let link_up = !self.cut.contains(&(from, to));
        let receiver = self.nodes.get_mut(&to).and_then(|s| s.node.as_mut());
        let delivered = match receiver {
            Some(node) if link_up => {
                if let Err(e) = node.step_bytes(&outgoing.encode()) {
                    panic!("node {to}: step of a message from {from} failed: {e}");
                }
                true
            }
            _ => false,
        };
        if delivered {
            self.net.delivered += 1;
            if snapshot {
                self.net.snapshots_delivered += 1;
            }
        } else {
            self.net.dropped += 1;
        }
        if let Some(sender) = self.nodes.get_mut(&from).and_then(|s| s.node.as_mut()) {
            if snapshot {
                sender.report_snapshot(to, delivered);
            }
            if !delivered {
                sender.report_unreachable(to);
            }
        }
    }

    /// The configuration a node was last opened with.
    pub fn config_of(&self, id: u64) -> Option<&RaftConfig> {
        self.nodes.get(&id).map(|s| &s.config)
    }
}

/// Raft's safety rests on acknowledgements being sent only after what they acknowledge is on
/// disk: a follower's append response after the entries, a vote after the vote record. Checked
/// against the sender's store on every delivery.
fn check_persisted_before_sent<S: StateMachine>(sender: &RaftNode<S>, message: &Message) {
    let store = sender.storage();
    let hs = store.hard_state();
    match message.get_msg_type() {
        MessageType::MsgAppendResponse if !message.reject => {
            let last = store.last_index().unwrap_or(0);
            assert!(
                message.index <= last,
                "node {} acknowledged index {} with only {} in its store",
                sender.id(),
                message.index,
                last
            );
        }
        MessageType::MsgRequestVoteResponse if !message.reject => {
            assert!(
                hs.term > message.term || (hs.term == message.term && hs.vote == message.to),
                "node {} granted its vote to {} in term {} before storing it (stored: {hs:?})",
                sender.id(),
                message.to,
                message.term
            );
        }
        _ => {}
    }
}

/// A state machine that records every command it applies, with its index. Its response to a
/// command is the index, as decimal text. Out-of-order or repeated indexes are recorded as
/// violations (a correct node never produces one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordingMachine {
    applied: Vec<(u64, Vec<u8>)>,
    restores: u64,
    violations: Vec<String>,
}

impl RecordingMachine {
    /// The applied commands as text, in order.
    pub fn values(&self) -> Vec<String> {
        self.applied
            .iter()
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The applied `(index, command)` pairs.
    pub fn applied(&self) -> &[(u64, Vec<u8>)] {
        &self.applied
    }

    /// How many snapshots were restored into this value.
    pub fn restores(&self) -> u64 {
        self.restores
    }

    /// Out-of-order or repeated applications seen.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }
}

impl StateMachine for RecordingMachine {
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        if let Some((last, _)) = self.applied.last()
            && index <= *last
        {
            self.violations
                .push(format!("index {index} applied after index {last}"));
        }
        self.applied.push((index, data.to_vec()));
        index.to_string().into_bytes()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.applied.len() as u64).to_le_bytes());
        for (index, data) in &self.applied {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if data.len() < n {
                return Err("truncated recording snapshot".to_string());
            }
            let (head, tail) = data.split_at(n);
            *data = tail;
            Ok(head)
        }
        fn take_u64(data: &mut &[u8]) -> Result<u64, String> {
            let bytes = take(data, 8)?;
            Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
        }
        let mut rest = data;
        let count = take_u64(&mut rest)?;
        let mut applied = Vec::new();
        for _ in 0..count {
            let index = take_u64(&mut rest)?;
            let len = usize::try_from(take_u64(&mut rest)?).map_err(|e| e.to_string())?;
            applied.push((index, take(&mut rest, len)?.to_vec()));
        }
        if !rest.is_empty() {
            return Err(format!(
                "{} trailing bytes in recording snapshot",
                rest.len()
            ));
        }
        self.applied = applied;
        self.restores += 1;
        Ok(())
    }
}

impl Cluster<RecordingMachine> {
    /// A cluster of [`RecordingMachine`]s.
    pub fn recording(base: &Path, voters: u64, config: RaftConfig) -> Result<Self, RaftError> {
        Cluster::new(base, voters, config, |_| RecordingMachine::default())
    }

    /// Node `id`'s applied commands as text.
    pub fn values(&self, id: u64) -> Vec<String> {
        self.node(id).state_machine().values()
    }
}
