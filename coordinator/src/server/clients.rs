//! Clients' requests: submitting a build (planned and placed here, committed through Raft),
//! watching its progress, cancelling it, the cluster's status, and membership changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use strata_shared::dag;
use strata_shared::dockerfile::Dockerfile;
use strata_shared::job::{BuildRequest, TargetImage};
use strata_shared::platform::Platform;
use strata_shared::progress::Event;
use strata_shared::wire::{
    self, BuildOutcome, ClientMsg, CoordinatorToClient, ErrorCode, ErrorReply, NodeStatus,
    RaftState, StatusReply,
};

use super::{ProposeError, Shared, membership, now_ms};
use crate::placement::{WorkerInfo, place_plan};
use crate::state;

/// Who sent a client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// A client on another connection, authenticated so.
    Remote(wire::AuthMethod),
    /// The embedded client, in this process (it may name local directories and secrets).
    InProcess,
}

/// Where the answers to one client request go: a QUIC stream, or a channel in this process.
pub(super) trait ClientSink {
    /// Sends one answer; false when the client is gone.
    async fn send(&mut self, msg: CoordinatorToClient) -> bool;
}

impl ClientSink for quinn::SendStream {
    async fn send(&mut self, msg: CoordinatorToClient) -> bool {
        wire::write_frame(self, &msg).await.is_ok()
    }
}

impl ClientSink for tokio::sync::mpsc::Sender<CoordinatorToClient> {
    async fn send(&mut self, msg: CoordinatorToClient) -> bool {
        tokio::sync::mpsc::Sender::send(self, msg).await.is_ok()
    }
}

/// One request on a client's QUIC stream.
pub(super) async fn client_request(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    auth: wire::AuthMethod,
) {
    match wire::read_frame::<ClientMsg>(&mut recv).await {
        Ok(msg) => answer(&shared, msg, Origin::Remote(auth), &mut send).await,
        Err(e) => {
            let reply = CoordinatorToClient::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                message: e.to_string(),
            });
            let _ = wire::write_frame(&mut send, &reply).await;
        }
    }
    let _ = send.finish();
}

/// Answers one client request, whichever way it came.
pub(super) async fn answer(
    shared: &Shared,
    msg: ClientMsg,
    origin: Origin,
    sink: &mut impl ClientSink,
) {
    let reply = match msg {
        ClientMsg::Status(_) => CoordinatorToClient::Status(status(shared).await),
        ClientMsg::Submit(s) => submit_build(shared, s.request, origin).await,
        ClientMsg::Cancel(c) => {
            if !shared.is_leader() {
                CoordinatorToClient::NotLeader(shared.not_leader())
            } else {
                let cmd = state::Command::CancelBuild {
                    now_ms: now_ms(),
                    build: state::BuildId(c.build_id),
                    reason: "cancelled by the client".into(),
                };
                match shared.submit(&cmd).await {
                    Ok(resp) => match resp.rejection() {
                        None => {
                            shared.changed();
                            CoordinatorToClient::Accepted(wire::BuildAccepted {
                                build_id: c.build_id,
                            })
                        }
                        Some(reason) => CoordinatorToClient::Error(ErrorReply {
                            code: match reason {
                                state::Rejection::UnknownBuild { .. } => ErrorCode::NotFound,
                                _ => ErrorCode::BadRequest,
                            },
                            message: reason.to_string(),
                        }),
                    },
                    Err(e) => propose_error(shared, e),
                }
            }
        }
        ClientMsg::Membership(_) if origin != Origin::Remote(wire::AuthMethod::Certificate) => {
            CoordinatorToClient::Error(ErrorReply {
                code: ErrorCode::Forbidden,
                message: "membership changes need a client certificate of the cluster CA; a token \
                          only submits and watches builds"
                    .into(),
            })
        }
        ClientMsg::Membership(change) => membership::change(shared, change).await,
        ClientMsg::Watch(w) => {
            watch_build(shared, sink, w.build_id, w.from_event).await;
            return;
        }
    };
    sink.send(reply).await;
}

pub(super) fn propose_error(shared: &Shared, e: ProposeError) -> CoordinatorToClient {
    match e {
        ProposeError::NotLeader { .. } => CoordinatorToClient::NotLeader(shared.not_leader()),
        ProposeError::NoQuorum => CoordinatorToClient::NoQuorum,
        ProposeError::Failed(message) => CoordinatorToClient::Error(ErrorReply {
            code: ErrorCode::Internal,
            message,
        }),
    }
}

pub(super) fn bad_request(message: String) -> CoordinatorToClient {
    CoordinatorToClient::Error(ErrorReply {
        code: ErrorCode::BadRequest,
        message,
    })
}

/// Plans a submitted build and commits it with its jobs.
async fn submit_build(shared: &Shared, req: BuildRequest, origin: Origin) -> CoordinatorToClient {
    if !shared.is_leader() {
        return CoordinatorToClient::NotLeader(shared.not_leader());
    }
    if let Err(e) = req.validate(origin == Origin::InProcess) {
        return bad_request(format!("build request: {e}"));
    }
    let emulation = req.emulation;
    let df = match Dockerfile::parse(&req.dockerfile) {
        Ok(df) => df,
        Err(e) => return bad_request(e.render(&req.dockerfile_name, &req.dockerfile)),
    };
    // Strict placement against the workers the cluster knows, before anything is committed.
    let workers = shared
        .node
        .query(|s| {
            s.workers()
                .filter(|w| w.state == state::WorkerState::Active)
                .map(|w| WorkerInfo {
                    name: w.name.clone(),
                    capabilities: w.capabilities.clone(),
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
    // The build platform is a worker's native platform, never this coordinator's own.
    let build_platform = build_platform(&workers);
    let plan = match dag::plan(&df, &req.options, &build_platform, &req.platforms) {
        Ok(p) => p,
        Err(e) => return bad_request(e.render(&req.dockerfile_name, &req.dockerfile)),
    };
    let mut placed = plan.clone();
    if let Err(e) = place_plan(&mut placed, &workers, emulation) {
        return bad_request(e.message);
    }
    let cmd = state::Command::SubmitBuild {
        now_ms: now_ms(),
        tenant: req.tenant.clone(),
        plan: state::PlanSummary::from_plan(&plan, &build_platform),
        request: Box::new(req),
        policy: state::BuildPolicy {
            emulation,
            ..state::BuildPolicy::default()
        },
    };
    match shared.submit(&cmd).await {
        Ok(state::Response::Submitted { build, .. }) => {
            tracing::info!(build = %build, stages = plan.instances.len(), "build accepted");
            if let Some(text) = df.frontend_note() {
                shared.record_event(build.0, Event::Note { text });
            }
            shared.changed();
            CoordinatorToClient::Accepted(wire::BuildAccepted { build_id: build.0 })
        }
        Ok(state::Response::Rejected { reason }) => bad_request(reason.to_string()),
        Ok(other) => bad_request(format!("unexpected response {other:?}")),
        Err(e) => propose_error(shared, e),
    }
}

/// The build platform a plan is made for: the native platform most registered workers share
/// (the first such in their order on a tie). With no worker, the plan cannot be placed anyway;
/// `linux/amd64` keeps its error about placement, not about the platform.
fn build_platform(workers: &[WorkerInfo]) -> Platform {
    let mut counts: Vec<(&Platform, usize)> = Vec::new();
    for p in workers.iter().flat_map(|w| w.capabilities.native.first()) {
        match counts.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => counts.push((p, 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    counts.into_iter().find(|(_, n)| *n == best).map_or_else(
        || Platform::new("linux", "amd64", ""),
        |(p, _)| p.as_build_platform(),
    )
}

/// Streams a build's progress events from `from`, then its end.
async fn watch_build(shared: &Shared, sink: &mut impl ClientSink, build: u64, mut from: u64) {
    let mut progressed = shared.progressed.subscribe();
    loop {
        progressed.mark_unchanged();
        // Whether it ended first, then its events: every event recorded before the end (a
        // worker sends its progress before its result) is sent before the end.
        let id = state::BuildId(build);
        let finished = shared
            .node
            .query(move |s| {
                s.build(id).map(|b| match &b.status {
                    state::BuildStatus::Succeeded => Some(Ok(b
                        .result
                        .iter()
                        .map(|t| TargetImage {
                            platform: t.platform.clone(),
                            output: t.output.clone(),
                        })
                        .collect::<Vec<_>>())),
                    state::BuildStatus::Failed { error } => Some(Err(error.clone())),
                    state::BuildStatus::Cancelled { reason } => {
                        Some(Err(format!("cancelled: {reason}")))
                    }
                    _ => None,
                })
            })
            .await;
        let fresh: Vec<(u64, Event)> = {
            let events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
            events.since(build, from)
        };
        for (seq, event) in fresh {
            let ev = CoordinatorToClient::Event(wire::BuildEvent { seq, event });
            if !sink.send(ev).await {
                return;
            }
            from = seq + 1;
        }
        match finished {
            Some(Some(Some(result))) => {
                let done = CoordinatorToClient::Done(wire::BuildDone {
                    build_id: build,
                    result: match result {
                        Ok(images) => BuildOutcome::Built(images),
                        Err(e) => BuildOutcome::Failed(e),
                    },
                });
                sink.send(done).await;
                return;
            }
            Some(None) => {
                let gone = CoordinatorToClient::Error(ErrorReply {
                    code: ErrorCode::NotFound,
                    message: format!(
                        "no build {build}: unknown, or finished more than {}s ago and forgotten",
                        shared.config.scheduler.retain_finished_ms / 1000
                    ),
                });
                sink.send(gone).await;
                return;
            }
            // Woken by new progress or a state change; the timeout covers what changes
            // without either (a build the leader's loop fails).
            _ => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(250), progressed.changed()).await;
            }
        }
    }
}

/// This node's answer to `strata status`: itself as it sees itself, the other coordinators
/// as configured (with what this node knows of them), and the replicated queue and workers.
async fn status(shared: &Shared) -> StatusReply {
    let config = &shared.config;
    let view = shared.node.view();
    let mut members: BTreeSet<u64> = view.voters.iter().chain(&view.learners).copied().collect();
    if members.is_empty() {
        // Not initialised yet (a joining node): the configured peers.
        members.extend(config.peers.iter().map(|p| p.id));
    }
    members.insert(config.node_id);
    // The leader knows how far each member has replicated and whether it is heard from.
    let asked: Vec<u64> = members.iter().copied().collect();
    let progress: BTreeMap<u64, (u64, bool)> = shared
        .node
        .inspect(move |n| {
            asked
                .iter()
                .filter_map(|m| Some((*m, (n.matched(*m)?, n.recently_active(*m)?))))
                .collect()
        })
        .await
        .unwrap_or_default();
    let nodes = members
        .into_iter()
        .map(|id| {
            let me = id == config.node_id;
            let state = if me && view.removed {
                RaftState::Unknown
            } else if me {
                match view.role {
                    "leader" => RaftState::Leader,
                    "follower" if view.learners.contains(&id) => RaftState::Learner,
                    "follower" => RaftState::Follower,
                    "pre-candidate" => RaftState::PreCandidate,
                    _ => RaftState::Candidate,
                }
            } else if view.leader == Some(id) {
                RaftState::Leader
            } else if view.learners.contains(&id) {
                RaftState::Learner
            } else if progress.contains_key(&id) {
                RaftState::Follower
            } else {
                RaftState::Unknown
            };
            let (matched, active) = progress.get(&id).copied().unwrap_or((0, false));
            let peer = shared.node.peer(id);
            NodeStatus {
                id,
                name: peer
                    .as_ref()
                    .map_or_else(|| format!("node {id}"), |p| p.name.clone()),
                addr: peer.map_or_else(|| "unknown".into(), |p| p.addr.to_string()),
                state,
                term: if me { view.term } else { 0 },
                // Of another member: what it holds, as far as the leader knows.
                commit_index: if me { view.commit_index } else { matched },
                applied_index: if me { view.applied_index } else { 0 },
                reachable: me || active || (progress.is_empty() && view.leader.is_some()),
            }
        })
        .collect();
    let seen: BTreeMap<String, u64> = {
        let links = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
        links
            .iter()
            .map(|(n, l)| (n.clone(), l.last_seen.elapsed().as_millis() as u64))
            .collect()
    };
    let (workers, queue) = shared
        .node
        .query(move |s| {
            let workers = s
                .workers()
                .filter(|w| w.state != state::WorkerState::Gone)
                .map(|w| wire::WorkerStatus {
                    name: w.name.clone(),
                    state: w.state.name().to_string(),
                    native: w.capabilities.native.iter().map(ToString::to_string).collect(),
                    emulated: w.capabilities.emulated.iter().map(ToString::to_string).collect(),
                    capacity: w.capacity,
                    running: s
                        .jobs()
                        .filter(|j| matches!(&j.state, state::JobState::Leased(l) if l.worker == w.name))
                        .map(|j| j.id.0)
                        .collect(),
                    last_seen_ms: seen.get(&w.name).copied(),
                    labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
                .collect::<Vec<_>>();
            let queue = s
                .builds()
                .filter(|b| !b.status.is_finished())
                .map(|b| wire::BuildStatus {
                    build_id: b.id.0,
                    submitter: b.tenant.clone(),
                    state: b.status.name().to_string(),
                    jobs_total: b.jobs.len() as u32,
                    jobs_done: b
                        .jobs
                        .iter()
                        .filter(|j| matches!(s.job(**j).map(|j| &j.state), Some(state::JobState::Done { .. })))
                        .count() as u32,
                    submitted_ms: b.submitted_at_ms,
                })
                .collect::<Vec<_>>();
            (workers, queue)
        })
        .await
        .unwrap_or_default();
    StatusReply {
        nodes,
        leader: shared.node.leader_addr(),
        workers,
        queue,
    }
}
