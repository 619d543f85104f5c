//! Deterministic tests of the state machine: a manual clock (`now_ms` set by the test), every
//! command sent through its log bytes.

use std::collections::BTreeMap;

use strata_shared::job::StageOutput;
use strata_shared::oci::ImageConfig;
use strata_shared::platform::{Capabilities, Platform};
use strata_shared::store::BlobMeta;

use super::simulation;
use super::*;

fn p(s: &str) -> Platform {
    s.parse().unwrap()
}

/// A state machine fed through log bytes, with a manual clock.
struct Cluster {
    sm: StateMachine,
    log: Vec<Vec<u8>>,
    now: u64,
    term: u64,
}

impl Cluster {
    fn new() -> Self {
        Cluster {
            sm: StateMachine::new(),
            log: Vec::new(),
            now: 0,
            term: 1,
        }
    }

    fn apply(&mut self, cmd: Command) -> Response {
        let bytes = cmd.encode();
        assert_eq!(
            Command::decode(&bytes).unwrap(),
            cmd,
            "the command round-trips"
        );
        let index = self.log.len() as u64 + 1;
        self.log.push(bytes.clone());
        self.sm.apply_bytes(index, &bytes)
    }

    fn register(&mut self, name: &str, native: &[&str], emulated: &[&str], capacity: u32) {
        let resp = self.apply(Command::RegisterWorker {
            now_ms: self.now,
            name: name.into(),
            capabilities: Capabilities {
                native: native.iter().map(|s| p(s)).collect(),
                emulated: emulated.iter().map(|s| p(s)).collect(),
            },
            capacity,
            labels: BTreeMap::new(),
        });
        assert!(
            matches!(resp, Response::WorkerRegistered { .. }),
            "{resp:?}"
        );
    }

    fn submit_as(
        &mut self,
        tenant: &str,
        plan: PlanSummary,
        policy: BuildPolicy,
    ) -> (BuildId, Vec<JobId>) {
        match self.apply(Command::SubmitBuild {
            now_ms: self.now,
            tenant: tenant.into(),
            request: Box::new(super::simulation::request()),
            plan,
            policy,
        }) {
            Response::Submitted { build, jobs, .. } => (build, jobs),
            other => panic!("submit refused: {other:?}"),
        }
    }

    fn submit(&mut self, plan: PlanSummary) -> (BuildId, Vec<JobId>) {
        self.submit_as("team", plan, BuildPolicy::default())
    }

    fn grant_until(&mut self, job: JobId, worker: &str, deadline_ms: u64) -> Response {
        self.apply(Command::GrantLeases {
            now_ms: self.now,
            term: self.term,
            grants: vec![Grant {
                job,
                worker: worker.into(),
                deadline_ms,
            }],
        })
    }

    /// Leases `job` to `worker` for a minute; panics if refused.
    fn lease(&mut self, job: JobId, worker: &str) -> LeaseToken {
        match self.grant_until(job, worker, self.now + 60_000) {
            Response::Leases { granted, rejected } if rejected.is_empty() => granted[0].token,
            other => panic!("lease of {job} to {worker} refused: {other:?}"),
        }
    }

    fn complete(&mut self, job: JobId, token: LeaseToken) -> Response {
        let key = format!("key-{}", job.0);
        self.apply(Command::CompleteJob {
            now_ms: self.now,
            job,
            token,
            result: result(&key),
        })
    }

    fn fail(&mut self, job: JobId, token: LeaseToken, failure: Failure) -> Response {
        self.apply(Command::FailJob {
            now_ms: self.now,
            job,
            token,
            failure,
        })
    }

    fn state_of(&self, job: JobId) -> &'static str {
        self.sm.job(job).unwrap().state.name()
    }

    fn ready(&self) -> Vec<JobId> {
        self.sm.ready_jobs().iter().map(|r| r.job).collect()
    }

    /// The snapshot with `last_applied` zeroed: what "changes nothing" compares.
    fn content(&self) -> Vec<u8> {
        let mut copy = self.sm.clone();
        copy.last_applied = 0;
        copy.snapshot()
    }
}

fn result(key: &str) -> StageResult {
    let output = StageOutput {
        config: ImageConfig::empty(&p("linux/amd64")),
        layers: vec![BlobMeta {
            version: 1,
            blake3: format!("b3-{key}"),
            digest: format!("sha256:{key}"),
            media_type: strata_shared::oci::MEDIA_OCI_LAYER_GZIP.into(),
            size: 1000,
            diff_id: None,
        }],
        key: key.into(),
        env: Vec::new(),
        declared: Vec::new(),
    };
    StageResult::from_output(output)
}

fn inst(id: usize, name: &str, platform: &str, deps: &[usize]) -> InstanceSummary {
    InstanceSummary {
        id,
        index: id,
        name: name.into(),
        platform: p(platform),
        targets: vec![p(platform)],
        depends_on: deps.to_vec(),
        steps: 1,
        executes: true,
        cached: None,
    }
}

fn plan(instances: Vec<InstanceSummary>, targets: &[(&str, usize)]) -> PlanSummary {
    PlanSummary {
        build_platform: p("linux/amd64"),
        instances,
        targets: targets
            .iter()
            .map(|(platform, instance)| TargetRef {
                platform: p(platform),
                instance: *instance,
            })
            .collect(),
    }
}

/// a, b independent; c uses both; d (the target) builds on c.
fn diamond() -> PlanSummary {
    plan(
        vec![
            inst(0, "a", "linux/amd64", &[]),
            inst(1, "b", "linux/amd64", &[]),
            inst(2, "c", "linux/amd64", &[0, 1]),
            inst(3, "d", "linux/amd64", &[2]),
        ],
        &[("linux/amd64", 3)],
    )
}

#[test]
fn jobs_become_ready_in_dependency_order_and_the_build_succeeds_with_the_targets() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 4);
    let (build, jobs) = c.submit(diamond());
    let [a, b, cc, d] = jobs[..] else { panic!() };
    assert_eq!(c.ready(), [a, b]);
    assert_eq!(c.state_of(cc), "waiting");
    assert_eq!(c.sm.build(build).unwrap().status, BuildStatus::Queued);

    let ta = c.lease(a, "w1");
    assert_eq!(ta, LeaseToken { term: 1, epoch: 1 });
    assert_eq!(c.sm.build(build).unwrap().status, BuildStatus::Running);
    let tb = c.lease(b, "w1");
    c.now = 5_000;
    let resp = c.complete(a, ta);
    assert!(
        matches!(&resp, Response::Completed { released, build_status: BuildStatus::Running, .. } if released.is_empty()),
        "{resp:?}"
    );
    assert_eq!(c.state_of(cc), "waiting", "c still needs b");
    let resp = c.complete(b, tb);
    assert!(
        matches!(&resp, Response::Completed { released, .. } if released == &[cc]),
        "{resp:?}"
    );
    assert_eq!(c.ready(), [cc]);

    let tc = c.lease(cc, "w1");
    c.complete(cc, tc);
    assert_eq!(c.ready(), [d]);
    let td = c.lease(d, "w1");
    c.now = 9_000;
    let resp = c.complete(d, td);
    assert!(
        matches!(
            resp,
            Response::Completed {
                build_status: BuildStatus::Succeeded,
                ..
            }
        ),
        "{resp:?}"
    );
    let b = c.sm.build(build).unwrap();
    assert_eq!(b.finished_at_ms, Some(9_000));
    assert_eq!(b.result.len(), 1);
    assert_eq!(b.result[0].platform, p("linux/amd64"));
    assert_eq!(b.result[0].job, d);
    let out: StageOutput = b.result[0].output.clone();
    assert_eq!(out.key, format!("key-{}", d.0));
    assert!(c.sm.ready_jobs().is_empty());
    assert_eq!(c.sm.running_counts()["w1"], 0);
}

#[test]
fn a_late_worker_with_a_stale_token_changes_nothing() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 1);
    c.register("w2", &["linux/amd64"], &[], 1);
    let (_, jobs) = c.submit(diamond());
    let a = jobs[0];
    assert!(matches!(
        c.grant_until(a, "w1", 1_000),
        Response::Leases { .. }
    ));
    let old = LeaseToken { term: 1, epoch: 1 };

    // Not yet expired: the leader's clock must have passed the deadline.
    c.now = 999;
    let expired = c.sm.expired_leases(c.now);
    assert!(expired.is_empty());
    let early = c.apply(Command::ExpireLeases {
        now_ms: 999,
        leases: vec![LeaseRef {
            job: a,
            token: old,
            worker: "w1".into(),
            deadline_ms: 1_000,
        }],
    });
    assert!(
        matches!(&early, Response::Expired { requeued, rejected, .. } if requeued.is_empty() && matches!(rejected[0], Rejection::NotExpired { .. })),
        "{early:?}"
    );

    c.now = 1_000;
    let cmd =
        c.sm.expire_round(c.now)
            .expect("the lease is past its deadline");
    let resp = c.apply(cmd);
    assert!(
        matches!(&resp, Response::Expired { requeued, .. } if requeued == &[a]),
        "{resp:?}"
    );
    let job = c.sm.job(a).unwrap();
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(
        job.epoch, 1,
        "the epoch moves at the next lease, not at expiry"
    );
    assert!(
        job.last_error
            .as_deref()
            .unwrap()
            .contains("expired at 1000 ms")
    );

    c.term = 2; // a new leader re-leases it
    let new = c.lease(a, "w2");
    assert_eq!(new, LeaseToken { term: 2, epoch: 2 });

    // The first worker comes back with its result: refused, nothing changes.
    let before = c.content();
    let resp = c.complete(a, old);
    assert_eq!(
        resp.rejection().unwrap().to_string(),
        format!(
            "job {a}: lease (term 1, epoch 1) is not the job's current lease \
             (it is leased under (term 2, epoch 2))"
        )
    );
    let resp = c.fail(
        a,
        old,
        Failure::Step {
            error: "late".into(),
        },
    );
    assert!(matches!(
        resp.rejection(),
        Some(Rejection::StaleToken { .. })
    ));
    let resp = c.apply(Command::ExpireLeases {
        now_ms: c.now,
        leases: vec![LeaseRef {
            job: a,
            token: old,
            worker: "w1".into(),
            deadline_ms: 1_000,
        }],
    });
    assert!(matches!(&resp, Response::Expired { rejected, .. } if rejected.len() == 1));
    assert_eq!(c.content(), before, "the stale results changed nothing");

    // The current lease's result is accepted.
    let resp = c.complete(a, new);
    assert!(matches!(resp, Response::Completed { .. }), "{resp:?}");
    match &c.sm.job(a).unwrap().state {
        JobState::Done { worker, .. } => assert_eq!(worker.as_deref(), Some("w2")),
        other => panic!("{other:?}"),
    }
    // And once done, even the right token is refused a second time.
    let resp = c.complete(a, new);
    assert_eq!(
        resp.rejection().unwrap().to_string(),
        format!("job {a}: lease (term 2, epoch 2) is not the job's current lease (it is done)")
    );
}

#[test]
fn a_step_failure_fails_the_build_and_cancels_the_rest() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 1);
    c.register("w2", &["linux/amd64"], &[], 1);
    let (build, jobs) = c.submit(diamond());
    let [a, b, cc, d] = jobs[..] else { panic!() };
    let ta = c.lease(a, "w1");
    let tb = c.lease(b, "w2");
    c.now = 42;
    let resp = c.fail(
        a,
        ta,
        Failure::Step {
            error: "process \"/bin/sh -c make\" did not complete successfully: exit code: 2".into(),
        },
    );
    let expected = "process \"/bin/sh -c make\" did not complete successfully: exit code: 2 [stage a, linux/amd64]";
    assert_eq!(
        resp,
        Response::JobFailed {
            job: a,
            outcome: FailOutcome::BuildFailed {
                build,
                error: expected.into()
            }
        }
    );
    let bl = c.sm.build(build).unwrap();
    assert_eq!(
        bl.status,
        BuildStatus::Failed {
            error: expected.into()
        }
    );
    assert_eq!(bl.finished_at_ms, Some(42));
    assert_eq!(c.state_of(a), "failed");
    for j in [b, cc, d] {
        assert_eq!(c.state_of(j), "cancelled");
    }
    // b's lease is invalid now: its result is refused, and w2's slot is free.
    let resp = c.complete(b, tb);
    assert!(matches!(
        resp.rejection(),
        Some(Rejection::StaleToken { .. })
    ));
    assert_eq!(c.sm.running_counts()["w2"], 0);
    assert!(c.sm.ready_jobs().is_empty());
    assert!(c.sm.expired_leases(u64::MAX).is_empty());
    // A finished build cannot be cancelled.
    let resp = c.apply(Command::CancelBuild {
        now_ms: 50,
        build,
        reason: "user".into(),
    });
    assert!(matches!(
        resp.rejection(),
        Some(Rejection::BuildFinished { .. })
    ));
}

#[test]
fn a_dead_worker_s_jobs_go_back_to_ready() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 2);
    c.register("w2", &["linux/amd64"], &[], 2);
    let (_, jobs) = c.submit(diamond());
    let [a, b, ..] = jobs[..] else { panic!() };
    c.lease(a, "w1");
    c.lease(b, "w1");
    let resp = c.apply(Command::RemoveWorker {
        now_ms: 10,
        name: "w1".into(),
        mode: Removal::Gone,
    });
    assert_eq!(
        resp,
        Response::WorkerRemoved {
            name: "w1".into(),
            state: WorkerState::Gone,
            requeued: vec![a, b],
            failed_builds: vec![],
        }
    );
    assert_eq!(c.ready(), [a, b]);
    // A gone worker gets no lease; w2 does.
    let resp = c.grant_until(a, "w1", 100);
    assert!(
        matches!(&resp, Response::Leases { granted, rejected } if granted.is_empty() && matches!(rejected[0], Rejection::WorkerNotActive { .. })),
        "{resp:?}"
    );
    let t = c.lease(a, "w2");
    assert_eq!(t.epoch, 2);
    // The worker failing the job itself (not the step) requeues too.
    let resp = c.fail(
        a,
        t,
        Failure::Worker {
            error: "disk full".into(),
        },
    );
    assert_eq!(
        resp,
        Response::JobFailed {
            job: a,
            outcome: FailOutcome::Requeued { attempts: 2 }
        }
    );
    assert_eq!(c.state_of(a), "ready");
}

#[test]
fn a_gone_worker_failing_one_build_does_not_revive_its_other_jobs() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 4);
    let policy = BuildPolicy {
        max_attempts: 1,
        ..Default::default()
    };
    let (build, jobs) = c.submit_as("team", diamond(), policy);
    c.lease(jobs[0], "w1");
    c.lease(jobs[1], "w1");
    let resp = c.apply(Command::RemoveWorker {
        now_ms: 1,
        name: "w1".into(),
        mode: Removal::Gone,
    });
    assert_eq!(
        resp,
        Response::WorkerRemoved {
            name: "w1".into(),
            state: WorkerState::Gone,
            requeued: vec![],
            failed_builds: vec![build],
        }
    );
    assert_eq!(c.state_of(jobs[0]), "failed");
    assert_eq!(c.state_of(jobs[1]), "cancelled");
    assert!(c.sm.ready_jobs().is_empty());
}

#[test]
fn a_job_that_keeps_losing_its_worker_fails_the_build() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 4);
    let policy = BuildPolicy {
        max_attempts: 2,
        ..Default::default()
    };
    let (build, jobs) = c.submit_as("team", diamond(), policy);
    let a = jobs[0];
    for attempt in 1..=2 {
        c.grant_until(a, "w1", c.now + 100);
        c.now += 100;
        let cmd = c.sm.expire_round(c.now).unwrap();
        let resp = c.apply(cmd);
        if attempt == 1 {
            assert!(matches!(&resp, Response::Expired { requeued, .. } if requeued == &[a]));
        } else {
            assert!(
                matches!(&resp, Response::Expired { failed_builds, .. } if failed_builds == &[build]),
                "{resp:?}"
            );
        }
    }
    let BuildStatus::Failed { error } = &c.sm.build(build).unwrap().status else {
        panic!()
    };
    assert!(
        error.starts_with("stage a (linux/amd64) lost its worker 2 times; last: lease (term 1, epoch 2) on worker \"w1\" expired"),
        "{error}"
    );
    assert_eq!(c.state_of(jobs[1]), "cancelled");
}

#[test]
fn grants_are_checked_one_by_one_and_refused_ones_change_nothing() {
    let mut c = Cluster::new();
    c.register("x86", &["linux/amd64"], &[], 1);
    c.register("x86-qemu", &["linux/amd64"], &["linux/arm64"], 4);
    let (_, amd) = c.submit(diamond());
    let arm_plan = plan(
        vec![inst(0, "arm", "linux/arm64", &[])],
        &[("linux/arm64", 0)],
    );
    let (_, arm_denied) = c.submit_as(
        "team",
        arm_plan.clone(),
        BuildPolicy {
            emulation: Emulation::Deny,
            max_attempts: 3,
        },
    );
    let (_, arm_allowed) = c.submit(arm_plan);
    let before = c.content();
    let resp = c.apply(Command::GrantLeases {
        now_ms: 0,
        term: 1,
        grants: vec![
            Grant {
                job: amd[2],
                worker: "x86".into(),
                deadline_ms: 9,
            },
            Grant {
                job: arm_denied[0],
                worker: "x86".into(),
                deadline_ms: 9,
            },
            Grant {
                job: arm_denied[0],
                worker: "x86-qemu".into(),
                deadline_ms: 9,
            },
            Grant {
                job: amd[0],
                worker: "nobody".into(),
                deadline_ms: 9,
            },
            Grant {
                job: JobId(999),
                worker: "x86".into(),
                deadline_ms: 9,
            },
        ],
    });
    let Response::Leases { granted, rejected } = resp else {
        panic!()
    };
    assert!(granted.is_empty());
    let messages: Vec<String> = rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            format!("job {} is waiting, not ready", amd[2]),
            format!(
                "job {} (linux/arm64) cannot run on worker \"x86\": the worker runs native linux/amd64; emulated none",
                arm_denied[0]
            ),
            format!(
                "job {} (linux/arm64) cannot run on worker \"x86-qemu\": it would be emulated and the build denies emulation",
                arm_denied[0]
            ),
            "unknown worker \"nobody\"".to_string(),
            "unknown job j999".to_string(),
        ]
    );
    let mut after = c.sm.clone();
    after.last_applied = 0;
    after.term = 0;
    let mut expected = StateMachine::from_snapshot(&before).unwrap();
    expected.term = 0;
    assert_eq!(after, expected, "refused grants changed nothing");

    // Capacity counts grants earlier in the same batch; emulation when allowed is fine.
    let resp = c.apply(Command::GrantLeases {
        now_ms: 0,
        term: 1,
        grants: vec![
            Grant {
                job: amd[0],
                worker: "x86".into(),
                deadline_ms: 9,
            },
            Grant {
                job: amd[1],
                worker: "x86".into(),
                deadline_ms: 9,
            },
            Grant {
                job: arm_allowed[0],
                worker: "x86-qemu".into(),
                deadline_ms: 9,
            },
            Grant {
                job: amd[0],
                worker: "x86-qemu".into(),
                deadline_ms: 9,
            },
        ],
    });
    let Response::Leases { granted, rejected } = resp else {
        panic!()
    };
    assert_eq!(
        granted.iter().map(|g| g.job).collect::<Vec<_>>(),
        [amd[0], arm_allowed[0]]
    );
    assert_eq!(
        rejected,
        [
            Rejection::WorkerFull {
                worker: "x86".into(),
                capacity: 1
            },
            Rejection::NotReady {
                job: amd[0],
                state: "leased".into()
            },
        ]
    );
    // Draining workers keep their leases but get no new ones.
    c.apply(Command::RemoveWorker {
        now_ms: 1,
        name: "x86-qemu".into(),
        mode: Removal::Drain,
    });
    assert_eq!(c.state_of(arm_allowed[0]), "leased");
    let resp = c.grant_until(amd[1], "x86-qemu", 9);
    assert!(
        matches!(&resp, Response::Leases { rejected, .. } if matches!(rejected[0], Rejection::WorkerNotActive { .. }))
    );
    // A leader of an older term is refused outright.
    c.term = 0;
    let resp = c.grant_until(amd[1], "x86", 9);
    assert_eq!(
        resp.rejection(),
        Some(&Rejection::StaleTerm {
            term: 0,
            current: 1
        })
    );
}

#[test]
fn cancelling_a_build_invalidates_its_leases() {
    let mut c = Cluster::new();
    c.register("w", &["linux/amd64"], &[], 4);
    let (build, jobs) = c.submit(diamond());
    let t = c.lease(jobs[0], "w");
    assert!(
        c.sm.jobs_to_stop(&[jobs[0].0]).is_empty(),
        "a job its build still needs keeps running"
    );
    let resp = c.apply(Command::CancelBuild {
        now_ms: 3,
        build,
        reason: "cancelled by user".into(),
    });
    assert_eq!(
        resp,
        Response::Cancelled {
            build,
            cancelled: jobs.clone()
        }
    );
    assert!(matches!(
        c.complete(jobs[0], t).rejection(),
        Some(Rejection::StaleToken { .. })
    ));
    // The worker still running it is told to stop, under the job's latest epoch.
    assert_eq!(c.sm.jobs_to_stop(&[jobs[0].0]), [(jobs[0], t.epoch)]);
    assert_eq!(
        c.sm.build(build).unwrap().status,
        BuildStatus::Cancelled {
            reason: "cancelled by user".into()
        }
    );
    // Finished builds can be retired; unfinished ones cannot.
    let (other, _) = c.submit(diamond());
    let resp = c.apply(Command::RetireBuilds {
        builds: vec![build, other],
    });
    assert_eq!(
        resp,
        Response::Retired {
            builds: vec![build],
            rejected: vec![Rejection::BuildNotFinished {
                build: other,
                status: "queued".into()
            }]
        }
    );
    assert!(c.sm.build(build).is_none() && c.sm.job(jobs[0]).is_none());
    // A job no longer known is stopped whatever its epoch.
    assert_eq!(c.sm.jobs_to_stop(&[jobs[0].0]), [(jobs[0], u64::MAX)]);
}

#[test]
fn finished_builds_are_retired_after_their_retention_oldest_first() {
    let mut c = Cluster::new();
    c.register("w", &["linux/amd64"], &[], 4);
    let (first, _) = c.submit(diamond());
    let (second, _) = c.submit(diamond());
    let (running, _) = c.submit(diamond());
    for (build, at) in [(second, 100), (first, 200)] {
        c.apply(Command::CancelBuild {
            now_ms: at,
            build,
            reason: "done with it".into(),
        });
    }
    assert!(c.sm.builds_to_retire(1_099, 1_000, 10).is_empty());
    assert_eq!(c.sm.builds_to_retire(1_100, 1_000, 10), [second]);
    assert_eq!(c.sm.builds_to_retire(5_000, 1_000, 10), [second, first]);
    assert_eq!(c.sm.builds_to_retire(5_000, 1_000, 1), [second]);
    let old = c.sm.builds_to_retire(5_000, 1_000, 10);
    c.apply(Command::RetireBuilds { builds: old });
    assert!(c.sm.build(first).is_none() && c.sm.build(second).is_none());
    assert!(
        c.sm.build(running).is_some(),
        "an unfinished build is never retired"
    );
}

#[test]
fn cached_stages_start_done() {
    let mut c = Cluster::new();
    let mut pl = diamond();
    pl.instances[0].cached = Some(result("cached-a"));
    pl.instances[1].cached = Some(result("cached-b"));
    let (build, jobs) = c.submit(pl);
    assert_eq!(c.ready(), [jobs[2]]);
    let ready = c.sm.ready_jobs();
    let keys: Vec<&str> = ready[0].parents.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["cached-a", "cached-b"]);
    assert!(
        c.sm.build(build).unwrap().plan.instances[0]
            .cached
            .is_none(),
        "kept once, in the job"
    );

    let mut all = diamond();
    for i in &mut all.instances {
        i.cached = Some(result(&i.name));
    }
    match c.apply(Command::SubmitBuild {
        now_ms: 7,
        tenant: "t".into(),
        request: Box::new(super::simulation::request()),
        plan: all,
        policy: BuildPolicy::default(),
    }) {
        Response::Submitted { status, ready, .. } => {
            assert_eq!(status, BuildStatus::Succeeded);
            assert!(ready.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_plans_and_workers_are_refused() {
    let mut c = Cluster::new();
    let mut bad = diamond();
    bad.instances[1].depends_on = vec![2];
    let resp = c.apply(Command::SubmitBuild {
        now_ms: 0,
        tenant: "t".into(),
        request: Box::new(super::simulation::request()),
        plan: bad,
        policy: BuildPolicy::default(),
    });
    assert_eq!(
        resp.rejection().unwrap().to_string(),
        "invalid build: instance 1 (b) depends on instance 2, which does not come before it"
    );
    let resp = c.apply(Command::RegisterWorker {
        now_ms: 0,
        name: "w".into(),
        capabilities: Capabilities::default(),
        capacity: 0,
        labels: BTreeMap::new(),
    });
    assert!(matches!(
        resp.rejection(),
        Some(Rejection::InvalidWorker { .. })
    ));
    assert_eq!(c.sm.builds().count(), 0);
    assert_eq!(c.sm.workers().count(), 0);
}

#[test]
fn unknown_command_versions_and_garbage_are_refused() {
    let mut c = Cluster::new();
    c.register("w", &["linux/amd64"], &[], 1);
    let before = c.content();
    let future = br#"{"version":3,"command":{"op":"teleport_build","now_ms":1}}"#;
    let resp = c.sm.apply_bytes(2, future);
    assert_eq!(
        resp.rejection().unwrap().to_string(),
        "command format version 3 is not supported (this node reads version 2)"
    );
    let resp = c.sm.apply_bytes(3, b"not json");
    assert!(matches!(
        resp.rejection(),
        Some(Rejection::Malformed { .. })
    ));
    let resp =
        c.sm.apply_bytes(4, br#"{"version":1,"command":{"op":"teleport_build"}}"#);
    assert!(matches!(
        resp.rejection(),
        Some(Rejection::Malformed { .. })
    ));
    assert_eq!(
        c.sm.last_applied(),
        4,
        "refused entries still count as applied"
    );
    assert_eq!(c.content(), before);
    // Replaying an applied index is refused.
    let resp = c.sm.apply(4, Command::RetireBuilds { builds: vec![] });
    assert_eq!(
        resp.rejection(),
        Some(&Rejection::AlreadyApplied {
            index: 4,
            last_applied: 4
        })
    );
    // An entry starts with the magic and the version.
    let bytes = Command::RetireBuilds { builds: vec![] }.encode();
    assert!(bytes.starts_with(b"STRC\x02\0\0\0"), "{bytes:?}");
    // Snapshots are versioned the same way.
    let mut snap: serde_json::Value = serde_json::from_slice(&c.sm.snapshot()).unwrap();
    snap["version"] = 9.into();
    let err = StateMachine::from_snapshot(&serde_json::to_vec(&snap).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "snapshot format version 9 is not supported (this node reads version 2)"
    );
}

#[test]
fn batches_apply_each_command_and_do_not_nest() {
    let mut c = Cluster::new();
    let resp = c.apply(Command::Batch {
        commands: vec![
            Command::RegisterWorker {
                now_ms: 0,
                name: "w".into(),
                capabilities: Capabilities::default(),
                capacity: 0,
                labels: BTreeMap::new(),
            },
            Command::RegisterWorker {
                now_ms: 0,
                name: "w".into(),
                capabilities: Capabilities::default(),
                capacity: 1,
                labels: BTreeMap::new(),
            },
            Command::Batch { commands: vec![] },
        ],
    });
    let Response::Batch { responses } = resp else {
        panic!()
    };
    assert!(matches!(
        responses[0].rejection(),
        Some(Rejection::InvalidWorker { .. })
    ));
    assert!(matches!(
        responses[1],
        Response::WorkerRegistered {
            rejoined: false,
            ..
        }
    ));
    assert_eq!(responses[2].rejection(), Some(&Rejection::NestedBatch));
    assert_eq!(c.sm.workers().count(), 1);
}

/// Two tenants: "a" with two builds, "b" with one; each build has three independent jobs.
fn two_tenants() -> (Cluster, Vec<Vec<JobId>>) {
    let mut c = Cluster::new();
    let three = plan(
        vec![
            inst(0, "x", "linux/amd64", &[]),
            inst(1, "y", "linux/amd64", &[]),
            inst(2, "z", "linux/amd64", &[]),
            inst(3, "all", "linux/amd64", &[0, 1, 2]),
        ],
        &[("linux/amd64", 3)],
    );
    let mut builds = Vec::new();
    for tenant in ["a", "a", "b"] {
        c.now += 1;
        builds.push(c.submit_as(tenant, three.clone(), BuildPolicy::default()).1);
    }
    (c, builds)
}

#[test]
fn ready_jobs_come_round_robin_across_tenants_and_builds() {
    let (mut c, builds) = two_tenants();
    let (a1, a2, b1) = (&builds[0], &builds[1], &builds[2]);
    let ready = c.sm.ready_jobs();
    let order: Vec<JobId> = ready.iter().map(|r| r.job).collect();
    assert_eq!(
        order,
        [
            a1[0], b1[0], a2[0], b1[1], a1[1], b1[2], a2[1], a1[2], a2[2]
        ],
        "tenants alternate; within tenant a, its builds alternate, oldest first"
    );
    assert!(ready.iter().enumerate().all(|(i, r)| r.rank == i));
    assert_eq!(ready[1].tenant, "b");

    // Tenant a already runs two jobs: b goes first until it catches up.
    c.register("w", &["linux/amd64"], &[], 8);
    c.lease(a1[0], "w");
    c.lease(a2[0], "w");
    let order: Vec<JobId> = c.sm.ready_jobs().iter().map(|r| r.job).collect();
    assert_eq!(order[..3], [b1[0], b1[1], a1[1]]);
}

#[test]
fn one_scheduling_round_is_fair_and_keeps_jobs_near_their_parents() {
    let (mut c, builds) = two_tenants();
    c.register("w1", &["linux/amd64"], &[], 2);
    c.register("w2", &["linux/amd64"], &[], 2);
    let cmd = c.sm.schedule_round(1, c.now, 60_000).unwrap();
    let Response::Leases { granted, rejected } = c.apply(cmd) else {
        panic!()
    };
    assert!(rejected.is_empty());
    let placed: Vec<(JobId, &str)> = granted.iter().map(|g| (g.job, g.worker.as_str())).collect();
    assert_eq!(
        placed,
        [
            (builds[0][0], "w1"),
            (builds[2][0], "w2"),
            (builds[1][0], "w1"),
            (builds[2][1], "w2"),
        ],
        "four slots: a, b, a, b"
    );
    assert!(
        c.sm.schedule_round(1, c.now, 60_000).is_none(),
        "every slot is taken"
    );
    assert_eq!(c.sm.counters().slots_busy, 4);

    // Finish build b's first two jobs on w2 and its third anywhere: its final stage prefers w2.
    let tokens: Vec<GrantedLease> = granted;
    for g in &tokens {
        c.complete(g.job, g.token);
    }
    let b1 = &builds[2];
    let t = c.lease(b1[2], "w1");
    c.complete(b1[2], t);
    let ready = c.sm.ready_jobs();
    let last = ready.iter().find(|r| r.job == b1[3]).unwrap();
    assert_eq!(last.parents.len(), 3);
    let views = c.sm.worker_views(&ready);
    assert_eq!(views[1].holds.len(), 2, "w2 built two of the parents");
    let decided = crate::scheduler::schedule(std::slice::from_ref(last), &views);
    assert_eq!(decided.assignments[0].worker, "w2");
    assert_eq!(decided.assignments[0].locality, 2 * 1000);

    // A worker that is gone no longer counts as holding anything.
    c.apply(Command::RemoveWorker {
        now_ms: c.now,
        name: "w2".into(),
        mode: Removal::Gone,
    });
    assert!(
        c.sm.cache_entry(&format!("key-{}", b1[0].0))
            .unwrap()
            .holders
            .is_empty()
    );
}

#[test]
fn the_cache_index_records_holders_and_forgets_them() {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &[], 1);
    let resp = c.apply(Command::RecordCache {
        now_ms: 5,
        entries: vec![
            CacheRecord {
                key: "step-1".into(),
                layers: result("step-1-layer").layers().to_vec(),
                worker: Some("w1".into()),
            },
            CacheRecord {
                key: "step-1".into(),
                layers: vec![],
                worker: Some("unknown".into()),
            },
        ],
        dropped: vec![],
    });
    assert_eq!(
        resp,
        Response::CacheRecorded {
            recorded: 2,
            dropped: 0
        }
    );
    let e = c.sm.cache_entry("step-1").unwrap();
    assert_eq!(e.layers.len(), 1, "an empty record keeps the layers");
    assert_eq!(e.size(), 1000);
    assert_eq!(e.holders.iter().collect::<Vec<_>>(), ["w1"]);
    let resp = c.apply(Command::RecordCache {
        now_ms: 6,
        entries: vec![],
        dropped: vec![
            CacheDrop {
                key: "step-1".into(),
                worker: Some("w1".into()),
            },
            CacheDrop {
                key: "nothing".into(),
                worker: None,
            },
        ],
    });
    assert_eq!(
        resp,
        Response::CacheRecorded {
            recorded: 0,
            dropped: 1
        }
    );
    assert!(c.sm.cache_entry("step-1").unwrap().holders.is_empty());
}

#[test]
fn a_job_no_worker_can_run_fails_its_build_naming_platform_and_workers() {
    let mut c = Cluster::new();
    c.register("x86", &["linux/amd64"], &["linux/arm64"], 2);
    let pl = plan(
        vec![
            inst(0, "native", "linux/amd64", &[]),
            inst(1, "arm", "linux/arm64", &[]),
        ],
        &[("linux/amd64", 0), ("linux/arm64", 1)],
    );
    let policy = BuildPolicy {
        emulation: Emulation::Deny,
        max_attempts: 3,
    };
    let (build, jobs) = c.submit_as("t", pl, policy);
    let cmd = c.sm.schedule_round(1, 0, 1_000).unwrap();
    let Response::Batch { responses } = c.apply(cmd) else {
        panic!()
    };
    assert!(matches!(&responses[0], Response::Leases { granted, .. } if granted[0].job == jobs[0]));
    assert_eq!(
        responses[1],
        Response::Unplaced {
            failed_builds: vec![build],
            rejected: vec![]
        }
    );
    assert_eq!(
        c.sm.build(build).unwrap().status,
        BuildStatus::Failed {
            error: "stage arm (linux/arm64) cannot be placed: no worker runs linux/arm64 natively \
                    and emulation is denied (--emulation=deny); workers: x86 (native linux/amd64; \
                    emulated linux/arm64)"
                .into()
        }
    );
    assert_eq!(c.state_of(jobs[0]), "cancelled");
}

#[test]
fn leases_go_only_to_reachable_workers_and_the_rest_wait_for_them() {
    let mut c = Cluster::new();
    c.register("x86", &["linux/amd64"], &[], 2);
    c.register("arm", &["linux/arm64"], &[], 2);
    let pl = plan(
        vec![
            inst(0, "native", "linux/amd64", &[]),
            inst(1, "arm", "linux/arm64", &[]),
        ],
        &[("linux/amd64", 0), ("linux/arm64", 1)],
    );
    let (build, jobs) = c.submit(pl);
    // The arm64 worker has not reconnected: its job waits rather than failing the build.
    let cmd =
        c.sm.schedule_round_among(1, 0, 1_000, |w| w == "x86")
            .unwrap();
    let Command::GrantLeases { grants, .. } = &cmd else {
        panic!("expected only grants, got {cmd:?}")
    };
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].job, grants[0].worker.as_str()), (jobs[0], "x86"));
    c.apply(cmd);
    assert_eq!(c.state_of(jobs[1]), "ready");
    assert!(
        c.sm.schedule_round_among(1, 0, 1_000, |w| w == "x86")
            .is_none()
    );
    // Once it is back, it gets the job.
    let Some(Command::GrantLeases { grants, .. }) =
        c.sm.schedule_round_among(1, 0, 1_000, |_| true)
    else {
        panic!("the arm64 job is placed once its worker is reachable")
    };
    assert_eq!((grants[0].job, grants[0].worker.as_str()), (jobs[1], "arm"));
    assert!(matches!(
        c.sm.build(build).unwrap().status,
        BuildStatus::Running
    ));
}

#[test]
fn coordinators_are_recorded_and_retired_ids_never_come_back() {
    let mut c = Cluster::new();
    let set = |id: u64, name: &str, addr: &str| Command::SetCoordinator {
        id,
        name: name.into(),
        addr: addr.into(),
    };
    assert_eq!(
        c.apply(set(4, "c4", "127.0.0.1:7104")),
        Response::CoordinatorSet { id: 4 }
    );
    // A new address for the same node replaces the old one.
    c.apply(set(4, "c4", "127.0.0.1:7204"));
    assert_eq!(c.sm.coordinators()[&4].addr, "127.0.0.1:7204");
    let refused = |r: Response| r.rejection().map(ToString::to_string).unwrap_or_default();
    let name_taken = refused(c.apply(set(5, "c4", "127.0.0.1:7105")));
    assert!(
        name_taken.contains("belongs to coordinator 4"),
        "{name_taken}"
    );
    let bad_addr = refused(c.apply(set(5, "c5", "somewhere")));
    assert!(bad_addr.contains("ip:port"), "{bad_addr}");
    assert!(refused(c.apply(set(0, "c0", "127.0.0.1:1"))).contains("reserved"));

    // An initial coordinator (never recorded) and an added one are retired alike.
    for (id, name) in [(2, "c2"), (4, "c4")] {
        let retire = Command::RetireCoordinator {
            id,
            name: name.into(),
            addr: String::new(),
        };
        assert_eq!(c.apply(retire), Response::CoordinatorRetired { id });
        let again = refused(c.apply(set(id, name, "127.0.0.1:7300")));
        assert!(again.contains("never reused"), "{again}");
    }
    // A retired name may be taken by a new id; the record survives a snapshot.
    assert_eq!(
        c.apply(set(6, "c4", "127.0.0.1:7106")),
        Response::CoordinatorSet { id: 6 }
    );
    let mut restored = StateMachine::default();
    restored.restore(&c.sm.snapshot()).unwrap();
    assert_eq!(restored.coordinators(), c.sm.coordinators());
}

#[test]
fn queries_summarise_the_cluster() {
    let mut c = Cluster::new();
    c.register("arm", &["linux/arm64"], &[], 2);
    c.register("x86", &["linux/amd64"], &[], 3);
    let (_, jobs) = c.submit(diamond());
    let arm = plan(
        vec![inst(0, "a", "linux/arm64", &[])],
        &[("linux/arm64", 0)],
    );
    c.submit_as("other", arm.clone(), BuildPolicy::default());
    c.submit_as("other", arm, BuildPolicy::default());
    let t = c.lease(jobs[0], "x86");
    let counters = c.sm.counters();
    assert_eq!(counters.builds_queued, 2);
    assert_eq!(counters.builds_running, 1);
    assert_eq!(counters.jobs_ready, 3);
    assert_eq!(counters.jobs_running, 1);
    assert_eq!(counters.jobs_waiting, 2);
    assert_eq!(
        counters.ready_by_platform,
        BTreeMap::from([
            ("linux/amd64".to_string(), 1),
            ("linux/arm64".to_string(), 2)
        ])
    );
    assert_eq!((counters.slots_total, counters.slots_busy), (5, 1));
    assert_eq!(
        c.sm.running_counts(),
        BTreeMap::from([("arm".to_string(), 0), ("x86".to_string(), 1)])
    );
    let spec = c.sm.job_spec(jobs[0]).unwrap();
    assert_eq!(spec.instance.name, "a");
    assert_eq!(spec.lease.unwrap().token, t);
    assert!(spec.request.dockerfile.contains("FROM scratch"));

    c.complete(jobs[0], t);
    let t = c.lease(jobs[1], "x86");
    c.complete(jobs[1], t);
    let spec = c.sm.job_spec(jobs[2]).unwrap();
    let inputs: Vec<(usize, &str)> = spec.inputs.iter().map(|(i, r)| (*i, r.key())).collect();
    assert_eq!(inputs, [(0, "key-1"), (1, "key-2")]);

    let status = c.sm.status(10);
    assert_eq!(status.builds.len(), 3);
    assert_eq!(status.tenants.len(), 2);
    assert_eq!(status.tenants[0].tenant, "other");
    assert_eq!(status.tenants[0].jobs_ready, 2);
    let text = status.to_text();
    assert!(
        text.contains("builds: 2 queued, 1 running, 0 succeeded"),
        "{text}"
    );
    assert!(
        text.contains("build 1 [team] running: 2/4 done, 0 running, 1 ready"),
        "{text}"
    );
    assert!(
        text.contains("worker x86 active: 0/3 slots busy (native linux/amd64; emulated none)"),
        "{text}"
    );
}

/// A scenario touching every command, as log bytes.
fn scenario() -> Cluster {
    let mut c = Cluster::new();
    c.register("w1", &["linux/amd64"], &["linux/arm64"], 2);
    c.register("w2", &["linux/arm64"], &[], 1);
    let (_, jobs) = c.submit(diamond());
    let (other, _) = c.submit_as(
        "b",
        plan(
            vec![inst(0, "arm", "linux/arm64", &[])],
            &[("linux/arm64", 0)],
        ),
        BuildPolicy::default(),
    );
    c.now = 10;
    let cmd = c.sm.schedule_round(1, c.now, 100).unwrap();
    c.apply(cmd);
    let leases: Vec<LeaseRef> = c.sm.expired_leases(u64::MAX);
    c.now = 20;
    c.complete(leases[0].job, leases[0].token);
    c.apply(Command::RenewLeases {
        now_ms: 20,
        leases: vec![Renewal {
            job: leases[1].job,
            token: leases[1].token,
            deadline_ms: 500,
        }],
    });
    c.now = 200;
    let cmd = c.sm.expire_round(c.now).unwrap();
    c.apply(cmd);
    c.apply(Command::CancelBuild {
        now_ms: 210,
        build: other,
        reason: "no longer needed".into(),
    });
    c.apply(Command::RecordCache {
        now_ms: 220,
        entries: vec![CacheRecord {
            key: "k".into(),
            layers: vec![],
            worker: Some("w2".into()),
        }],
        dropped: vec![],
    });
    c.apply(Command::RemoveWorker {
        now_ms: 230,
        name: "w2".into(),
        mode: Removal::Drain,
    });
    assert_eq!(c.state_of(jobs[1]), "leased", "renewed past 200");
    c
}

#[test]
fn snapshot_and_restore_give_an_identical_state() {
    let c = scenario();
    let snap = c.sm.snapshot();
    let mut restored = StateMachine::new();
    restored.restore(&snap).unwrap();
    assert_eq!(restored.snapshot(), snap);
    assert_eq!(restored, c.sm, "the derived index is rebuilt as well");
    assert_eq!(restored.ready_jobs(), c.sm.ready_jobs());
    assert_eq!(
        restored.expired_leases(u64::MAX),
        c.sm.expired_leases(u64::MAX)
    );

    // Both go on identically.
    let mut a = c.sm.clone();
    let mut b = restored;
    let lease = a.expired_leases(u64::MAX)[0].clone();
    let done = Command::CompleteJob {
        now_ms: 300,
        job: lease.job,
        token: lease.token,
        result: result("b"),
    };
    let next = c.sm.last_applied() + 1;
    assert_eq!(
        a.apply_bytes(next, &done.encode()),
        b.apply_bytes(next, &done.encode())
    );
    let cmd = a.schedule_round(2, 300, 100).expect("c is ready");
    assert_eq!(b.schedule_round(2, 300, 100).unwrap(), cmd);
    assert_eq!(
        a.apply_bytes(next + 1, &cmd.encode()),
        b.apply_bytes(next + 1, &cmd.encode())
    );
    assert_eq!(a.snapshot(), b.snapshot());
    // A bad snapshot leaves the state alone.
    assert!(b.restore(b"{").is_err());
    assert_eq!(a.snapshot(), b.snapshot());
}

#[test]
fn the_same_log_gives_byte_identical_snapshots() {
    let c = scenario();
    let mut replica = StateMachine::new();
    for (i, entry) in c.log.iter().enumerate() {
        replica.apply_bytes(i as u64 + 1, entry);
    }
    assert_eq!(replica.snapshot(), c.sm.snapshot());

    // Replaying on top of a snapshot skips what it already holds.
    let mut late = StateMachine::from_snapshot(&c.sm.snapshot()).unwrap();
    for (i, entry) in c.log.iter().enumerate() {
        late.apply_bytes(i as u64 + 1, entry);
    }
    assert_eq!(late.snapshot(), c.sm.snapshot());
}

/// Checks a simulated build against the lower bound and locality against chance.
fn check_simulation(report: &simulation::SimReport) {
    println!("{report}");
    assert!(report.makespan >= report.lower_bound, "{report}");
    assert!(
        report.makespan * 2 <= report.lower_bound * 3,
        "more than 1.5x the lower bound: {report}"
    );
    // A placement blind to locality finds a parent on its worker one time in `workers`.
    let parents = report.local_parents + report.fetched_parents;
    assert!(
        2 * report.local_parents * report.workers as u64 >= 3 * parents,
        "locality no better than chance: {report}"
    );
}

#[test]
fn simulation_stays_near_the_lower_bound() {
    for seed in [1, 2, 3] {
        // Critical-path bound: slots to spare.
        check_simulation(&simulation::simulate(300, 30, seed));
        // Slot bound: total work over the slots exceeds the critical path.
        let report = simulation::simulate(300, 6, seed);
        assert!(
            report.total_work / report.slots > report.critical_path,
            "{report}"
        );
        check_simulation(&report);
    }
}

#[test]
fn simulation_is_deterministic_and_its_log_replays() {
    let one = simulation::run(120, 12, 7);
    let two = simulation::run(120, 12, 7);
    assert_eq!(one.report, two.report);
    assert_eq!(one.log, two.log);
    assert_eq!(one.state.snapshot(), two.state.snapshot());
    let mut replica = StateMachine::new();
    for (i, entry) in one.log.iter().enumerate() {
        replica.apply_bytes(i as u64 + 1, entry);
    }
    assert_eq!(replica.snapshot(), one.state.snapshot());
    assert_ne!(simulation::simulate(120, 12, 8), one.report);
}

/// The full-size run: `cargo test -p strata-coordinator --release -- --ignored --nocapture`.
#[test]
#[ignore = "full-size simulation; run with --ignored"]
fn simulation_1000_stages_on_100_workers() {
    for seed in [1, 2, 3, 4, 5] {
        check_simulation(&simulation::simulate(1000, 100, seed));
        check_simulation(&simulation::simulate(1000, 20, seed));
    }
}

/// Version 1 kept requests and outputs as JSON text: turns a version-2 JSON document into that.
fn as_version_1(doc: &mut serde_json::Value) {
    match doc {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if matches!(key.as_str(), "request" | "output") && value.is_object() {
                    *value = serde_json::Value::String(value.to_string());
                } else {
                    as_version_1(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(as_version_1),
        _ => {}
    }
}

#[test]
fn version_1_log_entries_and_snapshots_are_read() {
    let mut c = Cluster::new();
    let (_, jobs) = c.submit(diamond());
    c.apply(Command::Batch {
        commands: vec![Command::GrantLeases {
            now_ms: c.now,
            term: 1,
            grants: vec![Grant {
                job: jobs[0],
                worker: "w1".into(),
                deadline_ms: c.now + 10_000,
            }],
        }],
    });
    // A version-1 entry of a command carrying a request and one carrying an output.
    let complete = Command::CompleteJob {
        now_ms: 5,
        job: jobs[0],
        token: LeaseToken { term: 1, epoch: 1 },
        result: result("a"),
    };
    let submit = Command::SubmitBuild {
        now_ms: 6,
        tenant: "t".into(),
        request: Box::new(super::simulation::request()),
        plan: diamond(),
        policy: BuildPolicy::default(),
    };
    for cmd in [complete, submit] {
        let mut command = serde_json::to_value(&cmd).unwrap();
        as_version_1(&mut command);
        let v1 = serde_json::json!({"version": 1, "command": command}).to_string();
        assert!(
            v1.contains("\"output\":\"{") || v1.contains("\"request\":\"{"),
            "{v1}"
        );
        assert_eq!(Command::decode(v1.as_bytes()).unwrap(), cmd);
        // And today's form round-trips through rkyv.
        assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
    }
    // A version-1 snapshot of a state with a build, a leased job and a finished one.
    let v2 = c.sm.snapshot();
    let mut snapshot: serde_json::Value = serde_json::from_slice(&v2).unwrap();
    snapshot["version"] = 1.into();
    as_version_1(&mut snapshot);
    let restored = StateMachine::from_snapshot(snapshot.to_string().as_bytes()).unwrap();
    assert_eq!(restored.snapshot(), v2);
    // Unknown versions are refused, not guessed.
    snapshot["version"] = 9.into();
    assert!(StateMachine::from_snapshot(snapshot.to_string().as_bytes()).is_err());
    let mut future = cmd_bytes_with_version(9);
    assert!(matches!(
        Command::decode(&future),
        Err(Rejection::UnsupportedVersion { found: 9, .. })
    ));
    future.truncate(6);
    assert!(matches!(
        Command::decode(&future),
        Err(Rejection::Malformed { .. })
    ));
    // A corrupt archive is an error, never a panic.
    let mut corrupt = Command::RetireBuilds {
        builds: vec![BuildId(1)],
    }
    .encode();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    corrupt.truncate(last);
    assert!(Command::decode(&corrupt).is_err());
}

fn cmd_bytes_with_version(version: u32) -> Vec<u8> {
    let mut bytes = Command::RetireBuilds { builds: Vec::new() }.encode();
    bytes[4..8].copy_from_slice(&version.to_le_bytes());
    bytes
}
