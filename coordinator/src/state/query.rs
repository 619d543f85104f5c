//! What the leader reads from the state: the ready jobs in fair order and the workers as the
//! scheduler sees them, one scheduling round as a command, the leases past their deadline,
//! what a worker needs to run a leased job, the status summary behind `strata status`, and
//! plain counters for metrics. Every query is a pure function of the state (and `now_ms`
//! where time matters).
//!
//! Fair order: max-min fairness by running jobs, at two levels. A tenant's k-th ready job is
//! placed at position `running(tenant) + k`, a build's k-th job within its tenant at
//! `running(build) + k`; ties go to the oldest build, then the lowest job id. With nothing
//! running this is plain round-robin across tenants, and across a tenant's builds; a tenant
//! already running many jobs waits until the others catch up. Within a build, the job with
//! the longest chain of steps still ahead of it goes first (critical path first; ties in plan
//! order), which is what keeps a large build near its critical path when slots are scarce.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use strata_shared::job::BuildRequest;
use strata_shared::platform::{Capabilities, Platform};

use super::{
    BuildId, BuildStatus, Command, Grant, InstanceSummary, JobId, JobState, Lease, LeaseRef,
    StageResult, StateMachine, UnplaceableJob, WorkerState,
};
use crate::scheduler::{self, ParentLayer, ReadyJob, WorkerView};

/// Metrics-friendly numbers about the whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub builds_queued: u64,
    pub builds_running: u64,
    pub builds_succeeded: u64,
    pub builds_failed: u64,
    pub builds_cancelled: u64,
    /// Jobs of unfinished builds waiting on dependencies.
    pub jobs_waiting: u64,
    pub jobs_ready: u64,
    /// Leased jobs.
    pub jobs_running: u64,
    /// Ready jobs per platform (`linux/arm64`): what autoscaling per architecture watches.
    pub ready_by_platform: BTreeMap<String, u64>,
    pub running_by_platform: BTreeMap<String, u64>,
    pub workers_active: u64,
    pub workers_draining: u64,
    pub workers_gone: u64,
    /// Slots of active workers.
    pub slots_total: u64,
    /// Leases held by active workers.
    pub slots_busy: u64,
    pub cache_keys: u64,
}

/// Jobs of one build by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    pub total: u64,
    pub waiting: u64,
    pub ready: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// One build in the status summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLine {
    pub id: BuildId,
    pub tenant: String,
    pub status: BuildStatus,
    pub submitted_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub jobs: JobCounts,
}

/// One tenant's queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLine {
    pub tenant: String,
    pub builds_queued: u64,
    pub builds_running: u64,
    pub jobs_ready: u64,
    pub jobs_running: u64,
}

/// One worker in the status summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerLine {
    pub name: String,
    pub state: WorkerState,
    pub capabilities: Capabilities,
    pub capacity: u32,
    pub running: u64,
    pub labels: BTreeMap<String, String>,
}

/// Everything `strata status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSummary {
    pub last_applied: u64,
    pub term: u64,
    pub clock_ms: u64,
    pub counters: Counters,
    /// Unfinished builds, then the most recent finished ones, by id.
    pub builds: Vec<BuildLine>,
    pub tenants: Vec<TenantLine>,
    pub workers: Vec<WorkerLine>,
}

/// What a worker needs to run a job: the request, the instance, and the outputs of the
/// stages it uses (by Dockerfile stage index, as [`strata_shared::job::StageJob::inputs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec<'a> {
    pub job: JobId,
    pub build: BuildId,
    pub request: &'a BuildRequest,
    /// The plan's build platform (`BUILDPLATFORM` of every instance).
    pub build_platform: &'a Platform,
    pub instance: &'a InstanceSummary,
    pub lease: Option<&'a Lease>,
    pub inputs: Vec<(usize, &'a StageResult)>,
}

impl StateMachine {
    /// The ready jobs in fair order (see the module documentation), ranked from 0.
    pub fn ready_jobs(&self) -> Vec<ReadyJob> {
        let mut running_build: BTreeMap<BuildId, u64> = BTreeMap::new();
        let mut running_tenant: BTreeMap<&str, u64> = BTreeMap::new();
        for id in &self.index.leased {
            let build = self.jobs[id].build;
            *running_build.entry(build).or_default() += 1;
            *running_tenant
                .entry(self.builds[&build].tenant.as_str())
                .or_default() += 1;
        }
        // tenant -> build -> ready jobs, ascending.
        let mut grouped: BTreeMap<&str, BTreeMap<BuildId, Vec<JobId>>> = BTreeMap::new();
        for id in &self.index.ready {
            let build = self.jobs[id].build;
            grouped
                .entry(self.builds[&build].tenant.as_str())
                .or_default()
                .entry(build)
                .or_default()
                .push(*id);
        }
        // (position, oldest build of the tenant, tenant, job)
        let mut order: Vec<(u64, BuildId, &str, JobId)> = Vec::new();
        for (tenant, builds) in &grouped {
            let mut queue: Vec<(u64, BuildId, JobId)> = Vec::new();
            for (build, jobs) in builds {
                let base = running_build.get(build).copied().unwrap_or(0);
                let mut jobs = jobs.clone();
                jobs.sort_by_key(|id| (Reverse(self.jobs[id].remaining), *id));
                for (k, job) in jobs.iter().enumerate() {
                    queue.push((base + k as u64, *build, *job));
                }
            }
            queue.sort_unstable();
            let oldest = builds.keys().next().copied().unwrap_or_default();
            let base = running_tenant.get(tenant).copied().unwrap_or(0);
            for (k, (_, _, job)) in queue.into_iter().enumerate() {
                order.push((base + k as u64, oldest, tenant, job));
            }
        }
        order.sort_unstable();
        order
            .into_iter()
            .enumerate()
            .map(|(rank, (_, _, tenant, id))| {
                let job = &self.jobs[&id];
                let build = &self.builds[&job.build];
                ReadyJob {
                    job: id,
                    build: job.build,
                    tenant: tenant.to_string(),
                    rank,
                    platform: job.platform.clone(),
                    executes: job.executes,
                    emulation: build.policy.emulation,
                    parents: self.parent_layers(id),
                }
            })
            .collect()
    }

    fn parent_layers(&self, id: JobId) -> Vec<ParentLayer> {
        self.jobs[&id]
            .deps
            .iter()
            .filter_map(|d| match &self.jobs.get(d)?.state {
                JobState::Done { result, .. } if !result.key().is_empty() => Some(ParentLayer {
                    key: result.key().to_string(),
                    size: result.size(),
                }),
                _ => None,
            })
            .collect()
    }

    /// The active workers as the scheduler sees them; `holds` lists the parent keys of
    /// `ready` each one holds (not its whole cache).
    pub fn worker_views(&self, ready: &[ReadyJob]) -> Vec<WorkerView> {
        let mut views: Vec<WorkerView> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Active)
            .map(|w| {
                let mut running_by_build: BTreeMap<BuildId, u32> = BTreeMap::new();
                let leased = self.index.by_worker.get(&w.name);
                for id in leased.into_iter().flatten() {
                    *running_by_build.entry(self.jobs[id].build).or_default() += 1;
                }
                WorkerView {
                    name: w.name.clone(),
                    capabilities: w.capabilities.clone(),
                    capacity: w.capacity,
                    running: leased.map_or(0, |s| s.len() as u32),
                    running_by_build,
                    holds: BTreeSet::new(),
                }
            })
            .collect();
        let position: BTreeMap<String, usize> = views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
        let keys: BTreeSet<&str> = ready
            .iter()
            .flat_map(|r| r.parents.iter().map(|p| p.key.as_str()))
            .collect();
        for key in keys {
            let Some(entry) = self.cache.get(key) else {
                continue;
            };
            for holder in &entry.holders {
                if let Some(&i) = position.get(holder) {
                    views[i].holds.insert(key.to_string());
                }
            }
        }
        views
    }

    /// One scheduling round: the ready jobs placed by [`scheduler::schedule`], as a
    /// `GrantLeases` command (leases of `lease_ms`) and an `Unplaceable` command for jobs no
    /// worker can run, batched when both are present. `None` when there is nothing to do.
    pub fn schedule_round(&self, term: u64, now_ms: u64, lease_ms: u64) -> Option<Command> {
        self.schedule_round_among(term, now_ms, lease_ms, |_| true)
    }

    /// [`Self::schedule_round`] with leases granted only to the workers `reachable` accepts
    /// (those connected to this leader). A job is still unplaceable only when no registered
    /// worker at all could run it: one that is reconnecting keeps its jobs waiting.
    pub fn schedule_round_among(
        &self,
        term: u64,
        now_ms: u64,
        lease_ms: u64,
        reachable: impl Fn(&str) -> bool,
    ) -> Option<Command> {
        let ready = self.ready_jobs();
        if ready.is_empty() {
            return None;
        }
        let views = self.worker_views(&ready);
        let unplaceable = scheduler::schedule(&ready, &views).unplaceable;
        let hopeless: BTreeSet<JobId> = unplaceable.iter().map(|u| u.job).collect();
        let ready: Vec<ReadyJob> = ready
            .into_iter()
            .filter(|r| !hopeless.contains(&r.job))
            .collect();
        let views: Vec<WorkerView> = views.into_iter().filter(|v| reachable(&v.name)).collect();
        let assignments = scheduler::schedule(&ready, &views).assignments;
        let mut commands = Vec::new();
        if !assignments.is_empty() {
            commands.push(Command::GrantLeases {
                now_ms,
                term,
                grants: assignments
                    .into_iter()
                    .map(|a| Grant {
                        job: a.job,
                        worker: a.worker,
                        deadline_ms: now_ms.saturating_add(lease_ms),
                    })
                    .collect(),
            });
        }
        if !unplaceable.is_empty() {
            commands.push(Command::Unplaceable {
                now_ms,
                jobs: unplaceable
                    .into_iter()
                    .map(|u| UnplaceableJob {
                        job: u.job,
                        message: u.message,
                    })
                    .collect(),
            });
        }
        match commands.len() {
            0 => None,
            1 => commands.pop(),
            _ => Some(Command::Batch { commands }),
        }
    }

    /// Finished builds that ended `retain_ms` or more before `now_ms`, oldest first, at most
    /// `limit` of them: what the leader retires.
    pub fn builds_to_retire(&self, now_ms: u64, retain_ms: u64, limit: usize) -> Vec<BuildId> {
        let mut old: Vec<(u64, BuildId)> = self
            .builds
            .values()
            .filter_map(|b| {
                let ended = b.finished_at_ms?;
                (b.status.is_finished() && ended.saturating_add(retain_ms) <= now_ms)
                    .then_some((ended, b.id))
            })
            .collect();
        old.sort_unstable();
        old.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    /// Of the jobs a worker says it runs, those nobody wants any more (their build was
    /// cancelled, failed or forgotten), with the epoch to cancel them under: the job's latest,
    /// or `u64::MAX` for a job no longer known. A job re-leased elsewhere or done is not among
    /// them: a late result is refused by its stale token.
    pub fn jobs_to_stop(&self, running: &[u64]) -> Vec<(JobId, u64)> {
        running
            .iter()
            .filter_map(|id| {
                let id = JobId(*id);
                match self.jobs.get(&id) {
                    None => Some((id, u64::MAX)),
                    Some(j) if matches!(j.state, JobState::Cancelled) => Some((id, j.epoch)),
                    Some(_) => None,
                }
            })
            .collect()
    }

    /// Leases whose deadline is at or before `now_ms`, by job id.
    pub fn expired_leases(&self, now_ms: u64) -> Vec<LeaseRef> {
        self.index
            .leased
            .iter()
            .filter_map(|id| match &self.jobs[id].state {
                JobState::Leased(l) if l.deadline_ms <= now_ms => Some(LeaseRef {
                    job: *id,
                    token: l.token,
                    worker: l.worker.clone(),
                    deadline_ms: l.deadline_ms,
                }),
                _ => None,
            })
            .collect()
    }

    /// The `ExpireLeases` command for the leases past their deadline, if any.
    pub fn expire_round(&self, now_ms: u64) -> Option<Command> {
        let leases = self.expired_leases(now_ms);
        (!leases.is_empty()).then_some(Command::ExpireLeases { now_ms, leases })
    }

    /// Leases held per worker, every known worker listed.
    pub fn running_counts(&self) -> BTreeMap<String, usize> {
        self.workers
            .keys()
            .map(|name| (name.clone(), self.running_on(name)))
            .collect()
    }

    /// What a worker needs to run `job`.
    pub fn job_spec(&self, job: JobId) -> Option<JobSpec<'_>> {
        let j = self.jobs.get(&job)?;
        let build = self.builds.get(&j.build)?;
        let instance = build.plan.instances.get(j.instance)?;
        let inputs = j
            .deps
            .iter()
            .filter_map(|d| {
                let dep = self.jobs.get(d)?;
                let index = build.plan.instances.get(dep.instance)?.index;
                match &dep.state {
                    JobState::Done { result, .. } => Some((index, result)),
                    _ => None,
                }
            })
            .collect();
        Some(JobSpec {
            job,
            build: j.build,
            request: &build.request,
            build_platform: &build.plan.build_platform,
            instance,
            lease: match &j.state {
                JobState::Leased(l) => Some(l),
                _ => None,
            },
            inputs,
        })
    }

    /// Counters for metrics.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for b in self.builds.values() {
            match &b.status {
                BuildStatus::Queued => c.builds_queued += 1,
                BuildStatus::Running => c.builds_running += 1,
                BuildStatus::Succeeded => c.builds_succeeded += 1,
                BuildStatus::Failed { .. } => c.builds_failed += 1,
                BuildStatus::Cancelled { .. } => c.builds_cancelled += 1,
            }
            if !b.status.is_finished() {
                c.jobs_waiting += b
                    .jobs
                    .iter()
                    .filter(|id| self.jobs[id].state == JobState::Waiting)
                    .count() as u64;
            }
        }
        c.jobs_ready = self.index.ready.len() as u64;
        c.jobs_running = self.index.leased.len() as u64;
        for id in &self.index.ready {
            *c.ready_by_platform
                .entry(self.jobs[id].platform.to_string())
                .or_default() += 1;
        }
        for id in &self.index.leased {
            *c.running_by_platform
                .entry(self.jobs[id].platform.to_string())
                .or_default() += 1;
        }
        for w in self.workers.values() {
            match w.state {
                WorkerState::Active => {
                    c.workers_active += 1;
                    c.slots_total += u64::from(w.capacity);
                    c.slots_busy += self.running_on(&w.name) as u64;
                }
                WorkerState::Draining => c.workers_draining += 1,
                WorkerState::Gone => c.workers_gone += 1,
            }
        }
        c.cache_keys = self.cache.len() as u64;
        c
    }

    /// The status summary: every unfinished build and the last `finished` finished ones.
    pub fn status(&self, finished: usize) -> StatusSummary {
        let mut builds: Vec<BuildLine> = Vec::new();
        let mut done: Vec<BuildLine> = Vec::new();
        let mut tenants: BTreeMap<&str, TenantLine> = BTreeMap::new();
        for b in self.builds.values() {
            let mut jobs = JobCounts::default();
            for id in &b.jobs {
                jobs.total += 1;
                match self.jobs[id].state {
                    JobState::Waiting => jobs.waiting += 1,
                    JobState::Ready => jobs.ready += 1,
                    JobState::Leased(_) => jobs.running += 1,
                    JobState::Done { .. } => jobs.done += 1,
                    JobState::Failed { .. } => jobs.failed += 1,
                    JobState::Cancelled => jobs.cancelled += 1,
                }
            }
            let t = tenants.entry(&b.tenant).or_insert_with(|| TenantLine {
                tenant: b.tenant.clone(),
                ..Default::default()
            });
            match b.status {
                BuildStatus::Queued => t.builds_queued += 1,
                BuildStatus::Running => t.builds_running += 1,
                _ => {}
            }
            t.jobs_ready += jobs.ready;
            t.jobs_running += jobs.running;
            let line = BuildLine {
                id: b.id,
                tenant: b.tenant.clone(),
                status: b.status.clone(),
                submitted_at_ms: b.submitted_at_ms,
                started_at_ms: b.started_at_ms,
                finished_at_ms: b.finished_at_ms,
                jobs,
            };
            if b.status.is_finished() {
                done.push(line);
            } else {
                builds.push(line);
            }
        }
        let skip = done.len().saturating_sub(finished);
        builds.extend(done.into_iter().skip(skip));
        builds.sort_by_key(|b| b.id);
        StatusSummary {
            last_applied: self.last_applied,
            term: self.term,
            clock_ms: self.clock_ms,
            counters: self.counters(),
            builds,
            tenants: tenants.into_values().collect(),
            workers: self
                .workers
                .values()
                .map(|w| WorkerLine {
                    name: w.name.clone(),
                    state: w.state,
                    capabilities: w.capabilities.clone(),
                    capacity: w.capacity,
                    running: self.running_on(&w.name) as u64,
                    labels: w.labels.clone(),
                })
                .collect(),
        }
    }
}

impl StatusSummary {
    /// The human-readable form `strata status` prints.
    pub fn to_text(&self) -> String {
        let c = &self.counters;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "builds: {} queued, {} running, {} succeeded, {} failed, {} cancelled",
            c.builds_queued,
            c.builds_running,
            c.builds_succeeded,
            c.builds_failed,
            c.builds_cancelled
        );
        let _ = writeln!(
            out,
            "jobs: {} waiting, {} ready, {} running; slots {}/{} busy",
            c.jobs_waiting, c.jobs_ready, c.jobs_running, c.slots_busy, c.slots_total
        );
        for b in &self.builds {
            let _ = write!(
                out,
                "build {} [{}] {}: {}/{} done, {} running, {} ready",
                b.id,
                b.tenant,
                b.status.name(),
                b.jobs.done,
                b.jobs.total,
                b.jobs.running,
                b.jobs.ready
            );
            match &b.status {
                BuildStatus::Failed { error } => {
                    let _ = write!(out, ": {error}");
                }
                BuildStatus::Cancelled { reason } => {
                    let _ = write!(out, ": {reason}");
                }
                _ => {}
            }
            out.push('\n');
        }
        for w in &self.workers {
            let _ = writeln!(
                out,
                "worker {} {}: {}/{} slots busy ({})",
                w.name,
                w.state.name(),
                w.running,
                w.capacity,
                w.capabilities
            );
        }
        out
    }
}
