//! [`RaftNode`]: one member of the Raft group, driving raft-rs's `RawNode` over the redb log
//! ([`RedbStorage`]) and the application's [`StateMachine`].
//!
//! No network and no clock inside: the caller ticks, steps incoming messages, calls
//! [`RaftNode::handle_ready`] and then ships [`RaftNode::take_outgoing`]. `handle_ready` follows
//! raft-rs's documented order (see `examples/five_mem_node` in raft-rs):
//!
//! 1. take the Ready; the leader's messages may be sent before its own append is durable (Raft
//!    thesis 10.2.1), but we hand every message to the caller only after step 2 anyway;
//! 2. persist the snapshot, the new entries and the hard state in ONE fsync'd redb transaction
//!    (a Ready that only moves the commit index, `must_sync` false, is not fsync'd: the commit
//!    index rides along with the next transaction);
//! 3. restore the state machine from the snapshot, if any;
//! 4. apply the committed entries (normal entries to the state machine, conf changes to raft-rs
//!    and to the stored conf state) and resolve the proposals they answer;
//! 5. queue the persisted messages (votes, append responses: only valid once step 2 is done);
//! 6. `advance`, then handle the LightReady: commit index, messages, more committed entries;
//!    `advance_apply`;
//! 7. when the applied index is `snapshot_threshold` past the last snapshot (or raft-rs asked for
//!    a snapshot the store could not serve) take a state-machine snapshot, store it, compact.
//!
//! Proposals are tagged (entry context: format byte, node id, incarnation, sequence number) and
//! remembered by the log index they were appended at; when that index is applied the node
//! answers the proposal with the state machine's response if the entry carries its tag, or
//! [`ProposalError::Dropped`] if another entry took the index (leadership changed before the
//! proposal committed). The incarnation is bumped in the store at every open, so tags of entries
//! proposed before a restart never match a new proposal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};

use super::logger::tracing_logger;
use super::storage::{RedbStorage, StoreOptions};
use super::{RaftConfig, RaftError, StateMachine};

/// Format byte of the proposal tag carried in entry contexts.
const TAG_FORMAT: u8 = 1;
/// Format version of snapshot images (`u32` LE header before the state machine's bytes).
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Identifies a proposal made through one [`RaftNode`] value (unique for its lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId(pub u64);

/// Why a proposal did not take effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    /// Another entry was committed at the proposal's index: this node lost leadership before
    /// the proposal committed. It will never apply; propose again to the new leader.
    #[error("dropped: another entry was committed at index {index}")]
    Dropped { index: u64 },
    /// The node installed a snapshot covering the proposal's index, so whether the proposal was
    /// part of it is unknown. Make commands idempotent or check the state.
    #[error("outcome unknown: a snapshot covering index {index} replaced the log")]
    Unknown { index: u64 },
    /// The membership change was committed but raft-rs refused to apply it (same on every node).
    #[error("membership change refused: {0}")]
    Refused(String),
}

/// The outcome of one proposal, delivered by [`RaftNode::take_responses`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposalResponse {
    pub id: ProposalId,
    /// The log index the proposal was appended at.
    pub index: u64,
    /// The state machine's response (empty for membership changes), or why it did not apply.
    pub result: Result<Vec<u8>, ProposalError>,
}

/// A membership change, committed through the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Adds a voter (or promotes a learner). Start the new node with no bootstrap peers first.
    AddVoter(u64),
    /// Adds a non-voting member that receives the log.
    AddLearner(u64),
    /// Removes a member. A removed leader hands leadership to the most caught-up voter.
    Remove(u64),
}

/// A message for the transport to deliver to node `to`.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: u64,
    pub message: Message,
}

impl Outgoing {
    /// The protobuf encoding (raft-rs's `eraftpb::Message`), for [`RaftNode::step_bytes`].
    pub fn encode(&self) -> Vec<u8> {
        encode_message(&self.message)
    }

    /// A snapshot: the transport must call [`RaftNode::report_snapshot`] on the sender with
    /// whether it was delivered.
    pub fn is_snapshot(&self) -> bool {
        self.message.get_msg_type() == MessageType::MsgSnapshot
    }
}

/// Encodes a raft message. Encoding a well-formed message cannot fail.
pub fn encode_message(message: &Message) -> Vec<u8> {
    message
        .write_to_bytes()
        .expect("protobuf encoding of a raft message")
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Durable write transactions for Readies.
    pub ready_writes: u64,
    /// Entries applied to the state machine (normal and conf change, no-ops excluded).
    pub entries_applied: u64,
    /// Snapshots taken of the local state machine (log compactions).
    pub snapshots_created: u64,
    /// MsgSnapshot messages emitted to followers.
    pub snapshots_sent: u64,
    /// Snapshots received from a leader and restored.
    pub snapshots_applied: u64,
}

struct Pending {
    id: ProposalId,
    tag: Vec<u8>,
}

/// One Raft member. See the module documentation for the driving protocol.
pub struct RaftNode<S: StateMachine> {
    id: u64,
    dir: PathBuf,
    config: RaftConfig,
    raw: RawNode<RedbStorage>,
    state_machine: S,
    incarnation: u64,
    next_seq: u64,
    /// Proposals awaiting the application of their index, by index.
    pending: BTreeMap<u64, Pending>,
    responses: Vec<ProposalResponse>,
    outgoing: Vec<Outgoing>,
    applied: u64,
    removed: bool,
    poisoned: bool,
    stats: NodeStats,
}

impl<S: StateMachine> RaftNode<S> {
    /// Opens (or creates) node `id`'s store under `dir` and rebuilds the state machine.
    ///
    /// - A brand-new store with `bootstrap_voters` non-empty (they must include `id`) becomes
    ///   an initial member of a new cluster; every initial member must get the same list.
    /// - A brand-new store with no bootstrap voters waits to be added by a membership change
    ///   and receives a snapshot from the leader.
    /// - An existing store ignores `bootstrap_voters`: it recovers its hard state, log, conf
    ///   state and last snapshot; the state machine is restored from the snapshot and the
    ///   committed entries after it are applied again by the next [`handle_ready`] calls.
    ///
    /// [`handle_ready`]: Self::handle_ready
    pub fn open(
        id: u64,
        dir: &Path,
        bootstrap_voters: &[u64],
        mut state_machine: S,
        config: RaftConfig,
    ) -> Result<Self, RaftError> {
        config.validate(id)?;
        let options = StoreOptions {
            shared_readers: config.shared_readers,
            in_memory: config.in_memory,
        };
        let (mut store, info) = RedbStorage::open(dir, id, options)?;
        if store.is_empty() && !bootstrap_voters.is_empty() {
            if !bootstrap_voters.contains(&id) {
                return Err(RaftError::Config(format!(
                    "bootstrap voters {bootstrap_voters:?} do not include this node ({id})"
                )));
            }
            let mut voters = bootstrap_voters.to_vec();
            voters.sort_unstable();
            voters.dedup();
            store.bootstrap(&voters, wrap_image(state_machine.snapshot()))?;
            tracing::info!(target: "strata::raft", node = id, ?voters, "bootstrapped a new cluster");
        } else if !store.is_empty() && !bootstrap_voters.is_empty() {
            tracing::debug!(
                target: "strata::raft",
                node = id,
                "existing raft state found; bootstrap voters ignored"
            );
        }
        let snapshot_index = store.snapshot_metadata().index;
        if snapshot_index > 0 {
            let image = store.snapshot_data()?;
            restore(&mut state_machine, snapshot_index, &image)?;
        }
        let raft_config = config.to_raft(id, snapshot_index);
        let raw = RawNode::new(&raft_config, store, &tracing_logger())?;
        tracing::info!(
            target: "strata::raft",
            node = id,
            incarnation = info.incarnation,
            snapshot_index,
            term = raw.raft.term,
            commit = raw.raft.raft_log.committed,
            last_index = raw.raft.raft_log.last_index(),
            "raft node opened"
        );
        Ok(RaftNode {
            id,
            dir: dir.to_path_buf(),
            config,
            raw,
            state_machine,
            incarnation: info.incarnation,
            next_seq: 1,
            pending: BTreeMap::new(),
            responses: Vec::new(),
            outgoing: Vec::new(),
            applied: snapshot_index,
            removed: false,
            poisoned: false,
            stats: NodeStats::default(),
        })
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Advances the logical clock by one tick (elections, heartbeats). Call
    /// [`handle_ready`](Self::handle_ready) afterwards.
    pub fn tick(&mut self) {
        self.raw.tick();
        // A removed leader's first hand-over can fail (the successor had not applied the
        // removal yet and refused to campaign); raft-rs aborts it after an election timeout.
        if self.removed && self.is_leader() && self.raw.raft.lead_transferee.is_none() {
            let _ = self.hand_over_leadership();
        }
    }

    /// Starts an election now (e.g. a single-node cluster at start-up, or tests).
    pub fn campaign(&mut self) -> Result<(), RaftError> {
        self.check()?;
        Ok(self.raw.campaign()?)
    }

    /// Proposes a command for the state machine. Only the leader accepts; the outcome arrives
    /// through [`take_responses`](Self::take_responses) once the entry's index is applied.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<ProposalId, RaftError> {
        self.check()?;
        if data.is_empty() {
            return Err(RaftError::EmptyProposal);
        }
        self.ensure_leader()?;
        let (id, tag, index) = self.next_tag();
        self.raw.propose(tag.clone(), data).map_err(propose_error)?;
        self.track(id, tag, index)
    }

    /// Proposes a membership change (one at a time), committed through the log.
    pub fn propose_conf_change(
        &mut self,
        change: MembershipChange,
    ) -> Result<ProposalId, RaftError> {
        self.check()?;
        self.ensure_leader()?;
        if self.raw.raft.has_pending_conf() {
            return Err(RaftError::ConfChangeInProgress);
        }
        let mut cc = ConfChange::default();
        let (change_type, node_id) = match change {
            MembershipChange::AddVoter(n) => (ConfChangeType::AddNode, n),
            MembershipChange::AddLearner(n) => (ConfChangeType::AddLearnerNode, n),
            MembershipChange::Remove(n) => (ConfChangeType::RemoveNode, n),
        };
        if node_id == 0 {
            return Err(RaftError::Config("node id 0 is reserved".to_string()));
        }
        cc.set_change_type(change_type);
        cc.node_id = node_id;
        let (id, tag, index) = self.next_tag();
        self.raw
            .propose_conf_change(tag.clone(), cc)
            .map_err(propose_error)?;
        self.track(id, tag, index)
    }

    /// Hands leadership to `to` (a caught-up voter); best effort.
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// Feeds a message received from the transport. Responses from peers no longer in the
    /// configuration are ignored.
    pub fn step(&mut self, message: Message) -> Result<(), RaftError> {
        self.check()?;
        if message.to != self.id {
            return Err(RaftError::WrongRecipient {
                to: message.to,
                me: self.id,
            });
        }
        match self.raw.step(message) {
            Ok(()) => Ok(()),
            Err(raft::Error::StepPeerNotFound) => {
                tracing::debug!(target: "strata::raft", node = self.id, "message from a peer not in the configuration ignored");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`step`](Self::step) for the bytes of an [`Outgoing::encode`]d message.
    pub fn step_bytes(&mut self, bytes: &[u8]) -> Result<(), RaftError> {
        let message =
            Message::parse_from_bytes(bytes).map_err(|e| RaftError::Decode(e.to_string()))?;
        self.step(message)
    }

    /// The transport could not reach `to`: the leader stops pipelining to it and probes.
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    /// The transport delivered (or failed to deliver) a snapshot message to `to`.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// Does all the work raft-rs has ready, in the documented order (module documentation):
    /// after it returns, the new entries and hard state are durable, committed entries are
    /// applied, and the messages that depend on them are in [`take_outgoing`](Self::take_outgoing).
    ///
    /// An error leaves the node unusable ([`RaftError::Poisoned`] afterwards): reopen it from
    /// its directory.
    pub fn handle_ready(&mut self) -> Result<(), RaftError> {
        self.check()?;
        let result = self.handle_ready_inner();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn handle_ready_inner(&mut self) -> Result<(), RaftError> {
        // raft-rs may have asked for a fresh snapshot while stepping a message (a follower
        // needs one the store cannot serve) without producing a Ready.
        self.maybe_snapshot()?;
        while self.raw.has_ready() {
            let mut ready = self.raw.ready();

            // 1. The leader's messages (safe to send before its own append is durable).
            let messages = ready.take_messages();
            self.queue(messages);

            // 2. Snapshot + entries + hard state: one durable transaction. A Ready whose only
            //    change is the commit index (`must_sync` false) needs no fsync: the commit index
            //    is kept in memory and written with the next transaction, as for LightReady.
            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            if ready.must_sync() || snapshot.is_some() || !ready.entries().is_empty() {
                self.raw.mut_store().persist_ready(
                    snapshot.as_ref(),
                    ready.entries(),
                    ready.hs(),
                )?;
                self.stats.ready_writes += 1;
            } else if let Some(hs) = ready.hs() {
                self.raw.mut_store().set_commit(hs.commit);
            }

            // 3. A snapshot from the leader replaces the state machine.
            if let Some(snapshot) = snapshot {
                self.install_snapshot(&snapshot)?;
            }

            // 4. Entries committed in earlier Readies.
            let committed = ready.take_committed_entries();
            self.apply_entries(committed)?;

            // 5. Messages that must wait for step 2 (votes, append responses).
            let persisted = ready.take_persisted_messages();
            self.queue(persisted);

            // 6. Advance; the LightReady carries what step 2 made possible.
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit);
            }
            let messages = light.take_messages();
            self.queue(messages);
            let committed = light.take_committed_entries();
            self.apply_entries(committed)?;
            self.raw.advance_apply();

            // 7. Snapshot and compaction.
            self.maybe_snapshot()?;
        }
        Ok(())
    }

    /// Messages to deliver, in order. Each was produced after the state it depends on was made
    /// durable.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outgoing)
    }

    /// Outcomes of this node's proposals, in log order.
    pub fn take_responses(&mut self) -> Vec<ProposalResponse> {
        std::mem::take(&mut self.responses)
    }

    /// The leader this node knows of.
    pub fn leader_id(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            0 => None,
            id => Some(id),
        }
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Whether this node is the leader (of its term; a partitioned old leader believes it is
    /// until check-quorum makes it step down).
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Raft role (follower, candidate, pre-candidate, leader).
    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    /// The highest index known to be committed.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The highest index applied to the state machine.
    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// The index of the last entry in the log.
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// The membership as of the applied index.
    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    /// On the leader: the highest log index known to be replicated on `peer`.
    pub fn matched(&self, peer: u64) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        self.raw.raft.prs().get(peer).map(|p| p.matched)
    }

    /// On the leader: whether `peer` has been heard from within the last election timeout.
    pub fn recently_active(&self, peer: u64) -> Option<bool> {
        if !self.is_leader() {
            return None;
        }
        self.raw.raft.prs().get(peer).map(|p| p.recent_active)
    }

    /// True once this node applied a membership change removing it; the caller should stop it.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// The state machine (read-only; it changes only through the log).
    pub fn state_machine(&self) -> &S {
        &self.state_machine
    }

    /// The log store (read-only).
    pub fn storage(&self) -> &RedbStorage {
        self.raw.store()
    }

    /// The node's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the node was opened with.
    pub fn config(&self) -> &RaftConfig {
        &self.config
    }

    /// Counters since open.
    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    fn check(&self) -> Result<(), RaftError> {
        if self.poisoned {
            return Err(RaftError::Poisoned {
                id: self.id,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    fn ensure_leader(&self) -> Result<(), RaftError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(RaftError::NotLeader {
                leader_id: self.leader_id(),
            })
        }
    }

    /// The next proposal id, its tag and the index the proposal will be appended at.
    fn next_tag(&mut self) -> (ProposalId, Vec<u8>, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut tag = Vec::with_capacity(25);
        tag.push(TAG_FORMAT);
        tag.extend_from_slice(&self.id.to_be_bytes());
        tag.extend_from_slice(&self.incarnation.to_be_bytes());
        tag.extend_from_slice(&seq.to_be_bytes());
        (
            ProposalId(seq),
            tag,
            self.raw.raft.raft_log.last_index() + 1,
        )
    }

    fn track(&mut self, id: ProposalId, tag: Vec<u8>, index: u64) -> Result<ProposalId, RaftError> {
        if self.raw.raft.raft_log.last_index() != index {
            // raft-rs accepted but did not append: treat as dropped.
            return Err(RaftError::ProposalDropped);
        }
        self.pending.insert(index, Pending { id, tag });
        Ok(id)
    }

    fn queue(&mut self, messages: Vec<Message>) {
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.stats.snapshots_sent += 1;
            }
            self.outgoing.push(Outgoing {
                to: message.to,
                message,
            });
        }
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let index = snapshot.get_metadata().index;
        restore(&mut self.state_machine, index, &snapshot.data)?;
        self.applied = index;
        self.stats.snapshots_applied += 1;
        self.note_membership(snapshot.get_metadata().get_conf_state());
        // Our proposals at or below the snapshot: their fate is not in our log any more.
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (at, pending) = entry.remove_entry();
            self.responses.push(ProposalResponse {
                id: pending.id,
                index: at,
                result: Err(ProposalError::Unknown { index: at }),
            });
        }
        tracing::info!(
            target: "strata::raft",
            node = self.id,
            index,
            term = snapshot.get_metadata().term,
            "state machine restored from a leader's snapshot"
        );
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for entry in entries {
            let index = entry.index;
            if index <= self.applied {
                // Already covered by the snapshot the state machine was restored from.
                continue;
            }
            let outcome = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Ok(Vec::new()),
                EntryType::EntryNormal => {
                    self.stats.entries_applied += 1;
                    Ok(self.state_machine.apply(index, &entry.data))
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|e| {
                        RaftError::Decode(format!("conf change at index {index}: {e}"))
                    })?;
                    let result = self.raw.apply_conf_change(&cc);
                    self.conf_change_applied(index, result)?
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| {
                        RaftError::Decode(format!("conf change at index {index}: {e}"))
                    })?;
                    let result = self.raw.apply_conf_change(&cc);
                    self.conf_change_applied(index, result)?
                }
            };
            self.applied = index;
            self.resolve(index, &entry.context, outcome);
        }
        Ok(())
    }

    /// Records the outcome of `RawNode::apply_conf_change` for the entry at `index`.
    fn conf_change_applied(
        &mut self,
        index: u64,
        result: raft::Result<ConfState>,
    ) -> Result<Result<Vec<u8>, ProposalError>, RaftError> {
        self.stats.entries_applied += 1;
        match result {
            Ok(cs) => {
                tracing::info!(target: "strata::raft", node = self.id, index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                self.raw.mut_store().set_conf_state(cs.clone())?;
                self.note_membership(&cs);
                Ok(Ok(Vec::new()))
            }
            Err(e) => {
                // Deterministic: every node refuses the same committed change.
                tracing::warn!(target: "strata::raft", node = self.id, index, error = %e, "membership change refused");
                Ok(Err(ProposalError::Refused(e.to_string())))
            }
        }
    }

    /// Notices this node's own removal; a removed leader hands over leadership.
    fn note_membership(&mut self, cs: &ConfState) {
        let member = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .any(|id| *id == self.id);
        // An uninitialised (joining) node has an empty configuration until its first snapshot.
        if member || cs.voters.is_empty() {
            self.removed = false;
            return;
        }
        if !self.removed {
            tracing::info!(target: "strata::raft", node = self.id, "this node was removed from the cluster");
        }
        self.removed = true;
        if self.is_leader() {
            let _ = self.hand_over_leadership();
        }
    }

    /// On the leader: transfers leadership to the most caught-up other voter (lowest id on
    /// ties), as a removed leader does, or one about to stop. The successor, if there is one.
    pub fn hand_over_leadership(&mut self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let conf = self.raw.raft.prs().conf();
        let successor = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id && conf.voters().contains(**id))
            .max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id);
        if let Some(successor) = successor {
            tracing::info!(target: "strata::raft", node = self.id, successor, "leader hands over leadership");
            self.raw.transfer_leader(successor);
        }
        successor
    }

    fn resolve(&mut self, index: u64, context: &[u8], outcome: Result<Vec<u8>, ProposalError>) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (at, pending) = entry.remove_entry();
            let result = if at == index && context == pending.tag.as_slice() {
                outcome.clone()
            } else {
                Err(ProposalError::Dropped { index: at })
            };
            self.responses.push(ProposalResponse {
                id: pending.id,
                index: at,
                result,
            });
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), RaftError> {
        let wanted = self.raw.store().take_snapshot_wanted();
        let last = self.raw.store().snapshot_metadata().index;
        if self.applied <= last || (!wanted && self.applied - last < self.config.snapshot_threshold)
        {
            return Ok(());
        }
        let image = wrap_image(self.state_machine.snapshot());
        let conf_state = self.conf_state();
        let applied = self.applied;
        let committed = self.raw.raft.raft_log.committed;
        let store = self.raw.mut_store();
        store.set_commit(committed);
        store.create_snapshot(applied, conf_state, image)?;
        let compact_to = (applied + 1).saturating_sub(self.config.retain_entries);
        store.compact(compact_to)?;
        self.stats.snapshots_created += 1;
        tracing::debug!(target: "strata::raft", node = self.id, index = applied, wanted, "snapshot taken, log compacted");
        Ok(())
    }
}

fn propose_error(e: raft::Error) -> RaftError {
    match e {
        raft::Error::ProposalDropped => RaftError::ProposalDropped,
        other => RaftError::Raft(other),
    }
}

/// Prefixes a state-machine image with the snapshot format version.
fn wrap_image(image: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(image.len() + 4);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    out.extend_from_slice(&image);
    out
}

fn restore<S: StateMachine>(
    state_machine: &mut S,
    index: u64,
    image: &[u8],
) -> Result<(), RaftError> {
    let Some((version, body)) = image.split_first_chunk::<4>() else {
        return Err(RaftError::SnapshotFormat {
            index,
            message: format!("{} bytes, shorter than the format header", image.len()),
        });
    };
    let version = u32::from_le_bytes(*version);
    if version != SNAPSHOT_FORMAT {
        return Err(RaftError::SnapshotFormat {
            index,
            message: format!(
                "format version {version} is not supported (this program reads {SNAPSHOT_FORMAT})"
            ),
        });
    }
    state_machine
        .restore(body)
        .map_err(|message| RaftError::Restore { index, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::sim::RecordingMachine;

    #[test]
    fn snapshot_images_carry_a_format_version() {
        let mut sm = RecordingMachine::default();
        sm.apply(5, b"x");
        let image = wrap_image(sm.snapshot());
        let mut restored = RecordingMachine::default();
        restore(&mut restored, 5, &image).unwrap();
        assert_eq!(restored.values(), ["x"]);

        let mut future = image.clone();
        future[..4].copy_from_slice(&2u32.to_le_bytes());
        let err = restore(&mut restored, 5, &future).unwrap_err();
        assert!(
            err.to_string()
                .contains("format version 2 is not supported"),
            "{err}"
        );
        assert!(matches!(
            restore(&mut restored, 5, &[1, 0]),
            Err(RaftError::SnapshotFormat { index: 5, .. })
        ));
        assert!(matches!(
            restore(&mut restored, 5, &wrap_image(vec![9])),
            Err(RaftError::Restore { index: 5, .. })
        ));
    }
}
