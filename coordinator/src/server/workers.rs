//! Workers' connections: registration and heartbeats, job results with their fencing tokens,
//! progress streams, and the leader's job offers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use strata_shared::job::{StageJob, StageOutput};
use strata_shared::progress::Event;
use strata_shared::wire::{
    self, CoordinatorToWorker, ErrorCode, ErrorReply, JobAck, JobOutcome, WorkerMsg,
};

use super::{ProposeError, Shared, WorkerChannel, WorkerLink, now_ms};
use crate::state;

/// A worker's connection: its requests on bidirectional streams, its progress on
/// unidirectional ones.
pub(super) async fn worker_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    name: String,
) -> Result<(), wire::WireError> {
    let progress = {
        let (shared, conn) = (shared.clone(), conn.clone());
        tokio::spawn(async move {
            while let Ok(stream) = conn.accept_uni().await {
                tokio::spawn(progress_stream(shared.clone(), stream));
            }
        })
    };
    let channel = WorkerChannel::Quic(conn.clone());
    let result = async {
        while let Some((mut send, mut recv)) = wire::accept_stream(&conn).await? {
            let (shared, channel, name) = (shared.clone(), channel.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(msg) = wire::read_frame::<WorkerMsg>(&mut recv).await else {
                    return;
                };
                let reply = worker_request(&shared, &channel, &name, msg).await;
                if wire::write_frame(&mut send, &reply).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
        Ok::<(), wire::WireError>(())
    }
    .await;
    progress.abort();
    let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
    if workers.get(&name).is_some_and(|l| l.channel.same(&channel)) {
        workers.remove(&name);
    }
    result
}

/// A proposal that did not go through is never a refusal: the worker tries again.
fn worker_propose_error(shared: &Shared, e: ProposeError) -> CoordinatorToWorker {
    match e {
        ProposeError::NotLeader { .. } => CoordinatorToWorker::NotLeader(shared.not_leader()),
        ProposeError::NoQuorum => CoordinatorToWorker::NoQuorum,
        ProposeError::Failed(message) => CoordinatorToWorker::Error(ErrorReply {
            code: ErrorCode::Internal,
            message,
        }),
    }
}

fn ack(accepted: bool, reason: impl Into<String>) -> CoordinatorToWorker {
    CoordinatorToWorker::Ack(JobAck {
        accepted,
        reason: reason.into(),
    })
}

/// Answers one request of worker `name`, whichever way it came.
pub(super) async fn worker_request(
    shared: &Shared,
    channel: &WorkerChannel,
    name: &str,
    msg: WorkerMsg,
) -> CoordinatorToWorker {
    if !shared.is_leader() {
        return CoordinatorToWorker::NotLeader(shared.not_leader());
    }
    match msg {
        WorkerMsg::Register(r) => {
            if r.name != name {
                return ack(
                    false,
                    format!(
                        "the certificate names {name:?}, the registration {:?}",
                        r.name
                    ),
                );
            }
            let parse = |list: &[String]| {
                list.iter()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<_>>()
            };
            let cmd = state::Command::RegisterWorker {
                now_ms: now_ms(),
                name: name.to_string(),
                capabilities: strata_shared::platform::Capabilities {
                    native: parse(&r.native),
                    emulated: parse(&r.emulated),
                },
                capacity: r.capacity.max(1),
                labels: r.labels.into_iter().collect(),
            };
            match shared.submit(&cmd).await {
                Ok(state::Response::WorkerRegistered { rejoined, .. }) => {
                    tracing::info!(worker = %name, rejoined, "worker registered");
                    let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                    workers.insert(
                        name.to_string(),
                        WorkerLink {
                            channel: channel.clone(),
                            last_seen: Instant::now(),
                            running: Vec::new(),
                        },
                    );
                    drop(workers);
                    shared.changed();
                    ack(true, "")
                }
                Ok(other) => ack(false, format!("{other:?}")),
                Err(e) => worker_propose_error(shared, e),
            }
        }
        WorkerMsg::Heartbeat(h) => {
            let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            match workers.get_mut(name) {
                Some(link) => {
                    link.last_seen = Instant::now();
                    link.running = h.running.clone();
                    ack(true, "")
                }
                None => ack(
                    false,
                    "not registered with this coordinator: register first",
                ),
            }
        }
        WorkerMsg::Result(r) => {
            let token = state::LeaseToken {
                term: r.term,
                epoch: r.epoch,
            };
            let job = state::JobId(r.job_id);
            let cmd = match r.outcome {
                JobOutcome::Built(output) => match check_output(&output) {
                    Ok(()) => state::Command::CompleteJob {
                        now_ms: now_ms(),
                        job,
                        token,
                        result: state::StageResult::from_output(output),
                    },
                    Err(e) => state::Command::FailJob {
                        now_ms: now_ms(),
                        job,
                        token,
                        failure: state::Failure::Worker {
                            error: format!("the worker's result is invalid: {e}"),
                        },
                    },
                },
                JobOutcome::Failed(error) => state::Command::FailJob {
                    now_ms: now_ms(),
                    job,
                    token,
                    failure: state::Failure::Step { error },
                },
            };
            match shared.submit(&cmd).await {
                Ok(state::Response::Rejected { reason }) => {
                    tracing::warn!(worker = %name, job = %job, %reason, "result refused");
                    ack(false, reason.to_string())
                }
                Ok(_) => {
                    shared.changed();
                    ack(true, "")
                }
                Err(e) => worker_propose_error(shared, e),
            }
        }
        WorkerMsg::Leave(leave) => {
            let mode = if leave.drain {
                state::Removal::Drain
            } else {
                state::Removal::Gone
            };
            let cmd = state::Command::RemoveWorker {
                now_ms: now_ms(),
                name: name.to_string(),
                mode,
            };
            match shared.submit(&cmd).await {
                Ok(state::Response::WorkerRemoved { requeued, .. }) => {
                    tracing::info!(worker = %name, %mode, requeued = requeued.len(), "worker leaving");
                    if !leave.drain {
                        let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                        workers.remove(name);
                    }
                    ack(true, "")
                }
                Ok(other) => ack(false, format!("{other:?}")),
                Err(e) => worker_propose_error(shared, e),
            }
        }
        WorkerMsg::Progress(p) => match channel {
            // Over QUIC, progress has streams of its own (see `progress_stream`).
            WorkerChannel::Quic(_) => ack(false, "progress goes on a unidirectional stream"),
            WorkerChannel::Local(_) => {
                record_progress(shared, p).await;
                ack(true, "")
            }
        },
        WorkerMsg::Ack(_) => ack(false, "an acknowledgement answers an offer or a cancel"),
    }
}

/// Checks a stage output as a worker reports it, before it is committed: its layers are blobs
/// named by their keys and digests, and its platform is in normal form.
fn check_output(output: &StageOutput) -> Result<(), String> {
    strata_shared::job::check_platform(&output.config.platform())?;
    for layer in &output.layers {
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(&layer.blake3, 64) {
            return Err(format!("layer key {:?} is not a blake3 key", layer.blake3));
        }
        if !layer
            .digest
            .strip_prefix("sha256:")
            .is_some_and(|h| hex(h, 64))
        {
            return Err(format!(
                "layer digest {:?} is not a sha256 digest",
                layer.digest
            ));
        }
    }
    Ok(())
}

/// Progress events of one job on a stream of their own: kept for the build's watchers.
async fn progress_stream(shared: Arc<Shared>, mut stream: quinn::RecvStream) {
    while let Ok(Some(WorkerMsg::Progress(p))) =
        wire::read_frame_or_eof::<WorkerMsg>(&mut stream).await
    {
        record_progress(&shared, p).await;
    }
}

/// Keeps one progress event of a job for its build's watchers.
async fn record_progress(shared: &Shared, p: wire::JobProgress) {
    let job = state::JobId(p.job_id);
    let build = shared
        .node
        .query(move |s| s.job(job).map(|j| j.build.0))
        .await
        .flatten();
    if let Some(b) = build {
        shared.record_event(b, p.event);
    }
}

/// Sends a leased job to its worker; a worker that cannot take it gives the job back.
pub(super) async fn offer(shared: &Shared, lease: state::GrantedLease) {
    let job = lease.job;
    let worker = lease.worker.clone();
    let spec = shared
        .node
        .query(move |s| {
            let spec = s.job_spec(job)?;
            let req = spec.request;
            let inputs: BTreeMap<usize, StageOutput> = spec
                .inputs
                .iter()
                .map(|(i, r)| (*i, (*r.output).clone()))
                .collect();
            let stage_job = StageJob {
                id: job.0 as usize,
                dockerfile: req.dockerfile.clone(),
                dockerfile_name: req.dockerfile_name.clone(),
                options: req.options.clone(),
                build_platform: spec.build_platform.clone(),
                target_platform: spec
                    .instance
                    .targets
                    .first()
                    .cloned()
                    .unwrap_or_else(|| spec.instance.platform.clone()),
                stage: spec.instance.index,
                inputs,
                context: req.context.clone(),
                show_platform: req.platforms.len() > 1,
                no_cache: req.no_cache,
                secrets: req.secrets.clone(),
                dockerignore: req.dockerignore.clone(),
                allow_host_network: req.allow_host_network,
                compression: req.compression,
            };
            let note = format!(
                "stage {} ({}) runs on worker {}",
                spec.instance.name, spec.instance.platform, worker
            );
            Some((stage_job, spec.build.0, note))
        })
        .await
        .flatten();
    let channel = {
        let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.get(&lease.worker).map(|l| l.channel.clone())
    };
    let refused = match (spec, channel) {
        (Some((stage_job, build, note)), Some(channel)) => {
            let offer = CoordinatorToWorker::Offer(wire::JobOffer {
                job_id: job.0,
                epoch: lease.token.epoch,
                term: lease.token.term,
                deadline_ms: lease.deadline_ms,
                job: stage_job,
            });
            match channel.request(&offer).await {
                Ok(WorkerMsg::Ack(a)) if a.accepted => {
                    // Where each stage runs, for the build's watchers.
                    shared.record_event(build, Event::Note { text: note });
                    None
                }
                Ok(WorkerMsg::Ack(a)) => Some(format!("the worker refused the job: {}", a.reason)),
                Ok(other) => Some(format!("unexpected answer to an offer: {other:?}")),
                Err(e) => Some(format!("offering the job failed: {e}")),
            }
        }
        (None, _) => Some("the job's request could not be read".into()),
        (_, None) => Some(format!(
            "worker {} is not connected to the leader",
            lease.worker
        )),
    };
    if let Some(error) = refused {
        tracing::warn!(job = %job, worker = %lease.worker, %error, "offer failed; the job goes back");
        let _ = shared
            .submit(&state::Command::FailJob {
                now_ms: now_ms(),
                job,
                token: lease.token,
                failure: state::Failure::Worker { error },
            })
            .await;
    }
}

/// Asks `worker` to stop `job` (under `epoch` or any older lease); logs what it answered.
pub(super) async fn cancel(shared: &Shared, worker: &str, job: state::JobId, epoch: u64) {
    let channel = {
        let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.get(worker).map(|l| l.channel.clone())
    };
    let Some(channel) = channel else {
        return;
    };
    let msg = CoordinatorToWorker::Cancel(wire::CancelJob {
        job_id: job.0,
        epoch,
    });
    let answer =
        tokio::time::timeout(std::time::Duration::from_secs(5), channel.request(&msg)).await;
    match answer {
        Ok(Ok(WorkerMsg::Ack(a))) if a.accepted => {
            tracing::info!(%job, %worker, "job stopped on its worker: its build no longer needs it");
        }
        Ok(Ok(WorkerMsg::Ack(a))) => {
            tracing::debug!(%job, %worker, reason = %a.reason, "nothing to stop");
        }
        Ok(Ok(other)) => tracing::warn!(%job, %worker, "unexpected answer to a cancel: {other:?}"),
        Ok(Err(e)) => tracing::debug!(%job, %worker, error = %e, "cancel not delivered"),
        Err(_) => tracing::debug!(%job, %worker, "no answer to a cancel within 5s"),
    }
}
