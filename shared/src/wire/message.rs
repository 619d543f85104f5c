//! The messages strata nodes exchange, grouped by conversation.
//!
//! Every stream carries frames of one enum, chosen by who opened it and for what:
//!
//! | conversation | request (opener sends) | reply |
//! |---|---|---|
//! | handshake, first stream of every connection | [`Hello`] | [`HelloReply`] |
//! | coordinator ↔ coordinator | [`PeerMsg`] | none (Raft answers with its own messages) |
//! | worker → coordinator | [`WorkerMsg`] | [`CoordinatorToWorker`] |
//! | coordinator → worker (stream opened by the coordinator) | [`CoordinatorToWorker`] | [`WorkerMsg`] |
//! | client → coordinator | [`ClientMsg`] | [`CoordinatorToClient`], one or several frames |
//!
//! Every message is a typed rkyv struct, down to the build requests, stage jobs, stage outputs
//! and progress events it carries (the types of [`crate::job`], [`crate::progress`],
//! [`crate::oci`] and [`crate::platform`]): nothing travels as JSON inside a frame. A frame is
//! validated with bytecheck before it is decoded, and what it says is checked by the receiver
//! ([`SubmitBuild::validate`] and friends) before it is used. Any change to the types here, or
//! to the types they carry, changes the archive layout and needs a new
//! [`super::WIRE_VERSION`].

use rkyv::{Archive, Deserialize, Serialize};

use crate::job::{BuildRequest, StageJob, StageOutput, TargetImage};
use crate::progress::Event;
use crate::tls::Role;

/// Identifier of a build, assigned by the coordinator (unique within a cluster).
pub type BuildId = u64;
/// Identifier of a stage job, assigned by the coordinator (unique within a cluster).
pub type JobId = u64;

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// First frame of every connection, on the first stream the dialling node opens.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Hello {
    /// What the dialling node is. Must match the role in its certificate when it has one.
    pub role: Role,
    /// The node's name. Must match its certificate's name when it has one; for a token client
    /// it is only informational (shown in logs and status), not verified.
    pub name: String,
    /// Bearer token of a client without a certificate (compared in constant time).
    pub token: Option<String>,
}

/// The coordinator's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome(Welcome),
    Refused(Refused),
}

/// The dialling node is in.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Welcome {
    /// The Raft id of the answering coordinator.
    pub node_id: u64,
    /// Address of the current leader, when known (workers and clients talk to the leader).
    pub leader: Option<String>,
    /// The answering coordinator's current Raft term.
    pub term: u64,
    /// The addresses (`ip:port`) of the group's members as the answering coordinator knows
    /// them: workers and clients dial these when their configured ones are gone.
    pub members: Vec<String>,
}

/// The dialling node is not let in; the connection is closed after this frame.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Refused {
    pub reason: String,
}

// ---------------------------------------------------------------------------------------------
// Coordinator ↔ coordinator
// ---------------------------------------------------------------------------------------------

/// Traffic between coordinators.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum PeerMsg {
    Raft(RaftMessage),
    /// The group no longer has the recipient: the sender applied the committed membership
    /// change that removed it. A removed node never applies that change itself (the leader
    /// stops writing to it), so it learns of it from this notice and stops.
    Removed(RemovedNotice),
}

/// See [`PeerMsg::Removed`].
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct RemovedNotice {
    /// Raft id of the sender (a member).
    pub from: u64,
    /// Raft id of the removed node.
    pub removed: u64,
    /// The sender's applied log index, at or after the removal.
    pub applied_index: u64,
}

/// One raft-rs message.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct RaftMessage {
    /// Raft id of the sender.
    pub from: u64,
    /// Raft id of the recipient.
    pub to: u64,
    /// The raft-rs `eraftpb::Message`, protobuf-encoded; opaque to the wire layer.
    pub bytes: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Worker ↔ coordinator
// ---------------------------------------------------------------------------------------------

/// What a worker sends: requests on streams it opens, and [`WorkerMsg::Ack`] as the answer to
/// a [`CoordinatorToWorker::Offer`] on a stream the coordinator opened.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
// A message is built, sent once and dropped: boxing its large variant only adds an allocation.
#[allow(clippy::large_enum_variant)]
pub enum WorkerMsg {
    Register(RegisterWorker),
    Heartbeat(Heartbeat),
    Progress(JobProgress),
    Result(JobResult),
    /// Answer to a job offer: taken, or declined with a reason.
    Ack(JobAck),
    /// The worker is shutting down; answered by [`CoordinatorToWorker::Ack`].
    Leave(LeaveCluster),
}

/// A worker leaving: first draining (no new jobs; the running ones finish), then gone (the
/// jobs it still holds go back to the queue at once, without waiting for their leases).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct LeaveCluster {
    pub drain: bool,
}

/// What a coordinator sends a worker: answers to [`WorkerMsg`] requests, and requests of its
/// own (offers, cancellations) on streams it opens.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
// A message is built, sent once and dropped: boxing its large variant only adds an allocation.
#[allow(clippy::large_enum_variant)]
pub enum CoordinatorToWorker {
    /// A job for the worker to run; it answers [`WorkerMsg::Ack`].
    Offer(JobOffer),
    /// Stop running a job (the build was cancelled or the lease was given to another worker).
    Cancel(CancelJob),
    /// Answer to register, heartbeat, progress and result: accepted, or refused with a reason
    /// (a result whose fencing token is stale is refused).
    Ack(JobAck),
    /// This coordinator is not the leader: dial the one named.
    NotLeader(NotLeader),
    /// The leader cannot commit anything right now (no quorum); retry later.
    NoQuorum,
    Error(ErrorReply),
}

/// A worker announces itself and what it can build.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct RegisterWorker {
    pub name: String,
    /// Platforms run natively, e.g. `linux/amd64`.
    pub native: Vec<String>,
    /// Platforms run under emulation (QEMU), e.g. `linux/arm64`.
    pub emulated: Vec<String>,
    /// How many jobs it runs at once.
    pub capacity: u32,
    /// Free-form labels (`key`, `value`) for placement.
    pub labels: Vec<(String, String)>,
}

/// A worker is alive and running these jobs. Not replicated through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker: String,
    pub running: Vec<JobId>,
}

/// A leased job handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct JobOffer {
    pub job_id: JobId,
    /// Fencing token, with `term`: the job's lease epoch. A result must carry both back.
    pub epoch: u64,
    /// Fencing token, with `epoch`: the Raft term of the leader that granted the lease.
    pub term: u64,
    /// Lease deadline, milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    /// The stage to build.
    pub job: StageJob,
}

/// Progress of a running job: one build event. Not replicated through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct JobProgress {
    pub job_id: JobId,
    pub event: Event,
}

/// A job finished, on the worker's side.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: JobId,
    /// The fencing token of the offer.
    pub epoch: u64,
    /// The fencing token of the offer.
    pub term: u64,
    pub outcome: JobOutcome,
}

/// How a job ended on its worker.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
// A message is built, sent once and dropped: boxing its large variant only adds an allocation.
#[allow(clippy::large_enum_variant)]
pub enum JobOutcome {
    /// The stage was built.
    Built(StageOutput),
    /// A build step failed, with the error message (the Dockerfile line, step and command it
    /// is about).
    Failed(String),
}

/// Accepted or refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct JobAck {
    pub accepted: bool,
    /// Why not (empty when accepted).
    pub reason: String,
}

/// Stop a job.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CancelJob {
    pub job_id: JobId,
    pub epoch: u64,
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum BuildOutcome {
    /// Succeeded: the image of each target platform.
    Built(Vec<TargetImage>),
    /// Failed or cancelled, with why.
    Failed(String),
}

// ---------------------------------------------------------------------------------------------
// Client ↔ coordinator
// ---------------------------------------------------------------------------------------------

/// What a client asks a coordinator; one request per stream.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Answered by [`CoordinatorToClient::Accepted`].
    Submit(SubmitBuild),
    /// Answered by a stream of [`CoordinatorToClient::Event`] ending with
    /// [`CoordinatorToClient::Done`].
    Watch(WatchBuild),
    /// Answered by [`CoordinatorToClient::Done`] (with an error) or `Error`.
    Cancel(CancelBuild),
    /// Answered by [`CoordinatorToClient::Status`].
    Status(StatusRequest),
    /// Adds or removes a coordinator (clients with a certificate only); answered by
    /// [`CoordinatorToClient::Membership`] once the change is committed.
    Membership(MembershipRequest),
}

/// What a coordinator answers a client. Any request may also be answered by `NotLeader`,
/// `NoQuorum` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum CoordinatorToClient {
    Accepted(BuildAccepted),
    Event(BuildEvent),
    Done(BuildDone),
    Status(StatusReply),
    Membership(MembershipReply),
    /// This coordinator is not the leader: dial the one named.
    NotLeader(NotLeader),
    /// The leader cannot commit anything right now (no quorum); retry later.
    NoQuorum,
    Error(ErrorReply),
}

/// Build this.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct SubmitBuild {
    pub request: BuildRequest,
}

/// The build is committed and queued.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct BuildAccepted {
    pub build_id: BuildId,
}

/// Stream the events of a build, starting at sequence number `from_event` (0: from the start),
/// then its end.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct WatchBuild {
    pub build_id: BuildId,
    pub from_event: u64,
}

/// Cancel a build.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CancelBuild {
    pub build_id: BuildId,
}

/// One event of a build.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct BuildEvent {
    /// Sequence number within the build, from 0, without gaps.
    pub seq: u64,
    pub event: Event,
}

/// A build ended.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct BuildDone {
    pub build_id: BuildId,
    pub result: BuildOutcome,
}

/// A change to the coordinators' Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum MembershipRequest {
    /// Adds coordinator `id` (started with `join = true`), first as a learner until it has
    /// caught up, then as a voter. Asking again for a learner resumes.
    Add {
        id: u64,
        /// The name in its certificate.
        name: String,
        /// `ip:port` of its QUIC endpoint.
        addr: String,
    },
    /// Removes coordinator `id`; a removed leader hands leadership over first.
    Remove { id: u64 },
}

/// The group after a committed membership change.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct MembershipReply {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// What was done, for people.
    pub message: String,
}

/// Ask for the cluster's state.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct StatusRequest {}

/// The cluster's state as the answering coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct StatusReply {
    pub nodes: Vec<NodeStatus>,
    /// Address of the current leader, when known.
    pub leader: Option<String>,
    pub workers: Vec<WorkerStatus>,
    /// Builds queued or running, oldest first.
    pub queue: Vec<BuildStatus>,
}

/// One coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    pub name: String,
    pub addr: String,
    pub state: RaftState,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Whether the answering coordinator currently reaches it.
    pub reachable: bool,
}

/// A coordinator's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum RaftState {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
    Learner,
    Unknown,
}

/// One registered worker.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    /// `active`, or `draining` (it takes no new jobs; see [`LeaveCluster`]).
    pub state: String,
    pub native: Vec<String>,
    pub emulated: Vec<String>,
    pub capacity: u32,
    pub running: Vec<JobId>,
    /// Milliseconds since its last heartbeat to the answering coordinator; `None` when it is
    /// not connected to that coordinator.
    pub last_seen_ms: Option<u64>,
    pub labels: Vec<(String, String)>,
}

/// One queued or running build.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct BuildStatus {
    pub build_id: BuildId,
    /// Who submitted it (certificate or hello name).
    pub submitter: String,
    /// `queued`, `running`, `exporting`…
    pub state: String,
    pub jobs_total: u32,
    pub jobs_done: u32,
    /// Milliseconds since the Unix epoch.
    pub submitted_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Shared answers
// ---------------------------------------------------------------------------------------------

/// The answering coordinator is not the leader.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct NotLeader {
    /// Address of the leader, when known.
    pub leader: Option<String>,
}

/// The one coded error of the wire: what went wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// The kind of an [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed (a field is invalid).
    BadRequest,
    /// The build, job or worker named does not exist.
    NotFound,
    /// The peer's role may not make this request.
    Forbidden,
    /// Admission control: the queue is full for this submitter.
    Overloaded,
    /// A bug or an unexpected failure on the coordinator.
    Internal,
    /// The request could not complete in time for a reason outside the coordinator (a
    /// coordinator being added has not caught up); asking again resumes it.
    Unavailable,
}
