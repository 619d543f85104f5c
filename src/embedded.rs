//! `strata build` with no cluster configured: the build runs on an embedded cluster in this
//! process. An embedded coordinator ([`LocalCluster`]: one Raft node, the replicated state
//! machine, the scheduler) leases the build's stage jobs to the embedded worker
//! ([`LocalWorker`]: this process's engine), with the messages a cluster uses; only the
//! transport is a channel instead of QUIC.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use strata_coordinator::server::LocalCluster;
use strata_shared::job::{BuildRequest, StageOutput};
use strata_shared::platform::Platform;
use strata_shared::progress::Progress;
use strata_shared::wire::{BuildOutcome, ClientMsg, CoordinatorToClient, SubmitBuild, WatchBuild};
use strata_worker::engine::Engine;
use strata_worker::local::{self, LocalWorker};
use tokio::task::JoinHandle;

/// How often the embedded worker tells the coordinator it is alive and what it runs.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Builds `request` on an embedded cluster around `engine`; each target platform's image.
/// Dropping the future (an interrupted build) stops the running steps: their containers are
/// killed and their mounts released as their tasks end.
pub async fn build(
    state: &Path,
    engine: Engine,
    request: BuildRequest,
    progress: &Progress,
) -> Result<Vec<(Platform, StageOutput)>> {
    let cluster = LocalCluster::start(state)
        .await
        .map_err(|e| anyhow!("starting the embedded coordinator: {e}"))?;
    let capacity = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
    let (worker, mut reports) = LocalWorker::new(engine, (2 * capacity).max(4));
    let mut calls = cluster
        .attach_worker(worker.registration())
        .await
        .map_err(|e| anyhow!("the embedded worker was refused: {e}"))?;
    let _running = Running {
        worker: worker.clone(),
        tasks: vec![
            // The coordinator's requests: offers and cancellations.
            tokio::spawn({
                let worker = worker.clone();
                async move {
                    while let Some(call) = calls.recv().await {
                        let _ = call.reply.send(worker.handle(call.msg));
                    }
                }
            }),
            // The worker's progress and results, in the order they happened.
            tokio::spawn({
                let cluster = cluster.clone();
                async move {
                    while let Some(msg) = reports.recv().await {
                        cluster.worker_message(local::NAME, msg).await;
                    }
                }
            }),
            tokio::spawn({
                let (cluster, worker) = (cluster.clone(), worker.clone());
                async move {
                    loop {
                        tokio::time::sleep(HEARTBEAT).await;
                        cluster
                            .worker_message(local::NAME, worker.heartbeat())
                            .await;
                    }
                }
            }),
        ],
    };

    let mut answers = cluster.client_request(ClientMsg::Submit(SubmitBuild { request }));
    let build_id = match answers.recv().await {
        Some(CoordinatorToClient::Accepted(a)) => a.build_id,
        Some(CoordinatorToClient::Error(e)) => bail!("{}", e.message),
        other => bail!("unexpected answer to the build: {other:?}"),
    };
    let mut events = cluster.client_request(ClientMsg::Watch(WatchBuild {
        build_id,
        from_event: 0,
    }));
    while let Some(msg) = events.recv().await {
        match msg {
            CoordinatorToClient::Event(e) => progress.send(e.event),
            CoordinatorToClient::Done(done) => {
                return match done.result {
                    BuildOutcome::Built(images) => {
                        Ok(images.into_iter().map(|t| (t.platform, t.output)).collect())
                    }
                    BuildOutcome::Failed(error) => Err(anyhow!("{error}")),
                };
            }
            CoordinatorToClient::Error(e) => bail!("{}", e.message),
            other => bail!("unexpected answer while watching the build: {other:?}"),
        }
    }
    bail!("the embedded coordinator stopped before the build ended")
}

/// The embedded worker's tasks, stopped with its jobs when the build ends or is dropped.
struct Running {
    worker: Arc<LocalWorker>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.worker.stop_all();
        for task in &self.tasks {
            task.abort();
        }
    }
}
