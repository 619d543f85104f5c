//! What only the leader does, in one loop.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::workers::{cancel, offer};
use super::{Shared, now_ms};
use crate::state;

/// The leader's duties, every few hundred milliseconds and whenever something it acts on
/// happens (a build submitted, a job done, a worker registered): renew the leases of workers
/// that heartbeat, expire the others' (after a grace period when leadership is new), lease
/// ready jobs to workers and send them the offers.
pub(super) async fn leader_loop(shared: Arc<Shared>) {
    let lease_ms = shared.config.scheduler.lease_ms;
    let mut leading_since: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // Cancellations sent, by worker and job: sent again only after a while.
    let mut cancelling: HashMap<(String, u64), Instant> = HashMap::new();
    let mut rounds = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.wake.notified() => {}
        }
        rounds += 1;
        // Every few seconds, leader or not: progress kept for builds no longer known goes.
        if rounds.is_multiple_of(25) {
            forget_old_progress(&shared).await;
        }
        let view = shared.node.view();
        if view.leader != Some(view.id) {
            leading_since = None;
            continue;
        }
        let since = match leading_since {
            Some((term, at)) if term == view.term => at,
            _ => {
                leading_since = Some((view.term, Instant::now()));
                Instant::now()
            }
        };
        let now = now_ms();
        stop_unwanted_jobs(&shared, &mut cancelling).await;
        retire_old_builds(&shared, now).await;
        // Renew the leases of live workers that are halfway through theirs.
        let alive: Vec<String> = {
            let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers
                .iter()
                .filter(|(_, l)| l.last_seen.elapsed() < Duration::from_millis(lease_ms / 2))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let renewals = shared
            .node
            .query(move |s| {
                s.jobs()
                    .filter_map(|j| match &j.state {
                        state::JobState::Leased(l)
                            if alive.contains(&l.worker) && l.deadline_ms < now + lease_ms / 2 =>
                        {
                            Some(state::Renewal {
                                job: j.id,
                                token: l.token,
                                deadline_ms: now + lease_ms,
                            })
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
        if !renewals.is_empty() {
            let _ = shared
                .submit(&state::Command::RenewLeases {
                    now_ms: now,
                    leases: renewals,
                })
                .await;
        }
        // Workers silent for a whole lease are gone: their jobs go back to the queue and no
        // new lease goes to them until they register again. A new leader first gives them
        // a lease's time to find it.
        if since.elapsed() > Duration::from_millis(lease_ms) {
            let active = shared
                .node
                .query(|s| {
                    s.workers()
                        .filter(|w| w.state == state::WorkerState::Active)
                        .map(|w| w.name.clone())
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            let silent: Vec<String> = {
                let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                active
                    .into_iter()
                    .filter(|name| {
                        workers
                            .get(name)
                            .is_none_or(|l| l.last_seen.elapsed() > Duration::from_millis(lease_ms))
                    })
                    .collect()
            };
            for name in silent {
                tracing::warn!(worker = %name, "worker silent for a lease; its jobs go back to the queue");
                let _ = shared
                    .submit(&state::Command::RemoveWorker {
                        now_ms: now,
                        name,
                        mode: state::Removal::Gone,
                    })
                    .await;
            }
        }
        // Expire the leases of the silent, once a new leader has given them time to return.
        if since.elapsed() > Duration::from_millis(lease_ms)
            && let Some(cmd) = shared
                .node
                .query(move |s| s.expire_round(now))
                .await
                .flatten()
            && let Ok(resp) = shared.submit(&cmd).await
        {
            tracing::info!(?resp, "expired leases");
        }
        // Lease ready jobs to the workers connected to this leader and offer them: one that
        // has not found the new leader yet would only see its offers fail.
        let term = view.term;
        let connected: BTreeSet<String> = {
            let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.keys().cloned().collect()
        };
        let Some(Some(cmd)) = shared
            .node
            .query(move |s| s.schedule_round_among(term, now, lease_ms, |w| connected.contains(w)))
            .await
        else {
            continue;
        };
        let granted = match shared.submit(&cmd).await {
            Ok(resp) => granted_leases(resp),
            Err(e) => {
                tracing::debug!(error = %e, "scheduling round not committed");
                continue;
            }
        };
        for lease in granted {
            let shared = shared.clone();
            tokio::spawn(async move { offer(&shared, lease).await });
        }
    }
}

fn granted_leases(resp: state::Response) -> Vec<state::GrantedLease> {
    match resp {
        state::Response::Leases { granted, .. } => granted,
        state::Response::Batch { responses } => {
            responses.into_iter().flat_map(granted_leases).collect()
        }
        _ => Vec::new(),
    }
}

/// Tells workers to stop the jobs they still run for builds that were cancelled, failed or
/// forgotten, so that their slots (and the containers in them) are freed at once.
async fn stop_unwanted_jobs(shared: &Shared, cancelling: &mut HashMap<(String, u64), Instant>) {
    cancelling.retain(|_, at| at.elapsed() < Duration::from_secs(5));
    let running: Vec<(String, Vec<u64>)> = {
        let workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers
            .iter()
            .filter(|(_, l)| !l.running.is_empty())
            .map(|(n, l)| (n.clone(), l.running.clone()))
            .collect()
    };
    for (worker, jobs) in running {
        let stop = shared
            .node
            .query(move |s| s.jobs_to_stop(&jobs))
            .await
            .unwrap_or_default();
        for (job, epoch) in stop {
            let key = (worker.clone(), job.0);
            if cancelling.contains_key(&key) {
                continue;
            }
            cancelling.insert(key, Instant::now());
            cancel(shared, &worker, job, epoch).await;
        }
    }
}

/// Forgets finished builds kept for longer than `scheduler.retain_finished_ms`, a batch at a
/// time, so that the replicated state (and its snapshots) stays the size of what is current.
async fn retire_old_builds(shared: &Shared, now: u64) {
    let retain = shared.config.scheduler.retain_finished_ms;
    let old = shared
        .node
        .query(move |s| s.builds_to_retire(now, retain, 100))
        .await
        .unwrap_or_default();
    if old.is_empty() {
        return;
    }
    match shared
        .submit(&state::Command::RetireBuilds { builds: old })
        .await
    {
        Ok(state::Response::Retired { builds, .. }) => {
            tracing::info!(
                count = builds.len(),
                "finished builds forgotten after their retention"
            );
        }
        Ok(other) => tracing::debug!(?other, "retiring builds"),
        Err(e) => tracing::debug!(error = %e, "retiring builds not committed"),
    }
}

/// Drops the progress kept in memory for builds the state no longer holds.
async fn forget_old_progress(shared: &Shared) {
    let kept: Vec<u64> = {
        let events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
        events.builds()
    };
    if kept.is_empty() {
        return;
    }
    let gone: Vec<u64> = shared
        .node
        .query(move |s| {
            kept.into_iter()
                .filter(|b| s.build(state::BuildId(*b)).is_none())
                .collect()
        })
        .await
        .unwrap_or_default();
    if !gone.is_empty() {
        let mut events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
        for b in gone {
            events.forget(b);
        }
    }
}
