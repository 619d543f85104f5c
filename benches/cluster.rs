//! Cluster benchmarks that need no network: Raft commit latency and throughput of a 3-node
//! group persisting to disk (the real `RaftNode` and redb storage, messages passed in memory),
//! and the scheduler simulation: a 1,000-stage DAG over 100 workers, its makespan against the
//! lower bound max(critical path, total work / capacity).
//!
//! `cargo bench --bench cluster` (set `STRATA_BENCH_DIR` to choose the disk, default /var/tmp).

use std::time::{Duration, Instant};

use strata_coordinator::raft::RaftConfig;
use strata_coordinator::raft::sim::Cluster;
use strata_coordinator::state::simulation::simulate;

fn main() {
    raft_commits();
    for seed in 1..=3 {
        let report = simulate(1_000, 100, seed);
        println!("scheduler, 1,000 stages over 100 workers (seed {seed}): {report}");
    }
}

fn raft_commits() {
    let base = std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".to_string());
    let dir = match tempfile::tempdir_in(&base) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a directory in {base}: {e}");
            return;
        }
    };
    let mut c = match Cluster::recording(dir.path(), 3, RaftConfig::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("raft cluster: {e}");
            return;
        }
    };
    let Ok(leader) = c.wait_for_leader(1_000) else {
        eprintln!("no leader elected");
        return;
    };
    let n = 500;
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let Ok(id) = c.propose(leader, format!("job-update-{i}")) else {
            eprintln!("proposal refused");
            return;
        };
        c.settle();
        if c.response(leader, id).is_none() {
            eprintln!("proposal {i} did not commit within one round");
            return;
        }
        latencies.push(t.elapsed());
    }
    let sequential = start.elapsed();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let (batches, batch) = (40, 50);
    let start = Instant::now();
    for b in 0..batches {
        let ids: Vec<_> = (0..batch)
            .filter_map(|i| c.propose(leader, format!("batch-{b}-{i}")).ok())
            .collect();
        c.settle();
        if !ids.iter().all(|id| c.response(leader, *id).is_some()) {
            eprintln!("batch {b} did not commit within one round");
            return;
        }
    }
    let batched = start.elapsed();
    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "raft, 3 nodes persisting to {base}: {n} commits one at a time: p50 {:.2?}, p90 {:.2?}, p99 {:.2?} ({:.0} commits/s); \
         {batches} batches of {batch}: {:.0} commits/s",
        pct(50),
        pct(90),
        pct(99),
        rate(n, sequential),
        rate(batches * batch, batched),
    );
}
