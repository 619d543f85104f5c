//! The coordinator's consensus core: a Raft group of 1, 3 or 5 coordinators built on raft-rs
//! (`raft::RawNode`), with a durable log on redb, snapshots, membership changes through the log,
//! and a deterministic simulated network for tests.
//!
//! The library owns the algorithm, the caller owns the loop (the raft-rs pattern). One task owns
//! a [`RaftNode`] and drives it:
//!
//! - [`RaftNode::tick`] on the caller's clock (tests control time; production ticks every
//!   100 ms or so),
//! - [`RaftNode::step`] / [`RaftNode::step_bytes`] for every message the transport receives,
//! - [`RaftNode::propose`] / [`RaftNode::propose_conf_change`] for commands,
//! - [`RaftNode::handle_ready`] after any of these: it persists entries and hard state in one
//!   fsync'd redb transaction, restores snapshots, applies committed entries to the
//!   [`StateMachine`], resolves proposals and advances raft-rs,
//! - then [`RaftNode::take_outgoing`] (messages for the transport, only ever returned after the
//!   state they depend on is durable) and [`RaftNode::take_responses`] (proposal outcomes).
//!
//! The seams: [`StateMachine`] (the replicated application state, written elsewhere) and the
//! transport, which is nothing more than "deliver these [`Outgoing`] messages and step what
//! arrives" plus [`RaftNode::report_unreachable`] / [`RaftNode::report_snapshot`].
//!
//! Modules: [`storage`] (the redb log store implementing `raft::Storage`), [`node`] (the
//! driver), [`sim`] (an in-process cluster on a simulated network, reusable by other tests),
//! `logger` (raft-rs's slog output bridged to `tracing`).

mod logger;
pub mod node;
#[cfg(any(test, feature = "simulation"))]
pub mod sim;
pub mod storage;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use node::{
    MembershipChange, NodeStats, Outgoing, ProposalError, ProposalId, ProposalResponse, RaftNode,
};
pub use storage::{RedbStorage, StoreError};

/// The replicated application state that Raft feeds.
///
/// Lifecycle: a fresh value is handed to [`RaftNode::open`]; the node then calls
/// [`restore`](Self::restore) with the last stored snapshot (if any) and [`apply`](Self::apply)
/// with every committed entry after it, in log order, exactly once per entry for the life of
/// the value. After a restart the node builds a fresh value again from snapshot + log, so the
/// state needs no durability of its own.
///
/// Every method must be deterministic: the same snapshot and the same sequence of commands must
/// produce the same state and the same responses on every node. No clock, randomness, I/O or
/// iteration over hash maps with random seeds.
pub trait StateMachine: Send {
    /// Applies one committed command (the bytes a proposer passed to [`RaftNode::propose`])
    /// at log `index`. The returned bytes are delivered to the proposer, if it is this node.
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8>;

    /// Serialises the whole state as of the last applied index. Called when the log is compacted
    /// and when a lagging or new follower needs a snapshot.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with one produced by [`snapshot`](Self::snapshot), possibly on
    /// another node and by an older version of the program. An error makes the node fail.
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
}

/// Tuning of one Raft node. Times are in ticks of the caller's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Ticks between the leader's heartbeats. Default 3.
    pub heartbeat_ticks: usize,
    /// Ticks a follower waits without hearing from a leader before it campaigns; also the
    /// leader's check-quorum period. Must be larger than `heartbeat_ticks`. Default 10.
    pub election_ticks: usize,
    /// Lower bound of the randomised election timeout; 0 means `election_ticks`. Default 0.
    pub min_election_ticks: usize,
    /// Upper bound (exclusive) of the randomised election timeout; 0 means
    /// `2 * election_ticks`. `min + 1` makes the timeout fixed (deterministic tests). Default 0.
    pub max_election_ticks: usize,
    /// Upper bound of the entries carried by one append message, in bytes (at least one entry
    /// is always sent). Default 1 MiB.
    pub max_message_bytes: u64,
    /// Append messages in flight to one follower before the leader waits. Default 256.
    pub max_inflight_messages: usize,
    /// Applied entries past the last snapshot that trigger a new snapshot and log compaction.
    /// Small values make followers catch up by snapshot more often. Default 1000.
    pub snapshot_threshold: u64,
    /// Entries kept in the log behind a new snapshot, so that a follower lagging by fewer than
    /// this catches up from the log rather than a whole snapshot. Default 100.
    pub retain_entries: u64,
    /// Pre-vote (Raft thesis 9.6): a node cut off from the cluster does not inflate the term and
    /// disrupt the leader when it returns. Default true.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum for an election timeout steps down, and
    /// followers ignore vote requests while they hear from a leader. Default true.
    pub check_quorum: bool,
    /// Opens the redb file in `SingleWriter` mode so that other processes (an inspection tool,
    /// a test) can open it read-only while the node runs. Costs a second fsync per commit
    /// (redb always uses two-phase commit in that mode). Default false.
    pub shared_readers: bool,
    /// Keeps the log, hard state and snapshots in memory instead of a file: for a single-node
    /// group whose life is one process (the embedded cluster of `strata build`), which has
    /// nothing to recover after a restart. Never for a real cluster. Default false.
    pub in_memory: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ticks: 3,
            election_ticks: 10,
            min_election_ticks: 0,
            max_election_ticks: 0,
            max_message_bytes: 1024 * 1024,
            max_inflight_messages: 256,
            snapshot_threshold: 1000,
            retain_entries: 100,
            pre_vote: true,
            check_quorum: true,
            shared_readers: false,
            in_memory: false,
        }
    }
}

impl RaftConfig {
    /// The raft-rs configuration for node `id` whose state machine is at `applied`.
    fn to_raft(&self, id: u64, applied: u64) -> raft::Config {
        raft::Config {
            id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            applied,
            max_size_per_msg: self.max_message_bytes,
            max_inflight_msgs: self.max_inflight_messages,
            check_quorum: self.check_quorum,
            pre_vote: self.pre_vote,
            min_election_tick: self.min_election_ticks,
            max_election_tick: self.max_election_ticks,
            // `RaftNode::propose` refuses on followers, so raft-rs never forwards proposals.
            ..raft::Config::default()
        }
    }

    fn validate(&self, id: u64) -> Result<(), RaftError> {
        if self.snapshot_threshold == 0 {
            return Err(RaftError::Config(
                "snapshot_threshold must be at least 1".to_string(),
            ));
        }
        self.to_raft(id, 0)
            .validate()
            .map_err(|e| RaftError::Config(e.to_string()))
    }
}

/// Why a call on a [`RaftNode`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// Proposals are accepted by the leader only; retry there (`None`: no leader known yet).
    #[error("not the leader (leader: {})", leader_id.map_or("unknown".to_string(), |id| id.to_string()))]
    NotLeader { leader_id: Option<u64> },
    /// raft-rs refused the proposal (a leadership transfer is under way, or the uncommitted
    /// log is full). Retry later.
    #[error("proposal dropped by raft (leadership transfer or uncommitted log full)")]
    ProposalDropped,
    /// Empty commands are reserved for Raft's own no-op entries.
    #[error("empty proposal: commands must carry at least one byte")]
    EmptyProposal,
    /// Only one membership change may be in flight at a time.
    #[error("a membership change is already in progress; wait until it is applied")]
    ConfChangeInProgress,
    /// A message was addressed to another node.
    #[error("message for node {to} delivered to node {me}")]
    WrongRecipient { to: u64, me: u64 },
    /// Bytes from the transport are not a Raft message.
    #[error("undecodable raft message: {0}")]
    Decode(String),
    /// The configuration or the bootstrap peers are invalid.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// The log store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// raft-rs returned an error.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The state machine could not restore a snapshot.
    #[error("state machine restore from snapshot at index {index} failed: {message}")]
    Restore { index: u64, message: String },
    /// A snapshot's bytes carry an unknown format version or are truncated.
    #[error("snapshot at index {index}: {message}")]
    SnapshotFormat { index: u64, message: String },
    /// A previous failure left the node in an unknown state; reopen it from its directory.
    #[error("node {id} failed earlier and must be reopened from {dir}")]
    Poisoned { id: u64, dir: PathBuf },
}
