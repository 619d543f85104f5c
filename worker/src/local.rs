//! The embedded worker: this process's engine as the one worker of the embedded cluster.
//!
//! It answers the same requests a remote worker's agent does ([`CoordinatorToWorker::Offer`],
//! [`CoordinatorToWorker::Cancel`]) with the same job table ([`Jobs`]), and reports the same
//! messages ([`WorkerMsg::Progress`], [`WorkerMsg::Result`], [`WorkerMsg::Heartbeat`]), but
//! in this process: the coordinator hands it requests through a channel, and it hands its
//! reports to a channel the caller delivers in order. Unlike a remote worker it takes jobs
//! whose context is a directory of this machine, and secrets: they come from the user of this
//! very process.

use std::sync::Arc;

use strata_shared::job::StageJob;
use strata_shared::progress::Progress;
use strata_shared::wire::{
    CoordinatorToWorker, Heartbeat, JobAck, JobProgress, JobResult, RegisterWorker, WorkerMsg,
};
use tokio::sync::mpsc;

use crate::agent::{capabilities_strings, outcome_of};
use crate::engine::Engine;
use crate::jobs::{Admission, Jobs, Lease};

/// The name the embedded worker registers under.
pub const NAME: &str = "local";

/// The engine of this process, as a worker.
pub struct LocalWorker {
    engine: Engine,
    jobs: Jobs,
    capacity: u32,
    /// Where progress and results go, in the order they happened.
    report: mpsc::UnboundedSender<WorkerMsg>,
}

impl LocalWorker {
    /// A worker running up to `capacity` jobs at once on `engine`; its reports go to the
    /// returned receiver.
    pub fn new(
        engine: Engine,
        capacity: u32,
    ) -> (Arc<LocalWorker>, mpsc::UnboundedReceiver<WorkerMsg>) {
        let (report, reports) = mpsc::unbounded_channel();
        let worker = LocalWorker {
            engine,
            jobs: Jobs::new(capacity),
            capacity,
            report,
        };
        (Arc::new(worker), reports)
    }

    /// How it registers: this machine's platforms, native and emulated.
    pub fn registration(&self) -> RegisterWorker {
        let (native, emulated) = capabilities_strings(&crate::platforms::detect());
        RegisterWorker {
            name: NAME.into(),
            native,
            emulated,
            capacity: self.capacity,
            labels: Vec::new(),
        }
    }

    /// The heartbeat to send now: the jobs it holds.
    pub fn heartbeat(&self) -> WorkerMsg {
        WorkerMsg::Heartbeat(Heartbeat {
            worker: NAME.into(),
            running: self.jobs.held(),
        })
    }

    /// Answers one request of the coordinator; an offer taken starts its job.
    pub fn handle(self: &Arc<Self>, msg: CoordinatorToWorker) -> WorkerMsg {
        let ack = |accepted: bool, reason: String| WorkerMsg::Ack(JobAck { accepted, reason });
        match msg {
            CoordinatorToWorker::Offer(offer) => {
                let lease = Lease::of(&offer);
                if let Err(e) = check_local(&offer.job) {
                    return ack(false, format!("invalid job: {e}"));
                }
                match self.jobs.admit(lease) {
                    Admission::Run => {
                        let task = tokio::spawn(self.clone().run(lease, offer.job));
                        self.jobs.attach(lease, task.abort_handle());
                        ack(true, String::new())
                    }
                    Admission::AlreadyHeld => ack(true, String::new()),
                    Admission::Declined(reason) => ack(false, reason),
                }
            }
            CoordinatorToWorker::Cancel(cancel) => match self.jobs.cancel(&cancel) {
                Ok(()) => ack(true, String::new()),
                Err(reason) => ack(false, reason),
            },
            other => ack(false, format!("not a request for a worker: {other:?}")),
        }
    }

    /// Stops every job it runs: their containers are killed and their mounts released as
    /// their tasks end.
    pub fn stop_all(&self) {
        self.jobs.abort_all();
    }

    /// Runs one job and reports its progress, then its result.
    async fn run(self: Arc<Self>, lease: Lease, job: StageJob) {
        let (progress, mut events) = Progress::channel();
        let report = self.report.clone();
        let job_id = lease.job_id;
        let forward = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let _ = report.send(WorkerMsg::Progress(JobProgress { job_id, event }));
            }
        });
        let result = self.engine.run_stage(&job, &progress).await;
        drop(progress);
        let _ = forward.await;
        self.jobs.reporting(lease);
        let _ = self.report.send(WorkerMsg::Result(JobResult {
            job_id,
            epoch: lease.epoch,
            term: lease.term,
            outcome: outcome_of(result, &job),
        }));
        self.jobs.finish(lease);
    }
}

/// What the embedded worker checks of a job: its platforms are in normal form. Directories
/// and secrets are this process's own.
fn check_local(job: &StageJob) -> Result<(), String> {
    strata_shared::job::check_platform(&job.build_platform)?;
    strata_shared::job::check_platform(&job.target_platform)
}
