//! The jobs a worker holds: their leases (fencing tokens), the slots they take, and the tasks
//! that run them. One table serves the remote agent and the embedded worker alike: offers are
//! admitted against the capacity, an offer under a newer lease replaces the old run, a
//! cancellation stops the run it names, and a job stays held until its result is delivered.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use strata_shared::wire::{CancelJob, JobId, JobOffer};
use tokio::task::AbortHandle;

/// A job's lease: the fencing token its result must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    pub epoch: u64,
    pub term: u64,
}

impl Lease {
    pub fn of(offer: &JobOffer) -> Lease {
        Lease {
            job_id: offer.job_id,
            epoch: offer.epoch,
            term: offer.term,
        }
    }

    fn token(&self) -> (u64, u64) {
        (self.epoch, self.term)
    }
}

/// Where a held job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Running on the engine: it takes a slot.
    Running,
    /// Finished; its result is being delivered (no slot, but still reported in heartbeats so
    /// that the leader keeps its lease while the result is on its way).
    Reporting,
}

#[derive(Debug)]
struct Slot {
    epoch: u64,
    term: u64,
    phase: Phase,
    task: Option<AbortHandle>,
}

/// What to do with an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A slot is reserved: run it.
    Run,
    /// This very lease is already held here (an offer sent again): take it, run nothing new.
    AlreadyHeld,
    /// Declined, with the reason.
    Declined(String),
}

/// The jobs this worker holds, by id, with their leases and tasks. At most `capacity` run at
/// once; a job stays listed (and in heartbeats) until its result is delivered or dropped.
#[derive(Debug)]
pub struct Jobs {
    capacity: usize,
    slots: Mutex<HashMap<JobId, Slot>>,
}

impl Jobs {
    pub fn new(capacity: u32) -> Jobs {
        Jobs {
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX).max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Decides on an offer of `lease` and reserves a slot when it is to run. An offer of a
    /// job held under an older lease replaces it (the old run is stopped: its result would be
    /// refused); an offer older than the lease held is declined.
    pub fn admit(&self, lease: Lease) -> Admission {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(&lease.job_id) {
            let held = (slot.epoch, slot.term);
            if held == lease.token() {
                return Admission::AlreadyHeld;
            }
            if lease.token() < held {
                return Admission::Declined(format!(
                    "job {} already runs here under a newer lease (epoch {}, term {})",
                    lease.job_id, slot.epoch, slot.term
                ));
            }
            if let Some(old) = slots.remove(&lease.job_id)
                && let Some(task) = old.task
            {
                task.abort();
            }
        }
        let running = slots.values().filter(|s| s.phase == Phase::Running).count();
        if running >= self.capacity {
            return Admission::Declined(format!(
                "no free slot: {running} of {} jobs running",
                self.capacity
            ));
        }
        slots.insert(
            lease.job_id,
            Slot {
                epoch: lease.epoch,
                term: lease.term,
                phase: Phase::Running,
                task: None,
            },
        );
        Admission::Run
    }

    fn holds(slots: &HashMap<JobId, Slot>, lease: Lease) -> bool {
        slots
            .get(&lease.job_id)
            .is_some_and(|s| (s.epoch, s.term) == lease.token())
    }

    /// Gives the slot of `lease` its task; a job cancelled in the meantime is stopped at once.
    pub fn attach(&self, lease: Lease, task: AbortHandle) {
        let mut slots = lock(&self.slots);
        match slots.get_mut(&lease.job_id) {
            Some(slot) if (slot.epoch, slot.term) == lease.token() => slot.task = Some(task),
            _ => task.abort(),
        }
    }

    /// The job of `lease` has run: its slot is free, its result on the way.
    pub fn reporting(&self, lease: Lease) {
        let mut slots = lock(&self.slots);
        if Self::holds(&slots, lease)
            && let Some(slot) = slots.get_mut(&lease.job_id)
        {
            slot.phase = Phase::Reporting;
        }
    }

    /// Forgets the job of `lease` (its result was delivered or given up, or it never started).
    pub fn finish(&self, lease: Lease) {
        let mut slots = lock(&self.slots);
        if Self::holds(&slots, lease) {
            slots.remove(&lease.job_id);
        }
    }

    /// Stops the job `cancel` names when it runs here under that epoch or an older one.
    pub fn cancel(&self, cancel: &CancelJob) -> Result<(), String> {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get(&cancel.job_id) else {
            return Err(format!("job {} does not run here", cancel.job_id));
        };
        if cancel.epoch < slot.epoch {
            return Err(format!(
                "job {} runs here under epoch {}, newer than the cancelled epoch {}",
                cancel.job_id, slot.epoch, cancel.epoch
            ));
        }
        if let Some(slot) = slots.remove(&cancel.job_id)
            && let Some(task) = slot.task
        {
            task.abort();
        }
        Ok(())
    }

    /// The ids of the jobs held, for heartbeats.
    pub fn held(&self) -> Vec<JobId> {
        let mut ids: Vec<JobId> = lock(&self.slots).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Stops every job (shutdown).
    pub fn abort_all(&self) {
        for (_, slot) in lock(&self.slots).drain() {
            if let Some(task) = slot.task {
                task.abort();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(job_id: JobId, epoch: u64, term: u64) -> Lease {
        Lease {
            job_id,
            epoch,
            term,
        }
    }

    #[test]
    fn capacity_bounds_running_jobs_but_not_reporting_ones() {
        let jobs = Jobs::new(2);
        assert_eq!(jobs.admit(lease(1, 1, 1)), Admission::Run);
        assert_eq!(jobs.admit(lease(2, 1, 1)), Admission::Run);
        let Admission::Declined(reason) = jobs.admit(lease(3, 1, 1)) else {
            panic!("no slot left");
        };
        assert!(reason.contains("no free slot: 2 of 2"), "{reason}");
        // Job 1 ran; its result is on the way: it no longer takes a slot but is still held.
        jobs.reporting(lease(1, 1, 1));
        assert_eq!(jobs.admit(lease(3, 1, 1)), Admission::Run);
        assert_eq!(jobs.held(), [1, 2, 3]);
        jobs.finish(lease(1, 1, 1));
        assert_eq!(jobs.held(), [2, 3]);
    }

    #[test]
    fn offers_again_and_newer_leases() {
        let jobs = Jobs::new(1);
        assert_eq!(jobs.admit(lease(7, 2, 1)), Admission::Run);
        assert_eq!(jobs.admit(lease(7, 2, 1)), Admission::AlreadyHeld);
        assert!(
            matches!(jobs.admit(lease(7, 1, 1)), Admission::Declined(r) if r.contains("newer lease"))
        );
        // A newer lease replaces the old run (which would be fenced off anyway), even at
        // capacity.
        assert_eq!(jobs.admit(lease(7, 3, 2)), Admission::Run);
        jobs.finish(lease(7, 2, 1));
        assert_eq!(
            jobs.held(),
            [7],
            "finishing the old lease leaves the new one"
        );
        jobs.finish(lease(7, 3, 2));
        assert!(jobs.held().is_empty());
    }

    #[tokio::test]
    async fn cancel_stops_the_task_of_that_epoch() {
        let jobs = Jobs::new(4);
        assert_eq!(jobs.admit(lease(5, 3, 1)), Admission::Run);
        let task = tokio::spawn(std::future::pending::<()>());
        jobs.attach(lease(5, 3, 1), task.abort_handle());
        let stale = CancelJob {
            job_id: 5,
            epoch: 2,
        };
        assert!(
            jobs.cancel(&stale)
                .unwrap_err()
                .contains("newer than the cancelled epoch")
        );
        assert!(!task.is_finished());
        jobs.cancel(&CancelJob {
            job_id: 5,
            epoch: 3,
        })
        .unwrap();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(jobs.held().is_empty());
        assert!(
            jobs.cancel(&CancelJob {
                job_id: 5,
                epoch: 3
            })
            .unwrap_err()
            .contains("does not run here")
        );
        // A task attached after its job was cancelled is stopped at once.
        let late = tokio::spawn(std::future::pending::<()>());
        jobs.attach(lease(5, 3, 1), late.abort_handle());
        assert!(late.await.unwrap_err().is_cancelled());
    }
}
