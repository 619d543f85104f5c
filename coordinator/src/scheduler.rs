//! The scheduler: which ready job runs on which worker, decided by a pure function of the
//! ready jobs and the workers ([`schedule`]). No network, no clock; the leader feeds it the
//! state machine's view ([`crate::state::StateMachine::ready_jobs`],
//! [`crate::state::StateMachine::worker_views`]) and proposes the result as one
//! `GrantLeases` command.
//!
//! Rules, in order:
//! 1. Strict platform placement, exactly as [`crate::placement::place`]: a job runs on a
//!    worker of its platform when any active worker runs it natively (even if those are busy:
//!    it waits rather than run emulated); under emulation only when no worker runs it natively
//!    and its build allows emulation; never on a wrong architecture. A job no active worker
//!    can ever run is reported [`Unplaceable`] with placement's message, which names the
//!    platform and the workers.
//! 2. Capacity: a worker gets no more jobs than its free slots.
//! 3. Jobs are taken in their fairness order ([`ReadyJob::rank`]); a job that finds no free
//!    slot is skipped, not waited on, so other platforms keep flowing.
//! 4. Among the eligible workers with a free slot: the one holding the most bytes of the job's
//!    parent layers (locality), then the least loaded (running / capacity, counting this
//!    round's assignments), then the one running fewest jobs of the same build (independent
//!    jobs of one build spread over workers), then by name.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use strata_shared::platform::{Capabilities, Platform};

use crate::placement::{Emulation, WorkerInfo, place_stage};
use crate::state::{BuildId, JobId};
use strata_shared::dag::Placement;

/// The layers of a parent stage, by its cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLayer {
    pub key: String,
    /// Bytes a worker lacking them must fetch.
    pub size: u64,
}

/// A job waiting for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyJob {
    pub job: JobId,
    pub build: BuildId,
    pub tenant: String,
    /// Position in the fair order: lower goes first.
    pub rank: usize,
    pub platform: Platform,
    /// Whether it runs a command; one that does not may go to any worker.
    pub executes: bool,
    /// The build's emulation policy.
    pub emulation: Emulation,
    /// The outputs of the stages it builds on.
    pub parents: Vec<ParentLayer>,
}

/// An active worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub name: String,
    pub capabilities: Capabilities,
    /// Slots.
    pub capacity: u32,
    /// Leases it holds.
    pub running: u32,
    /// Leases it holds, per build.
    pub running_by_build: BTreeMap<BuildId, u32>,
    /// Cache keys whose layers it holds locally (at least those of the ready jobs' parents).
    pub holds: BTreeSet<String>,
}

/// A job for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job: JobId,
    pub build: BuildId,
    pub worker: String,
    /// Whether the worker runs the platform under emulation.
    pub emulated: bool,
    /// Bytes of parent layers the worker already holds.
    pub locality: u64,
}

/// A job no active worker can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    pub job: JobId,
    pub build: BuildId,
    pub platform: Platform,
    /// Names the platform and the workers (from [`crate::placement::place`]).
    pub message: String,
}

/// One scheduling round's decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub assignments: Vec<Assignment>,
    pub unplaceable: Vec<Unplaceable>,
}

/// Assigns ready jobs to workers. See the module documentation for the rules.
pub fn schedule(ready: &[ReadyJob], workers: &[WorkerView]) -> Schedule {
    let infos: Vec<WorkerInfo> = workers
        .iter()
        .map(|w| WorkerInfo {
            name: w.name.clone(),
            capabilities: w.capabilities.clone(),
        })
        .collect();
    let mut load: Vec<u32> = workers.iter().map(|w| w.running).collect();
    let mut by_build: Vec<BTreeMap<BuildId, u32>> =
        workers.iter().map(|w| w.running_by_build.clone()).collect();
    let mut free: u64 = workers
        .iter()
        .map(|w| u64::from(w.capacity.saturating_sub(w.running)))
        .sum();
    // Placement depends only on the platform and the policy: decide once per pair.
    let mut placements: BTreeMap<(Platform, bool, bool), Result<Placement, String>> =
        BTreeMap::new();

    let mut order: Vec<&ReadyJob> = ready.iter().collect();
    order.sort_by_key(|j| j.rank);

    let mut out = Schedule::default();
    for job in order {
        let allow = job.emulation == Emulation::Allow;
        let placed = placements
            .entry((job.platform.clone(), allow, job.executes))
            .or_insert_with(|| {
                place_stage(&job.platform, job.executes, &infos, job.emulation)
                    .map_err(|e| e.message)
            });
        let placement = match placed {
            Ok(p) => p.clone(),
            Err(message) => {
                out.unplaceable.push(Unplaceable {
                    job: job.job,
                    build: job.build,
                    platform: job.platform.clone(),
                    message: message.clone(),
                });
                continue;
            }
        };
        if free == 0 {
            // Keep going only to find unplaceable jobs.
            continue;
        }
        let mut best: Option<(usize, u64)> = None;
        for (i, w) in workers.iter().enumerate() {
            let eligible = match &placement {
                Placement::Anywhere { .. } => true,
                Placement::On { emulated: true, .. } => w.capabilities.emulated_for(&job.platform),
                _ => w.capabilities.native_for(&job.platform),
            };
            if !eligible || load[i] >= w.capacity {
                continue;
            }
            let locality: u64 = job
                .parents
                .iter()
                .filter(|p| w.holds.contains(&p.key))
                .map(|p| p.size.max(1))
                .sum();
            let better = match best {
                None => true,
                Some((b, b_locality)) => {
                    let candidate = Candidate {
                        locality,
                        load: load[i],
                        capacity: w.capacity,
                        same_build: by_build[i].get(&job.build).copied().unwrap_or(0),
                        name: &w.name,
                    };
                    let incumbent = Candidate {
                        locality: b_locality,
                        load: load[b],
                        capacity: workers[b].capacity,
                        same_build: by_build[b].get(&job.build).copied().unwrap_or(0),
                        name: &workers[b].name,
                    };
                    candidate.cmp_preference(&incumbent) == Ordering::Less
                }
            };
            if better {
                best = Some((i, locality));
            }
        }
        let Some((i, locality)) = best else {
            continue;
        };
        load[i] += 1;
        *by_build[i].entry(job.build).or_insert(0) += 1;
        free -= 1;
        out.assignments.push(Assignment {
            job: job.job,
            build: job.build,
            worker: workers[i].name.clone(),
            emulated: placement.emulated().unwrap_or_default(),
            locality,
        });
    }
    out
}

/// A worker's standing for one job.
struct Candidate<'a> {
    locality: u64,
    load: u32,
    capacity: u32,
    same_build: u32,
    name: &'a str,
}

impl Candidate<'_> {
    /// `Less` when `self` is preferred.
    fn cmp_preference(&self, other: &Self) -> Ordering {
        other
            .locality
            .cmp(&self.locality)
            .then_with(|| {
                // load / capacity, compared without division.
                (u64::from(self.load) * u64::from(other.capacity))
                    .cmp(&(u64::from(other.load) * u64::from(self.capacity)))
            })
            .then_with(|| self.same_build.cmp(&other.same_build))
            .then_with(|| self.name.cmp(other.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn worker(name: &str, native: &[&str], emulated: &[&str], capacity: u32) -> WorkerView {
        WorkerView {
            name: name.into(),
            capabilities: Capabilities {
                native: native.iter().map(|s| p(s)).collect(),
                emulated: emulated.iter().map(|s| p(s)).collect(),
            },
            capacity,
            running: 0,
            running_by_build: BTreeMap::new(),
            holds: BTreeSet::new(),
        }
    }

    fn job(id: u64, build: u64, platform: &str, rank: usize) -> ReadyJob {
        ReadyJob {
            job: JobId(id),
            build: BuildId(build),
            tenant: "t".into(),
            rank,
            platform: p(platform),
            executes: true,
            emulation: Emulation::Allow,
            parents: Vec::new(),
        }
    }

    fn placed(s: &Schedule) -> Vec<(u64, &str)> {
        s.assignments
            .iter()
            .map(|a| (a.job.0, a.worker.as_str()))
            .collect()
    }

    #[test]
    fn arm64_never_goes_to_an_amd64_only_worker() {
        let workers = [worker("x86", &["linux/amd64"], &[], 8)];
        let s = schedule(&[job(1, 1, "linux/arm64", 0)], &workers);
        assert!(s.assignments.is_empty());
        assert_eq!(s.unplaceable.len(), 1);
        assert!(
            s.unplaceable[0]
                .message
                .starts_with("no worker can build linux/arm64; workers: x86 (native linux/amd64"),
            "{}",
            s.unplaceable[0].message
        );
    }

    #[test]
    fn a_job_that_runs_no_command_goes_to_any_worker() {
        let workers = [worker("x86", &["linux/amd64"], &[], 8)];
        let mut copy_only = job(1, 1, "linux/arm/v7", 0);
        copy_only.executes = false;
        let s = schedule(&[copy_only, job(2, 1, "linux/arm/v7", 1)], &workers);
        assert_eq!(placed(&s), [(1, "x86")]);
        assert!(!s.assignments[0].emulated);
        assert_eq!(
            s.unplaceable.len(),
            1,
            "the job that runs a command waits for arm"
        );
        assert_eq!(s.unplaceable[0].job, JobId(2));
    }

    #[test]
    fn emulation_only_when_the_build_allows_and_the_worker_emulates() {
        let workers = [
            worker("x86-plain", &["linux/amd64"], &[], 8),
            worker("x86-qemu", &["linux/amd64"], &["linux/arm64"], 8),
        ];
        let allowed = schedule(&[job(1, 1, "linux/arm64", 0)], &workers);
        assert_eq!(placed(&allowed), [(1, "x86-qemu")]);
        assert!(allowed.assignments[0].emulated);

        let mut denied = job(1, 1, "linux/arm64", 0);
        denied.emulation = Emulation::Deny;
        let s = schedule(&[denied], &workers);
        assert!(s.assignments.is_empty());
        assert!(
            s.unplaceable[0]
                .message
                .contains("emulation is denied (--emulation=deny)"),
            "{}",
            s.unplaceable[0].message
        );
    }

    #[test]
    fn native_workers_are_waited_for_rather_than_emulating() {
        let mut arm = worker("arm", &["linux/arm64"], &[], 1);
        arm.running = 1;
        let workers = [
            arm,
            worker("x86-qemu", &["linux/amd64"], &["linux/arm64"], 8),
        ];
        let s = schedule(&[job(1, 1, "linux/arm64", 0)], &workers);
        assert!(s.assignments.is_empty(), "{s:?}");
        assert!(s.unplaceable.is_empty());
    }

    #[test]
    fn capacity_is_respected() {
        let mut busy = worker("a", &["linux/amd64"], &[], 2);
        busy.running = 1;
        let workers = [busy, worker("b", &["linux/amd64"], &[], 1)];
        let ready: Vec<ReadyJob> = (1..=5)
            .map(|i| job(i, 1, "linux/amd64", i as usize))
            .collect();
        let s = schedule(&ready, &workers);
        assert_eq!(s.assignments.len(), 2, "one free slot on each worker");
        let mut on: Vec<&str> = s.assignments.iter().map(|a| a.worker.as_str()).collect();
        on.sort_unstable();
        assert_eq!(on, ["a", "b"]);
    }

    #[test]
    fn the_worker_holding_the_parent_layers_wins_even_when_busier() {
        let mut holder = worker("z-holder", &["linux/amd64"], &[], 4);
        holder.running = 3;
        holder.holds.insert("key-base".into());
        let workers = [worker("a-idle", &["linux/amd64"], &[], 4), holder];
        let mut j = job(1, 1, "linux/amd64", 0);
        j.parents = vec![ParentLayer {
            key: "key-base".into(),
            size: 10 << 20,
        }];
        let s = schedule(&[j], &workers);
        assert_eq!(placed(&s), [(1, "z-holder")]);
        assert_eq!(s.assignments[0].locality, 10 << 20);

        // More parent bytes beat fewer.
        let mut small = worker("small", &["linux/amd64"], &[], 4);
        small.holds.insert("tools".into());
        let mut big = worker("big", &["linux/amd64"], &[], 4);
        big.holds.insert("base".into());
        let mut j = job(2, 1, "linux/amd64", 0);
        j.parents = vec![
            ParentLayer {
                key: "tools".into(),
                size: 1 << 20,
            },
            ParentLayer {
                key: "base".into(),
                size: 50 << 20,
            },
        ];
        assert_eq!(placed(&schedule(&[j], &[small, big])), [(2, "big")]);
    }

    #[test]
    fn least_loaded_then_name() {
        let mut a = worker("a", &["linux/amd64"], &[], 4);
        a.running = 2;
        let mut b = worker("b", &["linux/amd64"], &[], 8);
        b.running = 2;
        let s = schedule(&[job(1, 1, "linux/amd64", 0)], &[a.clone(), b]);
        assert_eq!(placed(&s), [(1, "b")], "2/8 is less loaded than 2/4");
        let s = schedule(&[job(1, 1, "linux/amd64", 0)], &[a.clone(), a.clone()]);
        assert_eq!(placed(&s), [(1, "a")]);
        let mut c = a.clone();
        c.name = "c".into();
        let s = schedule(&[job(1, 1, "linux/amd64", 0)], &[c, a]);
        assert_eq!(placed(&s), [(1, "a")], "ties go to the first name");
    }

    #[test]
    fn independent_jobs_of_one_build_spread_over_workers() {
        let workers = [
            worker("w1", &["linux/amd64"], &[], 4),
            worker("w2", &["linux/amd64"], &[], 4),
            worker("w3", &["linux/amd64"], &[], 4),
        ];
        let ready: Vec<ReadyJob> = (1..=3)
            .map(|i| job(i, 7, "linux/amd64", i as usize))
            .collect();
        let s = schedule(&ready, &workers);
        assert_eq!(placed(&s), [(1, "w1"), (2, "w2"), (3, "w3")]);

        // With equal load, the worker running fewer jobs of the build is preferred.
        let mut w1 = worker("w1", &["linux/amd64"], &[], 4);
        w1.running = 1;
        w1.running_by_build.insert(BuildId(7), 1);
        let mut w2 = worker("w2", &["linux/amd64"], &[], 4);
        w2.running = 1;
        w2.running_by_build.insert(BuildId(3), 1);
        let s = schedule(&[job(9, 7, "linux/amd64", 0)], &[w1, w2]);
        assert_eq!(placed(&s), [(9, "w2")]);
    }

    #[test]
    fn fair_order_decides_who_gets_scarce_slots() {
        let workers = [worker("w", &["linux/amd64"], &[], 2)];
        // Two builds, interleaved by rank: a1, b1, a2, b2.
        let ready = [
            job(1, 1, "linux/amd64", 0),
            job(3, 1, "linux/amd64", 2),
            job(10, 2, "linux/amd64", 1),
            job(11, 2, "linux/amd64", 3),
        ];
        let s = schedule(&ready, &workers);
        assert_eq!(placed(&s), [(1, "w"), (10, "w")]);
    }

    #[test]
    fn a_full_platform_does_not_block_another() {
        let mut arm = worker("arm", &["linux/arm64"], &[], 1);
        arm.running = 1;
        let workers = [arm, worker("x86", &["linux/amd64"], &[], 1)];
        let ready = [job(1, 1, "linux/arm64", 0), job(2, 1, "linux/amd64", 1)];
        assert_eq!(placed(&schedule(&ready, &workers)), [(2, "x86")]);
    }

    #[test]
    fn unplaceable_jobs_are_reported_even_when_every_slot_is_taken() {
        let workers = [worker("x86", &["linux/amd64/v3"], &[], 1)];
        let ready = [
            job(1, 1, "linux/amd64", 0),
            job(2, 1, "linux/amd64/v4", 1),
            job(3, 2, "linux/riscv64", 2),
        ];
        let s = schedule(&ready, &workers);
        assert_eq!(placed(&s), [(1, "x86")]);
        let bad: Vec<(u64, String)> = s
            .unplaceable
            .iter()
            .map(|u| (u.job.0, u.platform.to_string()))
            .collect();
        assert_eq!(
            bad,
            [
                (2, "linux/amd64/v4".to_string()),
                (3, "linux/riscv64".into())
            ]
        );
        assert!(
            s.unplaceable[1]
                .message
                .contains("x86 (native linux/amd64/v3")
        );
    }

    #[test]
    fn no_workers_at_all_is_unplaceable_naming_none() {
        let s = schedule(&[job(1, 1, "linux/amd64", 0)], &[]);
        assert_eq!(
            s.unplaceable[0].message,
            "no worker can build linux/amd64; workers: none"
        );
    }

    #[test]
    fn the_result_does_not_depend_on_the_input_order_of_equal_workers() {
        let a = worker("a", &["linux/amd64"], &[], 1);
        let b = worker("b", &["linux/amd64"], &[], 1);
        let ready = [job(1, 1, "linux/amd64", 0), job(2, 1, "linux/amd64", 1)];
        let one = schedule(&ready, &[a.clone(), b.clone()]);
        let two = schedule(&ready, &[b, a]);
        assert_eq!(placed(&one), placed(&two));
    }
}
