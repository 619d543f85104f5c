//! The commands the Raft log carries, what applying one answers, and why one is refused.
//!
//! A command travels as 4 magic bytes, its format version (4 bytes) and its rkyv archive.
//! [`Command::decode`] reads the version first and refuses one it does not know, so a node
//! never half-understands an entry written by a newer one, then validates the archive
//! (bytecheck) before decoding it. Time and the leader's term are stamped into the command by
//! the leader; the state machine never reads a clock.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use strata_shared::dag::Plan;
use strata_shared::job::{BuildRequest, StageOutput};
use strata_shared::platform::{Capabilities, Platform};
use strata_shared::store::BlobMeta;
use strata_shared::wire::WireMessage;

use super::{BuildId, BuildStatus, JobId, LeaseToken, WorkerState};
use crate::placement::Emulation;

/// The version of the command format this code writes and reads: 1 was JSON, 2 is rkyv.
pub const COMMAND_VERSION: u32 = 2;
/// The first bytes of every log entry since version 2.
pub const COMMAND_MAGIC: &[u8; 4] = b"STRC";

/// A change to the replicated state. Every node applies the same commands in the same order.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "op", rename_all = "snake_case")]
#[rkyv(serialize_bounds(
    __S: rkyv::ser::Writer + rkyv::ser::Allocator,
    __S::Error: rkyv::rancor::Source,
))]
#[rkyv(deserialize_bounds(__D::Error: rkyv::rancor::Source))]
#[rkyv(bytecheck(bounds(
    __C: rkyv::validation::ArchiveContext,
    __C::Error: rkyv::rancor::Source,
)))]
pub enum Command {
    /// A new build: its request and its plan. The build gets the next build id; its jobs the
    /// next job ids, in plan order. Instances the plan marks cached start done.
    SubmitBuild {
        now_ms: u64,
        /// The queue the build is fair-shared in (a team, a project).
        tenant: String,
        /// The build request as the client sent it.
        request: Box<BuildRequest>,
        plan: PlanSummary,
        #[serde(default)]
        policy: BuildPolicy,
    },
    /// Stops a build: its unfinished jobs are cancelled and their leases become invalid.
    CancelBuild {
        now_ms: u64,
        build: BuildId,
        reason: String,
    },
    /// A worker joins, or joins again (after a restart or a new leader): its capabilities,
    /// capacity and labels are replaced and it becomes active. Its leases are kept; a worker
    /// that lost its jobs lets them expire.
    RegisterWorker {
        now_ms: u64,
        name: String,
        capabilities: Capabilities,
        /// Jobs it runs at once; at least 1.
        capacity: u32,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// A worker drains (no new leases, running ones finish) or is gone (its leased jobs are
    /// re-queued at once and it no longer counts as holding any cached layer).
    RemoveWorker {
        now_ms: u64,
        name: String,
        mode: Removal,
    },
    /// A batch of leases from one scheduling round, granted by the leader of `term`. Each grant
    /// is checked on its own (the job still ready, the worker active with a free slot and able
    /// to run the platform under the build's emulation policy); a refused grant changes nothing.
    GrantLeases {
        now_ms: u64,
        term: u64,
        grants: Vec<Grant>,
    },
    /// Pushes lease deadlines out for workers that are alive and still running the jobs
    /// (heartbeats themselves stay off the log; the leader batches the renewals).
    RenewLeases { now_ms: u64, leases: Vec<Renewal> },
    /// A worker finished a job under the lease `token`. Refused unless `token` is the job's
    /// current lease.
    CompleteJob {
        now_ms: u64,
        job: JobId,
        token: LeaseToken,
        result: StageResult,
    },
    /// A worker reports a job failed under the lease `token` (refused unless current).
    FailJob {
        now_ms: u64,
        job: JobId,
        token: LeaseToken,
        failure: Failure,
    },
    /// Leases the leader saw pass their deadline. Each is re-checked: still the current lease
    /// and `deadline_ms <= now_ms`. The job goes back to ready (its epoch moves at the next
    /// lease), or fails its build once it has used up its attempts.
    ExpireLeases { now_ms: u64, leases: Vec<LeaseRef> },
    /// Ready jobs no worker can run (the scheduler's verdict): each fails its build with the
    /// message, which names the platform and the workers.
    Unplaceable {
        now_ms: u64,
        jobs: Vec<UnplaceableJob>,
    },
    /// Cache-index updates: layers recorded under a step or stage key and the workers holding
    /// them locally; `dropped` forgets a holder (evicted) or a whole key.
    RecordCache {
        now_ms: u64,
        entries: Vec<CacheRecord>,
        #[serde(default)]
        dropped: Vec<CacheDrop>,
    },
    /// Forgets finished builds and their jobs (retention is the leader's policy).
    RetireBuilds { builds: Vec<BuildId> },
    /// Records a coordinator's name and address, before the membership change that adds it:
    /// every node learns where to reach it, and a node restored from a snapshot still knows.
    /// Refused for a retired id or a name another coordinator uses.
    SetCoordinator { id: u64, name: String, addr: String },
    /// Marks a coordinator removed from the group (an initial one or one added later): its id
    /// is never used again.
    RetireCoordinator { id: u64, name: String, addr: String },
    /// Several commands in one log entry, applied in order, each on its own (one refused does
    /// not undo the others). Batches do not nest.
    Batch {
        #[rkyv(omit_bounds)]
        commands: Vec<Command>,
    },
}

/// How a worker leaves.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    Drain,
    Gone,
}

/// One job leased to one worker.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Grant {
    pub job: JobId,
    pub worker: String,
    pub deadline_ms: u64,
}

/// A new deadline for a current lease.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Renewal {
    pub job: JobId,
    pub token: LeaseToken,
    pub deadline_ms: u64,
}

/// A lease, named by its job and fencing token.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct LeaseRef {
    pub job: JobId,
    pub token: LeaseToken,
    /// The worker holding it (informational; the token decides).
    pub worker: String,
    pub deadline_ms: u64,
}

/// Why a job failed, which decides what happens next.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// A build step failed (user error: a command exited non-zero, a file is missing). The
    /// build fails with this message and its other jobs are cancelled.
    Step { error: String },
    /// The worker could not run the job (it is dying, its disk is full, the store was
    /// unreachable). The job goes back to ready, up to the build's `max_attempts`.
    Worker { error: String },
}

/// A job the scheduler found no worker for.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct UnplaceableJob {
    pub job: JobId,
    pub message: String,
}

/// Layers known under a cache key, and optionally a worker that holds them locally.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct CacheRecord {
    pub key: String,
    /// Empty keeps the layers already recorded under the key.
    #[serde(default)]
    pub layers: Vec<BlobMeta>,
    #[serde(default)]
    pub worker: Option<String>,
}

/// A holder evicted a key (`worker` set) or the key is forgotten entirely (`worker` absent).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct CacheDrop {
    pub key: String,
    #[serde(default)]
    pub worker: Option<String>,
}

/// What the state machine keeps of a finished stage: the worker's [`StageOutput`] (read by
/// the exporter and by dependent jobs), whose cache key and layers feed the cache index.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct StageResult {
    pub output: Box<StageOutput>,
}

impl StageResult {
    pub fn from_output(output: StageOutput) -> Self {
        StageResult {
            output: Box::new(output),
        }
    }

    /// The cache key of the stage's filesystem state.
    pub fn key(&self) -> &str {
        &self.output.key
    }

    /// The stage's layers, bottom first.
    pub fn layers(&self) -> &[BlobMeta] {
        &self.output.layers
    }

    /// Bytes of the stage's layers (what a worker lacking them must fetch).
    pub fn size(&self) -> u64 {
        self.output.layers.iter().map(|l| l.size).sum()
    }
}

/// Per-build scheduling policy.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BuildPolicy {
    /// Whether stages may run under emulation when no worker runs their platform natively.
    pub emulation: Emulation,
    /// Leases a job gets before losing workers fails the build; at least 1. Default 3.
    pub max_attempts: u32,
}

impl Default for BuildPolicy {
    fn default() -> Self {
        BuildPolicy {
            emulation: Emulation::Allow,
            max_attempts: 3,
        }
    }
}

/// The part of a [`Plan`] the state machine needs: the instances and their dependencies.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct PlanSummary {
    /// The platform the plan was made for as the builder's (`BUILDPLATFORM`): a worker's
    /// native platform. Jobs are offered with it.
    #[serde(default = "legacy_build_platform")]
    pub build_platform: Platform,
    /// In plan order: an instance's dependencies come before it.
    pub instances: Vec<InstanceSummary>,
    /// The instance producing each requested platform's image.
    pub targets: Vec<TargetRef>,
}

/// One stage instance: one job.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct InstanceSummary {
    /// Position in [`PlanSummary::instances`].
    pub id: usize,
    /// The stage's index in the Dockerfile.
    pub index: usize,
    pub name: String,
    /// The platform its steps run for.
    pub platform: Platform,
    /// The target platforms it serves (the first is its `TARGETPLATFORM`).
    pub targets: Vec<Platform>,
    /// Ids of the instances it needs.
    pub depends_on: Vec<usize>,
    /// Its steps (base pull, ADD, COPY, RUN, WORKDIR): the weight of the longest remaining
    /// chain the ready order prefers. 0 counts as 1.
    #[serde(default)]
    pub steps: usize,
    /// Whether it runs a command; one that does not may go to any worker.
    #[serde(default = "executes_by_default")]
    pub executes: bool,
    /// Set when the cache already holds the stage's result: the job starts done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<StageResult>,
}

/// The instance producing a platform's image.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct TargetRef {
    pub platform: Platform,
    pub instance: usize,
}

/// Instances recorded before plans said whether they run a command: assume they do.
pub(super) fn executes_by_default() -> bool {
    true
}

/// The build platform of a plan recorded before plans carried one: the coordinator's own, as
/// the jobs of such a plan were offered with it.
fn legacy_build_platform() -> Platform {
    Platform::host()
}

impl PlanSummary {
    pub fn from_plan(plan: &Plan, build_platform: &Platform) -> Self {
        PlanSummary {
            build_platform: build_platform.clone(),
            instances: plan
                .instances
                .iter()
                .map(|i| InstanceSummary {
                    id: i.id,
                    index: i.index,
                    name: i.name.clone(),
                    platform: i.platform.clone(),
                    targets: i.targets.clone(),
                    depends_on: i.depends_on.clone(),
                    steps: i.steps,
                    executes: i.executes,
                    cached: None,
                })
                .collect(),
            targets: plan
                .targets
                .iter()
                .map(|(platform, instance)| TargetRef {
                    platform: platform.clone(),
                    instance: *instance,
                })
                .collect(),
        }
    }

    /// Checks what the state machine relies on: ids are positions, dependencies come first,
    /// targets exist.
    pub fn validate(&self) -> Result<(), String> {
        if self.instances.is_empty() {
            return Err("the plan has no stage".into());
        }
        if self.targets.is_empty() {
            return Err("the plan has no target".into());
        }
        for (pos, inst) in self.instances.iter().enumerate() {
            if inst.id != pos {
                return Err(format!("instance at position {pos} has id {}", inst.id));
            }
            if let Some(d) = inst.depends_on.iter().find(|&&d| d >= pos) {
                return Err(format!(
                    "instance {pos} ({}) depends on instance {d}, which does not come before it",
                    inst.name
                ));
            }
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| t.instance >= self.instances.len())
        {
            return Err(format!(
                "target {} names instance {}, which does not exist",
                t.platform, t.instance
            ));
        }
        Ok(())
    }
}

impl Command {
    /// The log-entry bytes: [`COMMAND_MAGIC`], the format version ([`COMMAND_VERSION`], `u32`
    /// little-endian), then the command's rkyv archive.
    pub fn encode(&self) -> Vec<u8> {
        // Every field of a command is archivable and nothing limits an archive's size here.
        let archive = self.to_archive().expect("a command always archives");
        let mut out = Vec::with_capacity(8 + archive.len());
        out.extend_from_slice(COMMAND_MAGIC);
        out.extend_from_slice(&COMMAND_VERSION.to_le_bytes());
        out.extend_from_slice(&archive);
        out
    }

    /// Reads log-entry bytes, refusing a version this code does not know and validating the
    /// archive before anything of it is used. Version 1 entries (JSON) are migrated.
    pub fn decode(bytes: &[u8]) -> Result<Command, Rejection> {
        if bytes.starts_with(b"{") {
            return super::migrate::command_v1(bytes);
        }
        let Some(rest) = bytes.strip_prefix(COMMAND_MAGIC) else {
            return Err(Rejection::Malformed {
                error: "not a command entry (no magic)".into(),
            });
        };
        let Some((version, archive)) = rest.split_first_chunk::<4>() else {
            return Err(Rejection::Malformed {
                error: "a command entry without its version".into(),
            });
        };
        let version = u32::from_le_bytes(*version);
        if version != COMMAND_VERSION {
            return Err(Rejection::UnsupportedVersion {
                found: version,
                supported: COMMAND_VERSION,
            });
        }
        Command::from_archive(archive).map_err(|e| Rejection::Malformed {
            error: e.to_string(),
        })
    }

    /// The command's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::SubmitBuild { .. } => "submit_build",
            Command::CancelBuild { .. } => "cancel_build",
            Command::RegisterWorker { .. } => "register_worker",
            Command::RemoveWorker { .. } => "remove_worker",
            Command::GrantLeases { .. } => "grant_leases",
            Command::RenewLeases { .. } => "renew_leases",
            Command::CompleteJob { .. } => "complete_job",
            Command::FailJob { .. } => "fail_job",
            Command::ExpireLeases { .. } => "expire_leases",
            Command::Unplaceable { .. } => "unplaceable",
            Command::RecordCache { .. } => "record_cache",
            Command::RetireBuilds { .. } => "retire_builds",
            Command::SetCoordinator { .. } => "set_coordinator",
            Command::RetireCoordinator { .. } => "retire_coordinator",
            Command::Batch { .. } => "batch",
        }
    }

    /// The time the leader stamped, if the command carries one.
    pub fn now_ms(&self) -> Option<u64> {
        match self {
            Command::SubmitBuild { now_ms, .. }
            | Command::CancelBuild { now_ms, .. }
            | Command::RegisterWorker { now_ms, .. }
            | Command::RemoveWorker { now_ms, .. }
            | Command::GrantLeases { now_ms, .. }
            | Command::RenewLeases { now_ms, .. }
            | Command::CompleteJob { now_ms, .. }
            | Command::FailJob { now_ms, .. }
            | Command::ExpireLeases { now_ms, .. }
            | Command::Unplaceable { now_ms, .. }
            | Command::RecordCache { now_ms, .. } => Some(*now_ms),
            Command::RetireBuilds { .. }
            | Command::SetCoordinator { .. }
            | Command::RetireCoordinator { .. }
            | Command::Batch { .. } => None,
        }
    }
}

/// What applying a command did. A refused command (or batch item) changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Submitted {
        build: BuildId,
        /// The build's jobs, in plan order.
        jobs: Vec<JobId>,
        /// The jobs that can be leased right away.
        ready: Vec<JobId>,
        status: BuildStatus,
    },
    Cancelled {
        build: BuildId,
        cancelled: Vec<JobId>,
    },
    WorkerRegistered {
        name: String,
        /// Whether the name was known before.
        rejoined: bool,
    },
    WorkerRemoved {
        name: String,
        state: WorkerState,
        requeued: Vec<JobId>,
        failed_builds: Vec<BuildId>,
    },
    Leases {
        granted: Vec<GrantedLease>,
        rejected: Vec<Rejection>,
    },
    Renewed {
        renewed: Vec<JobId>,
        rejected: Vec<Rejection>,
    },
    Completed {
        job: JobId,
        /// Dependents that became ready.
        released: Vec<JobId>,
        build: BuildId,
        build_status: BuildStatus,
    },
    JobFailed {
        job: JobId,
        outcome: FailOutcome,
    },
    Expired {
        requeued: Vec<JobId>,
        failed_builds: Vec<BuildId>,
        rejected: Vec<Rejection>,
    },
    Unplaced {
        failed_builds: Vec<BuildId>,
        rejected: Vec<Rejection>,
    },
    CacheRecorded {
        recorded: usize,
        dropped: usize,
    },
    Retired {
        builds: Vec<BuildId>,
        rejected: Vec<Rejection>,
    },
    CoordinatorSet {
        id: u64,
    },
    CoordinatorRetired {
        id: u64,
    },
    Batch {
        responses: Vec<Response>,
    },
    Rejected {
        reason: Rejection,
    },
}

impl Response {
    /// The reason, when the whole command was refused.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Response::Rejected { reason } => Some(reason),
            _ => None,
        }
    }
}

/// A lease that was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedLease {
    pub job: JobId,
    pub worker: String,
    pub token: LeaseToken,
    pub deadline_ms: u64,
}

/// What became of a job whose worker gave up on it or whose lease ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FailOutcome {
    /// Back to ready; `attempts` leases used so far.
    Requeued { attempts: u32 },
    /// The build failed (a step failed, or the job used up its attempts).
    BuildFailed { build: BuildId, error: String },
}

/// Why a command, or one item of a batch, was refused. Each names what it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    #[error(
        "command format version {found} is not supported (this node reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("command is not valid: {error}")]
    Malformed { error: String },
    #[error("log entry {index} was already applied (last applied {last_applied})")]
    AlreadyApplied { index: u64, last_applied: u64 },
    #[error("a batch may not contain a batch")]
    NestedBatch,
    #[error("leases from term {term} are refused: term {current} has been seen")]
    StaleTerm { term: u64, current: u64 },
    #[error("invalid build: {reason}")]
    InvalidBuild { reason: String },
    #[error("unknown build {build}")]
    UnknownBuild { build: BuildId },
    #[error("build {build} is already {status}")]
    BuildFinished { build: BuildId, status: String },
    #[error("build {build} is still {status}")]
    BuildNotFinished { build: BuildId, status: String },
    #[error("unknown job {job}")]
    UnknownJob { job: JobId },
    #[error("job {job} is {state}, not ready")]
    NotReady { job: JobId, state: String },
    #[error("job {job}: lease {presented} is not the job's current lease ({})", current_lease(.current, .state))]
    StaleToken {
        job: JobId,
        presented: LeaseToken,
        current: Option<LeaseToken>,
        state: String,
    },
    #[error("job {job}: lease {token} runs until {deadline_ms} ms, not expired at {now_ms} ms")]
    NotExpired {
        job: JobId,
        token: LeaseToken,
        deadline_ms: u64,
        now_ms: u64,
    },
    #[error("unknown worker {worker:?}")]
    UnknownWorker { worker: String },
    #[error("worker {worker:?} is {state}, not active")]
    WorkerNotActive { worker: String, state: String },
    #[error("worker {worker:?} has all {capacity} slots busy")]
    WorkerFull { worker: String, capacity: u32 },
    #[error("job {job} ({platform}) cannot run on worker {worker:?}: {reason}")]
    PlatformMismatch {
        job: JobId,
        platform: String,
        worker: String,
        reason: String,
    },
    #[error("invalid worker {worker:?}: {reason}")]
    InvalidWorker { worker: String, reason: String },
    #[error("coordinator {id}: {reason}")]
    InvalidCoordinator { id: u64, reason: String },
}

fn current_lease(current: &Option<LeaseToken>, state: &str) -> String {
    match current {
        Some(t) => format!("it is leased under {t}"),
        None => format!("it is {state}"),
    }
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Removal::Drain => "drain",
            Removal::Gone => "gone",
        })
    }
}
