//! A discrete-event simulation of one large build on a cluster, on virtual time: the state
//! machine and the scheduler exactly as the leader drives them (every command encoded to log
//! bytes and applied with [`StateMachine::apply_bytes`]), workers replaced by a completion
//! event after each stage's duration.
//!
//! [`simulate`] generates a random DAG (seeded, deterministic): five levels of stages narrowing
//! towards the top (bases from an image, then stages built on the level below), each stage with
//! a heavy-tailed duration and one layer, and a final stage copying from the top level (the
//! shape of a large multi-stage build); and workers with one to four slots. A worker lacking a parent stage's layers fetches them first (200 MB/s), so
//! locality shows in the makespan. The report gives the makespan next to the lower bound
//! `max(critical path, total work / total slots)`, which ignores fetching.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

use strata_shared::job::{BuildRequest, StageOutput};
use strata_shared::oci::{ImageConfig, MEDIA_OCI_LAYER_GZIP};
use strata_shared::platform::{Capabilities, Platform};
use strata_shared::store::BlobMeta;

use super::{
    BuildStatus, CacheRecord, Command, InstanceSummary, LeaseToken, PlanSummary, Response,
    StageResult, StateMachine, TargetRef,
};

/// The term the simulated leader holds.
const TERM: u64 = 1;
/// Long enough that no simulated lease expires.
const LEASE_MS: u64 = 3_600_000;
/// Bytes per millisecond a worker fetches missing parent layers at (200 MB/s).
const FETCH_BYTES_PER_MS: u64 = 200_000;

/// What one simulated build came to. Times are virtual milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub stages: usize,
    pub workers: usize,
    /// Slots over all workers.
    pub slots: u64,
    /// Submission to success.
    pub makespan: u64,
    /// The longest chain of dependent stages, by duration.
    pub critical_path: u64,
    /// The sum of all stage durations.
    pub total_work: u64,
    /// `max(critical_path, ceil(total_work / slots))`: no schedule finishes sooner.
    pub lower_bound: u64,
    /// Scheduling rounds that granted leases.
    pub rounds: u64,
    /// Log entries applied.
    pub entries: u64,
    /// Parent outputs found on the worker a stage ran on.
    pub local_parents: u64,
    /// Parent outputs the worker had to fetch.
    pub fetched_parents: u64,
}

impl SimReport {
    /// Makespan over lower bound.
    pub fn ratio(&self) -> f64 {
        self.makespan as f64 / self.lower_bound.max(1) as f64
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stages on {} workers ({} slots): makespan {:.1} s, lower bound {:.1} s \
             (critical path {:.1} s, work/slots {:.1} s), ratio {:.3}; {} rounds, {} log entries, \
             parents local {} / fetched {}",
            self.stages,
            self.workers,
            self.slots,
            self.makespan as f64 / 1000.0,
            self.lower_bound as f64 / 1000.0,
            self.critical_path as f64 / 1000.0,
            self.total_work as f64 / self.slots.max(1) as f64 / 1000.0,
            self.ratio(),
            self.rounds,
            self.entries,
            self.local_parents,
            self.fetched_parents,
        )
    }
}

/// Simulates one build of `stages` stages (at least 2) on `workers` workers (at least 1).
pub fn simulate(stages: usize, workers: usize, seed: u64) -> SimReport {
    run(stages, workers, seed).report
}

/// A finished simulation: the report, the final state and every log entry applied.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Run {
    pub report: SimReport,
    pub state: StateMachine,
    pub log: Vec<Vec<u8>>,
}

/// SplitMix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// The generated build: per stage, its duration, layer size and dependencies.
struct Dag {
    duration: Vec<u64>,
    /// What the plan knows of each stage's weight: its step count, a noisy estimate of its
    /// duration (one step per 20 s, give or take half).
    steps: Vec<usize>,
    size: Vec<u64>,
    deps: Vec<Vec<usize>>,
}

/// The relative sizes of the levels below the final stage: base stages (from an image), then
/// levels built on the one below, narrowing towards the top like a build that assembles many
/// components into a few images.
const LEVELS: [usize; 5] = [6, 5, 4, 3, 1];

fn generate(stages: usize, rng: &mut Rng) -> Dag {
    let n = stages.max(2 * LEVELS.len());
    let body = n - 1;
    let total: usize = LEVELS.iter().sum();
    // Level l holds stages bounds[l]..bounds[l + 1].
    let mut bounds = vec![0];
    let mut sum = 0;
    for w in LEVELS {
        sum += w;
        bounds.push(body * sum / total);
    }
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
    for l in 1..LEVELS.len() {
        let (lo, hi) = (bounds[l - 1], bounds[l]);
        let (below, width) = (hi - lo, bounds[l + 1] - hi);
        for j in 0..width {
            let d = &mut deps[hi + j];
            // Every stage of the level below is used by one of this level...
            d.extend((j..below).step_by(width).map(|k| lo + k));
            // ...and some more, now and then one further down.
            for _ in 0..rng.below(3) {
                d.push(lo + rng.below(below as u64) as usize);
            }
            if lo > 0 && rng.below(4) == 0 {
                d.push(rng.below(lo as u64) as usize);
            }
            d.sort_unstable();
            d.dedup();
        }
    }
    // The target copies from every stage nothing else uses: the top level.
    let mut used = vec![false; n];
    for &p in deps.iter().flatten() {
        used[p] = true;
    }
    deps[body] = (0..body).filter(|&i| !used[i]).collect();
    let duration: Vec<u64> = (0..n)
        .map(|_| match rng.below(100) {
            0..60 => rng.range(5_000, 45_000),
            60..95 => rng.range(45_000, 150_000),
            _ => rng.range(150_000, 300_000),
        })
        .collect();
    let size = (0..n).map(|_| rng.range(1 << 20, 200 << 20)).collect();
    let steps = duration
        .iter()
        .map(|&d| ((d * rng.range(50, 150) / 100) / 20_000).max(1) as usize)
        .collect();
    Dag {
        duration,
        steps,
        size,
        deps,
    }
}

fn stage_key(stage: usize) -> String {
    format!("sim-stage-{stage}")
}

/// A build request as simulated builds submit it (the state machine keeps it, never reads it).
pub fn request() -> BuildRequest {
    BuildRequest {
        dockerfile: "FROM scratch\n".into(),
        dockerfile_name: "Dockerfile".into(),
        context: Default::default(),
        secrets: Default::default(),
        dockerignore: None,
        options: Default::default(),
        platforms: vec![Platform::new("linux", "amd64", "")],
        no_cache: false,
        allow_host_network: false,
        compression: Default::default(),
        emulation: Default::default(),
        tenant: "sim".into(),
    }
}

fn stage_result(stage: usize, size: u64, platform: &Platform) -> StageResult {
    let layer = BlobMeta {
        version: 1,
        blake3: format!("{stage:064x}"),
        digest: format!("sha256:{stage:064x}"),
        media_type: MEDIA_OCI_LAYER_GZIP.into(),
        size,
        diff_id: None,
    };
    let output = StageOutput {
        config: ImageConfig::empty(platform),
        layers: vec![layer],
        key: stage_key(stage),
        env: Vec::new(),
        declared: Vec::new(),
    };
    // A StageOutput always serializes.
    StageResult::from_output(output)
}

/// A running stage: when it ends, and under which lease.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Completion {
    at: u64,
    job: u64,
    token: LeaseToken,
    worker: String,
    fetched: Vec<String>,
}

pub(crate) fn run(stages: usize, workers: usize, seed: u64) -> Run {
    let mut rng = Rng(seed);
    let dag = generate(stages, &mut rng);
    let n = dag.duration.len();
    let amd64: Platform = Platform::new("linux", "amd64", "");
    let capacities: Vec<u32> = (0..workers.max(1))
        .map(|_| rng.range(1, 4) as u32)
        .collect();

    let mut critical = vec![0u64; n];
    for i in 0..n {
        let before = dag.deps[i].iter().map(|&d| critical[d]).max().unwrap_or(0);
        critical[i] = before + dag.duration[i];
    }
    let critical_path = critical.iter().copied().max().unwrap_or(0);
    let total_work: u64 = dag.duration.iter().sum();
    let slots: u64 = capacities.iter().map(|&c| u64::from(c)).sum();
    let lower_bound = critical_path.max(total_work.div_ceil(slots.max(1)));

    let mut state = StateMachine::new();
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut propose = |state: &mut StateMachine, cmd: Command| -> Response {
        let bytes = cmd.encode();
        let index = log.len() as u64 + 1;
        let resp = state.apply_bytes(index, &bytes);
        log.push(bytes);
        resp
    };

    let register = capacities
        .iter()
        .enumerate()
        .map(|(i, &capacity)| Command::RegisterWorker {
            now_ms: 0,
            name: format!("w{i:03}"),
            capabilities: Capabilities {
                native: vec![amd64.clone()],
                emulated: Vec::new(),
            },
            capacity,
            labels: BTreeMap::new(),
        })
        .collect();
    propose(&mut state, Command::Batch { commands: register });
    let plan = PlanSummary {
        build_platform: amd64.clone(),
        instances: (0..n)
            .map(|i| InstanceSummary {
                id: i,
                index: i,
                name: format!("s{i}"),
                platform: amd64.clone(),
                targets: vec![amd64.clone()],
                depends_on: dag.deps[i].clone(),
                steps: dag.steps[i],
                executes: true,
                cached: None,
            })
            .collect(),
        targets: vec![TargetRef {
            platform: amd64.clone(),
            instance: n - 1,
        }],
    };
    let submitted = propose(
        &mut state,
        Command::SubmitBuild {
            now_ms: 0,
            tenant: "sim".into(),
            request: Box::new(request()),
            plan,
            policy: Default::default(),
        },
    );
    let Response::Submitted { build, .. } = submitted else {
        panic!("the simulated build was refused: {submitted:?}");
    };

    let mut now = 0u64;
    let mut events: BinaryHeap<Reverse<Completion>> = BinaryHeap::new();
    let (mut rounds, mut local_parents, mut fetched_parents) = (0u64, 0u64, 0u64);
    loop {
        if let Some(cmd) = state.expire_round(now) {
            propose(&mut state, cmd);
        }
        if let Some(cmd) = state.schedule_round(TERM, now, LEASE_MS) {
            rounds += 1;
            let resp = propose(&mut state, cmd);
            for lease in granted(resp) {
                let Some(job) = state.job(lease.0) else {
                    continue;
                };
                let stage = job.instance;
                let mut fetch_ms = 0;
                let mut fetched = Vec::new();
                for &d in &dag.deps[stage] {
                    let key = stage_key(d);
                    let local = state
                        .cache_entry(&key)
                        .is_some_and(|e| e.holders.contains(&lease.2));
                    if local {
                        local_parents += 1;
                    } else {
                        fetched_parents += 1;
                        fetch_ms += dag.size[d].div_ceil(FETCH_BYTES_PER_MS);
                        fetched.push(key);
                    }
                }
                events.push(Reverse(Completion {
                    at: now + fetch_ms + dag.duration[stage],
                    job: lease.0.0,
                    token: lease.1,
                    worker: lease.2,
                    fetched,
                }));
            }
        }
        if state.build(build).is_some_and(|b| b.status.is_finished()) {
            break;
        }
        let Some(Reverse(first)) = events.pop() else {
            panic!("the simulation is stuck at {now} ms: nothing running, build unfinished");
        };
        now = first.at;
        let mut batch = vec![first];
        while events.peek().is_some_and(|Reverse(c)| c.at == now) {
            if let Some(Reverse(c)) = events.pop() {
                batch.push(c);
            }
        }
        let mut commands = Vec::new();
        let mut cache = Vec::new();
        for c in batch {
            let stage = state.job(super::JobId(c.job)).map_or(0, |j| j.instance);
            commands.push(Command::CompleteJob {
                now_ms: now,
                job: super::JobId(c.job),
                token: c.token,
                result: stage_result(stage, dag.size[stage], &amd64),
            });
            cache.extend(c.fetched.into_iter().map(|key| CacheRecord {
                key,
                layers: Vec::new(),
                worker: Some(c.worker.clone()),
            }));
        }
        if !cache.is_empty() {
            commands.push(Command::RecordCache {
                now_ms: now,
                entries: cache,
                dropped: Vec::new(),
            });
        }
        propose(&mut state, Command::Batch { commands });
    }
    let status = state.build(build).map(|b| b.status.clone());
    assert_eq!(
        status,
        Some(BuildStatus::Succeeded),
        "the simulated build did not succeed"
    );
    let makespan = state
        .build(build)
        .and_then(|b| b.finished_at_ms)
        .unwrap_or(now);
    let report = SimReport {
        stages: n,
        workers: capacities.len(),
        slots,
        makespan,
        critical_path,
        total_work,
        lower_bound,
        rounds,
        entries: log.len() as u64,
        local_parents,
        fetched_parents,
    };
    Run { report, state, log }
}

/// The leases a (possibly batched) response granted: job, token, worker.
fn granted(resp: Response) -> Vec<(super::JobId, LeaseToken, String)> {
    match resp {
        Response::Leases { granted, .. } => granted
            .into_iter()
            .map(|g| (g.job, g.token, g.worker))
            .collect(),
        Response::Batch { responses } => responses.into_iter().flat_map(granted).collect(),
        _ => Vec::new(),
    }
}
