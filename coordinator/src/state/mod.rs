//! The coordinator's replicated state machine: builds, their stage jobs, the leases that hand
//! jobs to workers, the workers, and the cache index.
//!
//! It sits under the Raft log. The leader proposes a [`Command`] as bytes
//! ([`Command::encode`]); every node applies the committed entries in log order with
//! [`StateMachine::apply`] (or [`StateMachine::apply_bytes`]) and gets the same [`Response`];
//! [`StateMachine::snapshot`] and [`StateMachine::restore`] move the whole state as bytes.
//! `apply` reads no clock and no randomness: time (`now_ms`) and the leader's term come in the
//! command; every collection is ordered (`BTreeMap`), so two nodes that applied the same
//! entries hold byte-identical snapshots.
//!
//! Terms:
//! - A **build** is one submitted request, its plan summary and its status (queued until its
//!   first lease, running, then succeeded, failed or cancelled). It belongs to a **tenant**,
//!   the queue it is fair-shared in.
//! - A **job** is one stage instance of one build: waiting (on its dependencies), ready,
//!   leased, done, failed or cancelled. Its **epoch** goes up by one at every lease.
//! - A **lease** hands a ready job to one worker until a deadline. Its fencing token is
//!   ([`LeaseToken`]) the term of the leader that granted it and the job's epoch. A completion
//!   or failure is accepted only under the job's current token, so a worker that comes back
//!   after its lease expired and the job moved on changes nothing.
//! - A **worker** is active (gets leases), draining (keeps its leases, gets no new ones) or
//!   gone (its leases were re-queued).
//! - The **cache index** maps a step or stage cache key to its layers and to the workers that
//!   hold them locally; the scheduler uses it for locality.
//!
//! Invariants `apply` keeps:
//! - a refused command, or refused batch item, changes no build, job, worker or cache entry
//!   (only `last_applied` and the highest term and time seen move);
//! - a job of an unfinished build waits exactly while one of its dependencies is not done;
//! - a job is leased only to an active worker able to run its platform (natively, or under
//!   emulation when its build allows it), and a worker never holds more leases than its
//!   capacity at grant time;
//! - a finished build has no ready or leased job: its unfinished jobs are cancelled;
//! - a build succeeds exactly when every target job is done; its result is their outputs.
//!
//! The leader's queries (fair ready order, expired leases, status, counters) are in `query`,
//! the scheduler's placement decision in [`crate::scheduler`], and [`simulation`] drives both
//! on virtual time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use strata_shared::job::{BuildRequest, StageOutput};
use strata_shared::platform::{Capabilities, Platform};
use strata_shared::store::BlobMeta;

use crate::placement::Emulation;

mod command;
mod migrate;
mod query;
#[cfg(any(test, feature = "simulation"))]
pub mod simulation;
#[cfg(test)]
mod tests;

pub use command::{
    BuildPolicy, COMMAND_VERSION, CacheDrop, CacheRecord, Command, FailOutcome, Failure, Grant,
    GrantedLease, InstanceSummary, LeaseRef, PlanSummary, Rejection, Removal, Renewal, Response,
    StageResult, TargetRef, UnplaceableJob,
};
pub use query::{BuildLine, Counters, JobCounts, JobSpec, StatusSummary, TenantLine, WorkerLine};

/// The version of the snapshot format this code writes; it also reads version 1 (build
/// requests and stage outputs kept as JSON text, see `migrate`).
pub const SNAPSHOT_VERSION: u32 = 2;

/// A build's id: assigned in log order, from 1.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(transparent)]
pub struct BuildId(pub u64);

/// A job's id: assigned in log order, from 1; a build's jobs are consecutive, in plan order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "j{}", self.0)
    }
}

/// The fencing token of a lease: the granting leader's term and the job's epoch. Workers
/// present it with every result; only the job's current token is accepted.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct LeaseToken {
    pub term: u64,
    pub epoch: u64,
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(term {}, epoch {})", self.term, self.epoch)
    }
}

/// A submitted build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub id: BuildId,
    pub tenant: String,
    /// The build request as submitted.
    pub request: Box<BuildRequest>,
    /// The plan; cached results live in the jobs, not here.
    pub plan: PlanSummary,
    pub policy: BuildPolicy,
    pub status: BuildStatus,
    pub submitted_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// The build's jobs, by plan instance id.
    pub jobs: Vec<JobId>,
    /// Once succeeded: each target platform's stage output.
    pub result: Vec<TargetOutput>,
}

/// Where a build is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BuildStatus {
    /// No job leased yet.
    Queued,
    Running,
    Succeeded,
    Failed {
        error: String,
    },
    Cancelled {
        reason: String,
    },
}

impl BuildStatus {
    pub fn is_finished(&self) -> bool {
        !matches!(self, BuildStatus::Queued | BuildStatus::Running)
    }

    pub fn name(&self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed { .. } => "failed",
            BuildStatus::Cancelled { .. } => "cancelled",
        }
    }
}

/// A failed step's message with its stage and platform at the end of its first line:
/// the message itself starts with what it is about (`Dockerfile:3: RUN make: exit code 2`),
/// and the lines after the first (the Dockerfile excerpt, the step's last output) stay as
/// they are.
fn name_stage(error: &str, stage: &str, platform: &Platform) -> String {
    let (first, rest) = error
        .split_once('\n')
        .map_or((error, None), |(f, r)| (f, Some(r)));
    let mut out = format!("{first} [stage {stage}, {platform}]");
    if let Some(rest) = rest {
        out.push('\n');
        out.push_str(rest);
    }
    out
}

/// The image of one target platform: the output of its target job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetOutput {
    pub platform: Platform,
    pub job: JobId,
    pub output: StageOutput,
}

/// One stage instance of one build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub build: BuildId,
    /// The plan instance id.
    pub instance: usize,
    /// The stage name, for messages.
    pub name: String,
    pub platform: Platform,
    /// Whether it runs a command: only then must its worker run its platform.
    #[serde(default = "command::executes_by_default")]
    pub executes: bool,
    /// Jobs it needs (same build).
    pub deps: Vec<JobId>,
    /// Jobs that need it (same build).
    pub dependents: Vec<JobId>,
    pub state: JobState,
    /// Incremented at every lease; part of the fencing token.
    pub epoch: u64,
    /// Steps on the longest chain from this job to the end of its build, its own included:
    /// within a build, ready jobs with more work behind them go first.
    pub remaining: u64,
    /// Leases granted so far.
    pub attempts: u32,
    /// Why the last lease ended without a result, if one did.
    pub last_error: Option<String>,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Some dependency is not done.
    Waiting,
    Ready,
    Leased(Lease),
    Done {
        /// The worker that built it; none when the cache held it at submission.
        worker: Option<String>,
        result: StageResult,
        at_ms: u64,
    },
    Failed {
        error: String,
    },
    /// Its build finished without it.
    Cancelled,
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Ready => "ready",
            JobState::Leased(_) => "leased",
            JobState::Done { .. } => "done",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job handed to a worker until a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub worker: String,
    pub token: LeaseToken,
    pub deadline_ms: u64,
    pub granted_at_ms: u64,
}

/// A worker as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub name: String,
    pub capabilities: Capabilities,
    /// Jobs it runs at once.
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub registered_at_ms: u64,
    pub state: WorkerState,
}

/// Whether a worker gets leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Active,
    Draining,
    Gone,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Draining => "draining",
            WorkerState::Gone => "gone",
        }
    }
}

/// A coordinator added at run time: where to reach it, and whether it has been removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// The name in its certificate.
    pub name: String,
    /// `ip:port` of its QUIC endpoint.
    pub addr: String,
    /// Removed from the group; the id is never used again.
    pub retired: bool,
}

/// The layers recorded under a cache key and the workers holding them locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIndexEntry {
    pub layers: Vec<BlobMeta>,
    pub holders: BTreeSet<String>,
    pub updated_at_ms: u64,
}

impl CacheIndexEntry {
    /// Bytes of the layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot format version {found} is not supported (this node reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("snapshot is not valid: {0}")]
    Malformed(String),
}

/// The replicated state. See the module documentation for the terms and invariants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    /// The log index of the last applied entry.
    last_applied: u64,
    /// The highest leader term seen in a command.
    term: u64,
    /// The latest leader time seen in a command.
    clock_ms: u64,
    next_build: u64,
    next_job: u64,
    builds: BTreeMap<BuildId, Build>,
    jobs: BTreeMap<JobId, Job>,
    workers: BTreeMap<String, Worker>,
    cache: BTreeMap<String, CacheIndexEntry>,
    /// The coordinators added or removed at run time, by Raft id (the initial ones are in
    /// every node's configuration).
    #[serde(default)]
    coordinators: BTreeMap<u64, CoordinatorRecord>,
    /// Derived from `jobs`; rebuilt on restore, never serialized.
    #[serde(skip)]
    index: Index,
}

/// Lookups derived from the jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Index {
    ready: BTreeSet<JobId>,
    leased: BTreeSet<JobId>,
    by_worker: BTreeMap<String, BTreeSet<JobId>>,
}

impl Index {
    fn add(&mut self, id: JobId, state: &JobState) {
        match state {
            JobState::Ready => {
                self.ready.insert(id);
            }
            JobState::Leased(l) => {
                self.leased.insert(id);
                self.by_worker
                    .entry(l.worker.clone())
                    .or_default()
                    .insert(id);
            }
            _ => {}
        }
    }

    fn remove(&mut self, id: JobId, state: &JobState) {
        match state {
            JobState::Ready => {
                self.ready.remove(&id);
            }
            JobState::Leased(l) => {
                self.leased.remove(&id);
                if let Some(set) = self.by_worker.get_mut(&l.worker) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.by_worker.remove(&l.worker);
                    }
                }
            }
            _ => {}
        }
    }
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    version: u32,
    state: &'a StateMachine,
}

#[derive(Deserialize)]
struct SnapshotIn {
    #[allow(dead_code)]
    version: u32,
    state: StateMachine,
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

/// What happened to a job that lost its lease.
enum Requeue {
    Requeued { attempts: u32 },
    BuildFailed { build: BuildId, error: String },
}

impl From<Requeue> for FailOutcome {
    fn from(r: Requeue) -> Self {
        match r {
            Requeue::Requeued { attempts } => FailOutcome::Requeued { attempts },
            Requeue::BuildFailed { build, error } => FailOutcome::BuildFailed { build, error },
        }
    }
}

impl StateMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// The log index of the last applied entry (0 before any).
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// The highest leader term seen in a command.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The latest leader time seen in a command.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Applies a committed log entry's bytes. An entry that does not decode (unknown version,
    /// malformed) is refused the same way on every node and only advances `last_applied`.
    pub fn apply_bytes(&mut self, index: u64, bytes: &[u8]) -> Response {
        if index <= self.last_applied {
            return self.already_applied(index);
        }
        match Command::decode(bytes) {
            Ok(cmd) => self.apply(index, cmd),
            Err(reason) => {
                self.last_applied = index;
                Response::Rejected { reason }
            }
        }
    }

    /// Applies the committed command at log `index`. Entries at or below the last applied
    /// index are refused unchanged (a replay after restore is harmless).
    pub fn apply(&mut self, index: u64, cmd: Command) -> Response {
        if index <= self.last_applied {
            return self.already_applied(index);
        }
        self.last_applied = index;
        let resp = self.execute(cmd, true);
        #[cfg(test)]
        assert!(
            self.index_is_consistent(),
            "index out of step after {index}"
        );
        resp
    }

    fn already_applied(&self, index: u64) -> Response {
        Response::Rejected {
            reason: Rejection::AlreadyApplied {
                index,
                last_applied: self.last_applied,
            },
        }
    }

    /// The whole state as bytes: `{"version":2,"state":{...}}`, deterministic.
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&SnapshotOut {
            version: SNAPSHOT_VERSION,
            state: self,
        })
        // Every map is keyed by strings or integers; nothing fails to serialize.
        .expect("the state always serializes")
    }

    /// Replaces the state with a snapshot's. On error the state is unchanged.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        *self = Self::from_snapshot(bytes)?;
        Ok(())
    }

    /// A state machine from a snapshot.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let probe: VersionProbe =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        let mut state: StateMachine = match probe.version {
            1 => {
                let state = migrate::snapshot_v1(bytes).map_err(SnapshotError::Malformed)?;
                serde_json::from_value(state)
                    .map_err(|e| SnapshotError::Malformed(e.to_string()))?
            }
            SNAPSHOT_VERSION => {
                let snap: SnapshotIn = serde_json::from_slice(bytes)
                    .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
                snap.state
            }
            found => {
                return Err(SnapshotError::UnsupportedVersion {
                    found,
                    supported: SNAPSHOT_VERSION,
                });
            }
        };
        state.reindex();
        Ok(state)
    }

    fn reindex(&mut self) {
        let mut index = Index::default();
        for (id, job) in &self.jobs {
            index.add(*id, &job.state);
        }
        self.index = index;
    }

    #[cfg(test)]
    fn index_is_consistent(&self) -> bool {
        let mut fresh = Index::default();
        for (id, job) in &self.jobs {
            fresh.add(*id, &job.state);
        }
        fresh == self.index
    }

    fn execute(&mut self, cmd: Command, top: bool) -> Response {
        if let Some(now) = cmd.now_ms() {
            self.clock_ms = self.clock_ms.max(now);
        }
        match cmd {
            Command::SubmitBuild {
                now_ms,
                tenant,
                request,
                plan,
                policy,
            } => self.submit(now_ms, tenant, request, plan, policy),
            Command::CancelBuild {
                now_ms,
                build,
                reason,
            } => self.cancel(now_ms, build, reason),
            Command::RegisterWorker {
                now_ms,
                name,
                capabilities,
                capacity,
                labels,
            } => self.register(now_ms, name, capabilities, capacity, labels),
            Command::RemoveWorker { now_ms, name, mode } => self.remove_worker(now_ms, name, mode),
            Command::GrantLeases {
                now_ms,
                term,
                grants,
            } => self.grant(now_ms, term, grants),
            Command::RenewLeases { leases, .. } => self.renew(leases),
            Command::CompleteJob {
                now_ms,
                job,
                token,
                result,
            } => self.complete(now_ms, job, token, result),
            Command::FailJob {
                now_ms,
                job,
                token,
                failure,
            } => self.fail(now_ms, job, token, failure),
            Command::ExpireLeases { now_ms, leases } => self.expire(now_ms, leases),
            Command::Unplaceable { now_ms, jobs } => self.unplaceable(now_ms, jobs),
            Command::RecordCache {
                now_ms,
                entries,
                dropped,
            } => self.record_cache(now_ms, entries, dropped),
            Command::RetireBuilds { builds } => self.retire(builds),
            Command::SetCoordinator { id, name, addr } => self.set_coordinator(id, name, addr),
            Command::RetireCoordinator { id, name, addr } => {
                self.retire_coordinator(id, name, addr)
            }
            Command::Batch { commands } => {
                if !top {
                    return Response::Rejected {
                        reason: Rejection::NestedBatch,
                    };
                }
                Response::Batch {
                    responses: commands
                        .into_iter()
                        .map(|c| self.execute(c, false))
                        .collect(),
                }
            }
        }
    }

    // ---- builds ----

    fn submit(
        &mut self,
        now_ms: u64,
        tenant: String,
        request: Box<BuildRequest>,
        mut plan: PlanSummary,
        policy: BuildPolicy,
    ) -> Response {
        if let Err(reason) = plan.validate() {
            return rejected(Rejection::InvalidBuild { reason });
        }
        if policy.max_attempts == 0 {
            return rejected(Rejection::InvalidBuild {
                reason: "max_attempts must be at least 1".into(),
            });
        }
        self.next_build += 1;
        let build_id = BuildId(self.next_build);
        let first = self.next_job + 1;
        self.next_job += plan.instances.len() as u64;
        let ids: Vec<JobId> = (0..plan.instances.len() as u64)
            .map(|i| JobId(first + i))
            .collect();
        let mut dependents: Vec<Vec<JobId>> = vec![Vec::new(); ids.len()];
        for inst in &plan.instances {
            for &d in &inst.depends_on {
                if !dependents[d].contains(&ids[inst.id]) {
                    dependents[d].push(ids[inst.id]);
                }
            }
        }
        // Dependencies come first, so a reverse pass sees every dependent before its base.
        let mut remaining = vec![0u64; ids.len()];
        for inst in plan.instances.iter().rev() {
            let after = dependents[inst.id]
                .iter()
                .map(|j| remaining[(j.0 - first) as usize])
                .max()
                .unwrap_or(0);
            remaining[inst.id] = after + inst.steps.max(1) as u64;
        }
        for ((inst, dependents), remaining) in
            plan.instances.iter_mut().zip(dependents).zip(remaining)
        {
            let mut deps: Vec<JobId> = Vec::new();
            for &d in &inst.depends_on {
                if !deps.contains(&ids[d]) {
                    deps.push(ids[d]);
                }
            }
            let state = match inst.cached.take() {
                Some(result) => JobState::Done {
                    worker: None,
                    result,
                    at_ms: now_ms,
                },
                None => JobState::Waiting,
            };
            let id = ids[inst.id];
            self.jobs.insert(
                id,
                Job {
                    id,
                    build: build_id,
                    instance: inst.id,
                    name: inst.name.clone(),
                    platform: inst.platform.clone(),
                    executes: inst.executes,
                    deps,
                    dependents,
                    state,
                    epoch: 0,
                    remaining,
                    attempts: 0,
                    last_error: None,
                },
            );
        }
        self.builds.insert(
            build_id,
            Build {
                id: build_id,
                tenant,
                request,
                plan,
                policy,
                status: BuildStatus::Queued,
                submitted_at_ms: now_ms,
                started_at_ms: None,
                finished_at_ms: None,
                jobs: ids.clone(),
                result: Vec::new(),
            },
        );
        let mut ready = Vec::new();
        for &id in &ids {
            if matches!(self.jobs[&id].state, JobState::Waiting) && self.deps_done(id) {
                self.set_state(id, JobState::Ready);
                ready.push(id);
            }
        }
        let status = self.check_succeeded(build_id, now_ms);
        Response::Submitted {
            build: build_id,
            jobs: ids,
            ready,
            status,
        }
    }

    fn cancel(&mut self, now_ms: u64, build: BuildId, reason: String) -> Response {
        let Some(b) = self.builds.get(&build) else {
            return rejected(Rejection::UnknownBuild { build });
        };
        if b.status.is_finished() {
            return rejected(Rejection::BuildFinished {
                build,
                status: b.status.name().into(),
            });
        }
        let cancelled = self.finish_build(build, BuildStatus::Cancelled { reason }, now_ms);
        Response::Cancelled { build, cancelled }
    }

    fn retire(&mut self, builds: Vec<BuildId>) -> Response {
        let mut retired = Vec::new();
        let mut refused = Vec::new();
        for build in builds {
            let Some(b) = self.builds.get(&build) else {
                refused.push(Rejection::UnknownBuild { build });
                continue;
            };
            if !b.status.is_finished() {
                refused.push(Rejection::BuildNotFinished {
                    build,
                    status: b.status.name().into(),
                });
                continue;
            }
            if let Some(b) = self.builds.remove(&build) {
                for id in &b.jobs {
                    // Finished builds hold no ready or leased job, so the index is untouched.
                    self.jobs.remove(id);
                }
            }
            retired.push(build);
        }
        Response::Retired {
            builds: retired,
            rejected: refused,
        }
    }

    /// Ends a build with `status`, cancelling its unfinished jobs (their leases become
    /// invalid). Returns the cancelled jobs.
    fn finish_build(&mut self, build: BuildId, status: BuildStatus, now_ms: u64) -> Vec<JobId> {
        let Some(b) = self.builds.get_mut(&build) else {
            return Vec::new();
        };
        b.status = status;
        b.finished_at_ms = Some(now_ms);
        let jobs = b.jobs.clone();
        let mut cancelled = Vec::new();
        for id in jobs {
            let unfinished = matches!(
                self.jobs.get(&id).map(|j| &j.state),
                Some(JobState::Waiting | JobState::Ready | JobState::Leased(_))
            );
            if unfinished {
                self.set_state(id, JobState::Cancelled);
                cancelled.push(id);
            }
        }
        cancelled
    }

    /// Succeeds the build if every target job is done; returns its status either way.
    fn check_succeeded(&mut self, build: BuildId, now_ms: u64) -> BuildStatus {
        let Some(b) = self.builds.get(&build) else {
            return BuildStatus::Queued;
        };
        if b.status.is_finished() {
            return b.status.clone();
        }
        let mut result = Vec::new();
        for t in &b.plan.targets {
            let job = b.jobs[t.instance];
            match self.jobs.get(&job).map(|j| &j.state) {
                Some(JobState::Done { result: r, .. }) => result.push(TargetOutput {
                    platform: t.platform.clone(),
                    job,
                    output: (*r.output).clone(),
                }),
                _ => return b.status.clone(),
            }
        }
        self.finish_build(build, BuildStatus::Succeeded, now_ms);
        if let Some(b) = self.builds.get_mut(&build) {
            b.result = result;
        }
        BuildStatus::Succeeded
    }

    // ---- workers ----

    fn register(
        &mut self,
        now_ms: u64,
        name: String,
        capabilities: Capabilities,
        capacity: u32,
        labels: BTreeMap<String, String>,
    ) -> Response {
        if capacity == 0 {
            return rejected(Rejection::InvalidWorker {
                worker: name,
                reason: "capacity must be at least 1".into(),
            });
        }
        if name.is_empty() {
            return rejected(Rejection::InvalidWorker {
                worker: name,
                reason: "the name is empty".into(),
            });
        }
        let rejoined = self.workers.contains_key(&name);
        self.workers.insert(
            name.clone(),
            Worker {
                name: name.clone(),
                capabilities,
                capacity,
                labels,
                registered_at_ms: now_ms,
                state: WorkerState::Active,
            },
        );
        Response::WorkerRegistered { name, rejoined }
    }

    fn remove_worker(&mut self, now_ms: u64, name: String, mode: Removal) -> Response {
        let Some(w) = self.workers.get_mut(&name) else {
            return rejected(Rejection::UnknownWorker { worker: name });
        };
        let mut requeued = Vec::new();
        let mut failed_builds = Vec::new();
        match mode {
            Removal::Drain => w.state = WorkerState::Draining,
            Removal::Gone => {
                w.state = WorkerState::Gone;
                let leased: Vec<JobId> = self
                    .index
                    .by_worker
                    .get(&name)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default();
                for id in leased {
                    // An earlier job's failure may have finished this one's build already.
                    if !matches!(self.jobs[&id].state, JobState::Leased(_)) {
                        continue;
                    }
                    match self.requeue(id, format!("worker {name:?} is gone"), now_ms) {
                        Requeue::Requeued { .. } => requeued.push(id),
                        Requeue::BuildFailed { build, .. } => failed_builds.push(build),
                    }
                }
                for entry in self.cache.values_mut() {
                    entry.holders.remove(&name);
                }
            }
        }
        let state = self.workers[&name].state;
        Response::WorkerRemoved {
            name,
            state,
            requeued,
            failed_builds,
        }
    }

    // ---- leases ----

    fn grant(&mut self, now_ms: u64, term: u64, grants: Vec<Grant>) -> Response {
        if term < self.term {
            return rejected(Rejection::StaleTerm {
                term,
                current: self.term,
            });
        }
        self.term = term;
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        for g in grants {
            if let Err(r) = self.check_grant(&g) {
                refused.push(r);
                continue;
            }
            let Some(job) = self.jobs.get_mut(&g.job) else {
                continue;
            };
            job.epoch += 1;
            job.attempts += 1;
            let token = LeaseToken {
                term,
                epoch: job.epoch,
            };
            let build = job.build;
            self.set_state(
                g.job,
                JobState::Leased(Lease {
                    worker: g.worker.clone(),
                    token,
                    deadline_ms: g.deadline_ms,
                    granted_at_ms: now_ms,
                }),
            );
            if let Some(b) = self.builds.get_mut(&build)
                && b.status == BuildStatus::Queued
            {
                b.status = BuildStatus::Running;
                b.started_at_ms = Some(now_ms);
            }
            granted.push(GrantedLease {
                job: g.job,
                worker: g.worker,
                token,
                deadline_ms: g.deadline_ms,
            });
        }
        Response::Leases {
            granted,
            rejected: refused,
        }
    }

    fn check_grant(&self, g: &Grant) -> Result<(), Rejection> {
        let job = self
            .jobs
            .get(&g.job)
            .ok_or(Rejection::UnknownJob { job: g.job })?;
        if job.state != JobState::Ready {
            return Err(Rejection::NotReady {
                job: g.job,
                state: job.state.name().into(),
            });
        }
        let worker = self
            .workers
            .get(&g.worker)
            .ok_or_else(|| Rejection::UnknownWorker {
                worker: g.worker.clone(),
            })?;
        if worker.state != WorkerState::Active {
            return Err(Rejection::WorkerNotActive {
                worker: g.worker.clone(),
                state: worker.state.name().into(),
            });
        }
        if self.running_on(&g.worker) >= worker.capacity as usize {
            return Err(Rejection::WorkerFull {
                worker: g.worker.clone(),
                capacity: worker.capacity,
            });
        }
        let caps = &worker.capabilities;
        if !job.executes || caps.native_for(&job.platform) {
            return Ok(());
        }
        let emulation = self
            .builds
            .get(&job.build)
            .map_or(Emulation::Deny, |b| b.policy.emulation);
        let reason = match (caps.emulated_for(&job.platform), emulation) {
            (true, Emulation::Allow) => return Ok(()),
            (true, Emulation::Deny) => "it would be emulated and the build denies emulation".into(),
            (false, _) => format!("the worker runs {caps}"),
        };
        Err(Rejection::PlatformMismatch {
            job: g.job,
            platform: job.platform.to_string(),
            worker: g.worker.clone(),
            reason,
        })
    }

    /// The current lease of `job` if `token` is its token.
    fn current_lease(&self, job: JobId, token: LeaseToken) -> Result<Lease, Rejection> {
        let j = self.jobs.get(&job).ok_or(Rejection::UnknownJob { job })?;
        match &j.state {
            JobState::Leased(l) if l.token == token => Ok(l.clone()),
            JobState::Leased(l) => Err(Rejection::StaleToken {
                job,
                presented: token,
                current: Some(l.token),
                state: j.state.name().into(),
            }),
            other => Err(Rejection::StaleToken {
                job,
                presented: token,
                current: None,
                state: other.name().into(),
            }),
        }
    }

    fn renew(&mut self, leases: Vec<Renewal>) -> Response {
        let mut renewed = Vec::new();
        let mut refused = Vec::new();
        for r in leases {
            match self.current_lease(r.job, r.token) {
                Err(e) => refused.push(e),
                Ok(_) => {
                    if let Some(Job {
                        state: JobState::Leased(l),
                        ..
                    }) = self.jobs.get_mut(&r.job)
                    {
                        l.deadline_ms = l.deadline_ms.max(r.deadline_ms);
                    }
                    renewed.push(r.job);
                }
            }
        }
        Response::Renewed {
            renewed,
            rejected: refused,
        }
    }

    fn complete(
        &mut self,
        now_ms: u64,
        job: JobId,
        token: LeaseToken,
        result: StageResult,
    ) -> Response {
        let lease = match self.current_lease(job, token) {
            Ok(l) => l,
            Err(reason) => return rejected(reason),
        };
        if !result.key().is_empty() {
            let (key, layers) = (result.key().to_string(), result.layers().to_vec());
            self.note_cache(&key, &layers, Some(&lease.worker), now_ms);
        }
        self.set_state(
            job,
            JobState::Done {
                worker: Some(lease.worker),
                result,
                at_ms: now_ms,
            },
        );
        let released = self.release_dependents(job);
        let build = self.jobs[&job].build;
        let build_status = self.check_succeeded(build, now_ms);
        Response::Completed {
            job,
            released,
            build,
            build_status,
        }
    }

    fn fail(&mut self, now_ms: u64, job: JobId, token: LeaseToken, failure: Failure) -> Response {
        let lease = match self.current_lease(job, token) {
            Ok(l) => l,
            Err(reason) => return rejected(reason),
        };
        let outcome = match failure {
            Failure::Step { error } => {
                let j = &self.jobs[&job];
                let build = j.build;
                let message = name_stage(&error, &j.name, &j.platform);
                self.set_state(job, JobState::Failed { error });
                self.finish_build(
                    build,
                    BuildStatus::Failed {
                        error: message.clone(),
                    },
                    now_ms,
                );
                FailOutcome::BuildFailed {
                    build,
                    error: message,
                }
            }
            Failure::Worker { error } => self
                .requeue(
                    job,
                    format!("worker {:?} gave up: {error}", lease.worker),
                    now_ms,
                )
                .into(),
        };
        Response::JobFailed { job, outcome }
    }

    fn expire(&mut self, now_ms: u64, leases: Vec<LeaseRef>) -> Response {
        let mut requeued = Vec::new();
        let mut failed_builds = Vec::new();
        let mut refused = Vec::new();
        for r in leases {
            let lease = match self.current_lease(r.job, r.token) {
                Ok(l) => l,
                Err(e) => {
                    refused.push(e);
                    continue;
                }
            };
            if lease.deadline_ms > now_ms {
                refused.push(Rejection::NotExpired {
                    job: r.job,
                    token: r.token,
                    deadline_ms: lease.deadline_ms,
                    now_ms,
                });
                continue;
            }
            let why = format!(
                "lease {} on worker {:?} expired at {} ms",
                lease.token, lease.worker, lease.deadline_ms
            );
            match self.requeue(r.job, why, now_ms) {
                Requeue::Requeued { .. } => requeued.push(r.job),
                Requeue::BuildFailed { build, .. } => failed_builds.push(build),
            }
        }
        Response::Expired {
            requeued,
            failed_builds,
            rejected: refused,
        }
    }

    /// A leased job lost its worker: back to ready, or the build fails once the job has used
    /// its attempts.
    fn requeue(&mut self, job: JobId, why: String, now_ms: u64) -> Requeue {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Requeue::Requeued { attempts: 0 };
        };
        debug_assert!(
            matches!(j.state, JobState::Leased(_)),
            "requeue of a {} job",
            j.state.name()
        );
        j.last_error = Some(why.clone());
        let (build, attempts) = (j.build, j.attempts);
        let max = self.builds.get(&build).map_or(1, |b| b.policy.max_attempts);
        if attempts < max {
            self.set_state(job, JobState::Ready);
            return Requeue::Requeued { attempts };
        }
        let j = &self.jobs[&job];
        let error = format!(
            "stage {} ({}) lost its worker {attempts} times; last: {why}",
            j.name, j.platform
        );
        self.set_state(
            job,
            JobState::Failed {
                error: error.clone(),
            },
        );
        self.finish_build(
            build,
            BuildStatus::Failed {
                error: error.clone(),
            },
            now_ms,
        );
        Requeue::BuildFailed { build, error }
    }

    fn unplaceable(&mut self, now_ms: u64, jobs: Vec<UnplaceableJob>) -> Response {
        let mut failed_builds = Vec::new();
        let mut refused = Vec::new();
        for u in jobs {
            let Some(j) = self.jobs.get(&u.job) else {
                refused.push(Rejection::UnknownJob { job: u.job });
                continue;
            };
            if j.state != JobState::Ready {
                refused.push(Rejection::NotReady {
                    job: u.job,
                    state: j.state.name().into(),
                });
                continue;
            }
            let build = j.build;
            let error = format!(
                "stage {} ({}) cannot be placed: {}",
                j.name, j.platform, u.message
            );
            self.set_state(u.job, JobState::Failed { error: u.message });
            self.finish_build(build, BuildStatus::Failed { error }, now_ms);
            failed_builds.push(build);
        }
        Response::Unplaced {
            failed_builds,
            rejected: refused,
        }
    }

    // ---- jobs ----

    /// Sets a job's state, keeping the index in step. The job must exist.
    fn set_state(&mut self, id: JobId, state: JobState) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        self.index.remove(id, &job.state);
        self.index.add(id, &state);
        job.state = state;
    }

    fn deps_done(&self, id: JobId) -> bool {
        self.jobs[&id].deps.iter().all(|d| {
            matches!(
                self.jobs.get(d).map(|j| &j.state),
                Some(JobState::Done { .. })
            )
        })
    }

    /// Waiting dependents of a done job whose dependencies are now all done become ready.
    fn release_dependents(&mut self, job: JobId) -> Vec<JobId> {
        let dependents = self.jobs[&job].dependents.clone();
        let mut released = Vec::new();
        for d in dependents {
            if self.jobs[&d].state == JobState::Waiting && self.deps_done(d) {
                self.set_state(d, JobState::Ready);
                released.push(d);
            }
        }
        released
    }

    fn running_on(&self, worker: &str) -> usize {
        self.index.by_worker.get(worker).map_or(0, BTreeSet::len)
    }

    // ---- cache index ----

    fn note_cache(&mut self, key: &str, layers: &[BlobMeta], worker: Option<&str>, now_ms: u64) {
        let entry = self
            .cache
            .entry(key.to_string())
            .or_insert_with(|| CacheIndexEntry {
                layers: Vec::new(),
                holders: BTreeSet::new(),
                updated_at_ms: now_ms,
            });
        if !layers.is_empty() {
            entry.layers = layers.to_vec();
        }
        if let Some(w) = worker {
            entry.holders.insert(w.to_string());
        }
        entry.updated_at_ms = now_ms;
    }

    fn record_cache(
        &mut self,
        now_ms: u64,
        entries: Vec<CacheRecord>,
        dropped: Vec<CacheDrop>,
    ) -> Response {
        let recorded = entries.len();
        for e in entries {
            // A gone worker holds nothing: a late record does not bring it back.
            let worker = e.worker.filter(|w| {
                self.workers
                    .get(w)
                    .is_some_and(|w| w.state != WorkerState::Gone)
            });
            self.note_cache(&e.key, &e.layers, worker.as_deref(), now_ms);
        }
        let mut removed = 0;
        for d in dropped {
            match d.worker {
                Some(w) => {
                    if let Some(entry) = self.cache.get_mut(&d.key)
                        && entry.holders.remove(&w)
                    {
                        removed += 1;
                    }
                }
                None => {
                    if self.cache.remove(&d.key).is_some() {
                        removed += 1;
                    }
                }
            }
        }
        Response::CacheRecorded {
            recorded,
            dropped: removed,
        }
    }

    // ---- coordinators ----

    fn set_coordinator(&mut self, id: u64, name: String, addr: String) -> Response {
        let invalid = |reason: String| rejected(Rejection::InvalidCoordinator { id, reason });
        if id == 0 {
            return invalid("id 0 is reserved".into());
        }
        if name.is_empty() || addr.parse::<std::net::SocketAddr>().is_err() {
            return invalid(format!(
                "needs a name and an ip:port address, not {name:?} at {addr:?}"
            ));
        }
        if self.coordinators.get(&id).is_some_and(|c| c.retired) {
            return invalid("was removed from the cluster; ids are never reused".into());
        }
        if let Some((other, _)) = self
            .coordinators
            .iter()
            .find(|(other, c)| **other != id && !c.retired && c.name == name)
        {
            return invalid(format!("the name {name:?} belongs to coordinator {other}"));
        }
        self.coordinators.insert(
            id,
            CoordinatorRecord {
                name,
                addr,
                retired: false,
            },
        );
        Response::CoordinatorSet { id }
    }

    fn retire_coordinator(&mut self, id: u64, name: String, addr: String) -> Response {
        self.coordinators.insert(
            id,
            CoordinatorRecord {
                name,
                addr,
                retired: true,
            },
        );
        Response::CoordinatorRetired { id }
    }

    // ---- read access ----

    /// The coordinators recorded at run time (added, and removed ones marked retired).
    pub fn coordinators(&self) -> &BTreeMap<u64, CoordinatorRecord> {
        &self.coordinators
    }

    pub fn build(&self, id: BuildId) -> Option<&Build> {
        self.builds.get(&id)
    }

    pub fn builds(&self) -> impl Iterator<Item = &Build> {
        self.builds.values()
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn worker(&self, name: &str) -> Option<&Worker> {
        self.workers.get(name)
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    pub fn cache_entry(&self, key: &str) -> Option<&CacheIndexEntry> {
        self.cache.get(key)
    }
}

fn rejected(reason: Rejection) -> Response {
    Response::Rejected { reason }
}
