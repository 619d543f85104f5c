//! The coordinator cluster as separate processes on loopback: three `strata coordinator`
//! processes elect a leader over QUIC with mutual TLS, survive the loss of the leader, take a
//! restarted node back, and come back from a full restart with their committed log.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::process_running;

const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// Three coordinators' files and processes (and room for a fourth that joins later); every
/// process is killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    /// `ip:port` of c1..c4.
    addrs: Vec<String>,
    children: Vec<Option<Child>>,
}

/// Four consecutive free UDP ports on 127.0.0.1: three coordinators and one that joins.
fn free_ports() -> Vec<u16> {
    for _ in 0..200 {
        let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port();
        drop(probe);
        if base > 65000 {
            continue;
        }
        let held: Vec<_> = (0..4)
            .filter_map(|i| UdpSocket::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == 4 {
            return (0..4).map(|i| base + i).collect();
        }
    }
    panic!("no four consecutive free UDP ports on 127.0.0.1");
}

impl Cluster {
    fn init() -> Cluster {
        let addrs = free_ports()
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        Cluster::init_at(addrs)
    }

    /// Coordinators on `addrs` (the first three; the fourth is for one that joins).
    fn init_at(addrs: Vec<String>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(STRATA)
            .args(["coordinator", "init", "--out"])
            .arg(dir.path())
            .args(["--addrs", &addrs[..3].join(",")])
            .output()
            .expect("strata coordinator init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir,
            addrs,
            children: vec![None, None, None, None],
        }
    }

    fn config(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("coordinator-c{}.toml", i + 1))
    }

    fn start(&mut self, i: usize) {
        let log =
            std::fs::File::create(self.dir.path().join(format!("c{}.log", i + 1))).expect("log");
        let child = Command::new(STRATA)
            .args(["coordinator", "--config"])
            .arg(self.config(i))
            .env("STRATA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a coordinator");
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pki/client-tokens"))
            .expect("token")
            .trim()
            .to_string()
    }

    /// `strata status` against node `i` (stdout), or its error.
    fn status(&self, i: usize) -> Result<String, String> {
        let out = Command::new(STRATA)
            .args(["status", "--coordinator", &self.addrs[i]])
            .arg("--ca")
            .arg(self.dir.path().join("pki/ca.crt"))
            .args(["--token", &self.token()])
            .output()
            .expect("strata status");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits (at most 30 s) until node `i` names a leader; returns its name (`c2`).
    fn leader_seen_by(&self, i: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = self.status(i)
                && let Some(rest) = text.lines().next().and_then(|l| l.split("leader: ").nth(1))
                && let Some(name) = rest.split('=').next().filter(|n| n.starts_with('c'))
            {
                return name.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "node c{} saw no leader in 30s:\n{}",
                i + 1,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The commit index node `i` reports for itself.
    fn commit_index(&self, i: usize) -> u64 {
        let text = self.status(i).unwrap_or_default();
        text.lines()
            .find_map(|l| l.split(" commit ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        ["c1", "c2", "c3", "c4", "w1", "w2"]
            .iter()
            .map(|i| {
                let p = self.dir.path().join(format!("{i}.log"));
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {i}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

fn index_of(name: &str) -> usize {
    name.trim_start_matches('c')
        .parse::<usize>()
        .expect("node name")
        - 1
}

fn path_exists(p: &Path) -> bool {
    p.exists()
}

#[test]
fn three_coordinators_elect_fail_over_and_restart() {
    let mut cluster = Cluster::init();
    assert!(path_exists(&cluster.config(2)));
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.leader_seen_by(0);
    for i in 0..3 {
        assert_eq!(
            cluster.leader_seen_by(i),
            leader,
            "all nodes agree on the leader"
        );
    }

    // The leader knows how far each follower has replicated.
    let seen = cluster.status(index_of(&leader)).unwrap_or_default();
    let followers = seen
        .lines()
        .filter(|l| l.contains(" Follower  replicated "))
        .count();
    assert_eq!(followers, 2, "{seen}");

    // The leader dies: the two others elect a new one.
    let old = index_of(&leader);
    cluster.kill(old);
    let survivor = (old + 1) % 3;
    let deadline = Instant::now() + Duration::from_secs(30);
    let new_leader = loop {
        let seen = cluster.leader_seen_by(survivor);
        if seen != leader {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(new_leader, leader);

    // The old leader comes back as a follower of the new one and catches up.
    cluster.start(old);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.leader_seen_by(old) != new_leader {
        assert!(
            Instant::now() < deadline,
            "the restarted node did not rejoin:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let committed = cluster.commit_index(index_of(&new_leader));
    assert!(committed >= 2, "elections commit entries: {committed}");

    // A full restart keeps every committed entry.
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.leader_seen_by(0);
    let after = cluster.commit_index(index_of(&leader));
    assert!(
        after > committed,
        "the log survives a full restart ({after} > {committed})"
    );

    // A client with a wrong token is refused, and the refusal is logged.
    let out = Command::new(STRATA)
        .args(["status", "--coordinator", &cluster.addrs[0]])
        .arg("--ca")
        .arg(cluster.dir.path().join("pki/ca.crt"))
        .args(["--token", "not-the-token"])
        .output()
        .expect("strata status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid token"));
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(cluster.dir.path().join("c1.log")).unwrap_or_default();
    assert!(log.contains("refused connection"), "{log}");
}

/// The cluster with workers: `strata worker` processes started from the files `init` wrote.
impl Cluster {
    fn start_worker(&mut self, name: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        Command::new(STRATA)
            .args(["worker", "--config"])
            .arg(self.dir.path().join(format!("worker-{name}.toml")))
            .env("STRATA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a worker")
    }

    /// Waits (at most 30 s) until the cluster lists `n` workers.
    fn wait_for_workers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..3 {
                if let Ok(text) = self.status(i)
                    && text.lines().any(|l| l == format!("workers: {n}"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{n} workers did not register:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `strata build` against the cluster; returns (success, stderr).
    fn build(&self, context: &Path, extra: &[&str]) -> (bool, String) {
        let coordinators: Vec<String> = self.addrs[..3].to_vec();
        let state = self.dir.path().join("client-state");
        let out = Command::new(STRATA)
            .arg("build")
            .arg(context)
            .args(["--coordinator", &coordinators.join(",")])
            .arg("--ca")
            .arg(self.dir.path().join("pki/ca.crt"))
            .args(["--token", &self.token()])
            .arg("--store")
            .arg(self.dir.path().join("store"))
            .args(["--progress", "rawjson"])
            .args(extra)
            .env("STRATA_STATE_DIR", &state)
            .output()
            .expect("strata build");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The worker each stage ran on, from the build's `runs on worker` notes.
fn placements(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["text"].as_str().map(str::to_string))
        .filter_map(|t| {
            let rest = t.strip_prefix("stage ")?;
            let (stage, worker) = rest.split_once(" runs on worker ")?;
            Some((stage.split(' ').next()?.to_string(), worker.to_string()))
        })
        .collect()
}

#[test]
fn a_build_spreads_its_independent_stages_over_two_workers() {
    let registry = strata_testkit::busybox_registry();
    let mut cluster = Cluster::init();
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.leader_seen_by(0);
    let mut w1 = cluster.start_worker("w1");
    let mut w2 = cluster.start_worker("w2");
    cluster.wait_for_workers(2);
    // The leader, which they heartbeat, says when it last heard from each.
    let seen = cluster.status(cluster.leader_index()).unwrap_or_default();
    assert_eq!(seen.matches("s ago").count(), 2, "{seen}");

    let ctx = tempfile::tempdir().expect("tempdir");
    let busybox = format!("{}/library/busybox:latest", registry.addr());
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {busybox} AS left\nRUN sleep 1 && echo left > /l\n\
             FROM {busybox} AS right\nRUN sleep 1 && echo right > /r\n\
             FROM {busybox} AS unused\nRUN echo never\n\
             FROM {busybox}\nCOPY --from=left /l /l\nCOPY --from=right /r /r\nCOPY hello.txt /hello.txt\n"
        ),
    )
    .expect("Dockerfile");
    std::fs::write(ctx.path().join("hello.txt"), "from the client's context\n")
        .expect("context file");
    let out = cluster.dir.path().join("out");
    let name = format!("{}/team/spread:1", registry.addr());
    let (ok, log) = cluster.build(
        ctx.path(),
        &[
            "--output",
            &format!("type=local,dest={}", out.display()),
            "--output",
            &format!("type=image,name={name},push=true"),
        ],
    );
    let _ = (w1.kill(), w2.kill(), w1.wait(), w2.wait());
    assert!(ok, "{log}\n{}", cluster.logs());
    // Pushed as in embedded mode: the registry serves it with its layers.
    assert!(log.contains(&format!("pushed {name}@sha256:")), "{log}");
    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{name}")])
        .output()
        .expect("skopeo");
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success() && text.contains("\"Layers\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("l")).unwrap_or_default(),
        "left\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("r")).unwrap_or_default(),
        "right\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("hello.txt")).unwrap_or_default(),
        "from the client's context\n"
    );
    let placed = placements(&log);
    let worker_of = |stage: &str| {
        placed
            .iter()
            .find(|(s, _)| s == stage)
            .map(|(_, w)| w.clone())
    };
    assert!(
        placed.iter().all(|(s, _)| s != "unused"),
        "pruned stages never run: {placed:?}"
    );
    let (left, right) = (worker_of("left"), worker_of("right"));
    assert!(left.is_some() && right.is_some(), "{placed:?}\n{log}");
    assert_ne!(
        left, right,
        "independent stages ran on different workers: {placed:?}"
    );
}

/// Failure tests use short leases: a silent worker loses its job after 6 s (more than a dead
/// connection takes to be noticed, 4 s).
impl Cluster {
    fn fast_leases(&self) {
        for i in 0..3 {
            let path = self.config(i);
            let mut text = std::fs::read_to_string(&path).expect("config");
            text.push_str("\n[scheduler]\nlease_ms = 6000\nheartbeat_ms = 300\n");
            std::fs::write(&path, text).expect("config");
        }
        for w in ["w1", "w2"] {
            let path = self.dir.path().join(format!("worker-{w}.toml"));
            let text = std::fs::read_to_string(&path).expect("config");
            std::fs::write(
                &path,
                text.replace("\n[tls]", "heartbeat_ms = 300\n\n[tls]"),
            )
            .expect("config");
        }
    }

    /// The log of a node or worker, without colours.
    fn log_of(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Job ids a worker took offers for, in order.
    fn jobs_taken(&self, worker: &str) -> Vec<u64> {
        self.log_of(worker)
            .lines()
            .filter(|l| l.contains("offer taken"))
            .filter_map(|l| l.split("job=").nth(1)?.split(' ').next()?.parse().ok())
            .collect()
    }

    /// Waits (at most `secs`) for `cond`.
    fn wait_until(&self, what: &str, secs: u64, mut cond: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen in {secs}s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `strata build` in the background; its stderr is collected.
    fn spawn_build(
        &self,
        context: &Path,
        out: &Path,
    ) -> (Child, std::sync::Arc<std::sync::Mutex<String>>) {
        use std::io::BufRead;
        let coordinators: Vec<String> = self.addrs[..3].to_vec();
        let mut child = Command::new(STRATA)
            .arg("build")
            .arg(context)
            .args(["--coordinator", &coordinators.join(",")])
            .arg("--ca")
            .arg(self.dir.path().join("pki/ca.crt"))
            .args(["--token", &self.token()])
            .arg("--store")
            .arg(self.dir.path().join("store"))
            .args(["--progress", "rawjson", "--output"])
            .arg(format!("type=local,dest={}", out.display()))
            .env("STRATA_STATE_DIR", self.dir.path().join("client-state"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("strata build");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        (child, log)
    }

    /// Waits for the slow stage (the build's second job) to start; the index of its worker.
    fn worker_of_slow_stage(&self) -> usize {
        let mut worker = None;
        self.wait_until("the slow stage starting", 60, |c| {
            let (a, b) = (c.jobs_taken("w1"), c.jobs_taken("w2"));
            let slow = a
                .iter()
                .chain(&b)
                .max()
                .copied()
                .filter(|_| a.len() + b.len() >= 2);
            worker = slow.map(|s| if a.contains(&s) { 0 } else { 1 });
            worker.is_some()
        });
        worker.unwrap_or(0)
    }

    fn leader_index(&self) -> usize {
        let alive: Vec<usize> = (0..3).filter(|i| self.children[*i].is_some()).collect();
        index_of(&self.leader_seen_by(alive[0]))
    }
}

/// Job ids taken by the workers: none twice.
fn assert_no_job_ran_twice(taken: &[u64]) {
    let mut unique = taken.to_vec();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), taken.len(), "no job ran twice: {taken:?}");
}

/// Waits for a background build; its success and log.
fn finish_build(
    mut child: Child,
    log: &std::sync::Arc<std::sync::Mutex<String>>,
    secs: u64,
) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(200));
            let text = log.lock().map(|s| s.clone()).unwrap_or_default();
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let text = log.lock().map(|s| s.clone()).unwrap_or_default();
            return (
                false,
                format!("the build did not finish in {secs}s\n{text}"),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A context whose `slow` stage runs long enough for things to go wrong while it runs.
fn slow_context(registry: &strata_testkit::Registry, seconds: u32) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().expect("tempdir");
    let busybox = format!("{}/library/busybox:latest", registry.addr());
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {busybox} AS quick\nRUN echo quick > /q\n\
             FROM {busybox} AS slow\nCOPY --from=quick /q /q\nRUN sleep {seconds} && echo slow > /s\n\
             FROM {busybox}\nCOPY --from=slow /s /s\nCOPY --from=quick /q /q\n"
        ),
    )
    .expect("Dockerfile");
    ctx
}

fn started_cluster(workers: &[&str]) -> (Cluster, Vec<Child>) {
    let mut cluster = Cluster::init();
    cluster.fast_leases();
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.leader_seen_by(0);
    let children = workers.iter().map(|w| cluster.start_worker(w)).collect();
    cluster.wait_for_workers(workers.len());
    (cluster, children)
}

fn stop(children: Vec<Child>) {
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn the_leader_killed_mid_build_is_replaced_and_no_finished_stage_runs_again() {
    let registry = strata_testkit::busybox_registry();
    let (mut cluster, workers) = started_cluster(&["w1", "w2"]);
    let ctx = slow_context(&registry, 4);
    let out = cluster.dir.path().join("out");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    // Once the slow stage runs, the leader dies.
    cluster.wait_until("the slow stage starting", 60, |c| {
        c.jobs_taken("w1").len() + c.jobs_taken("w2").len() >= 2
    });
    let leader = cluster.leader_index();
    cluster.kill(leader);
    let (ok, text) = finish_build(child, &log, 120);
    let taken: Vec<u64> = [cluster.jobs_taken("w1"), cluster.jobs_taken("w2")].concat();
    stop(workers);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert_eq!(
        std::fs::read_to_string(out.join("s")).unwrap_or_default(),
        "slow\n"
    );
    assert_no_job_ran_twice(&taken);
    assert_eq!(taken.len(), 3, "three stages: {taken:?}");
}

#[test]
fn a_worker_killed_mid_stage_loses_its_lease_and_the_stage_runs_elsewhere() {
    let registry = strata_testkit::busybox_registry();
    let (cluster, mut workers) = started_cluster(&["w1", "w2"]);
    let ctx = slow_context(&registry, 3);
    let out = cluster.dir.path().join("out");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    // The worker that takes the slow stage (its second job overall) dies.
    let victim = cluster.worker_of_slow_stage();
    let _ = workers[victim].kill();
    let _ = workers[victim].wait();
    let (ok, text) = finish_build(child, &log, 120);
    let survivor = ["w1", "w2"][1 - victim];
    let taken_by_survivor = cluster.jobs_taken(survivor);
    stop(workers);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert_eq!(
        std::fs::read_to_string(out.join("s")).unwrap_or_default(),
        "slow\n"
    );
    let slow_job = [cluster.jobs_taken("w1"), cluster.jobs_taken("w2")]
        .concat()
        .into_iter()
        .max();
    assert!(
        slow_job.is_some_and(|j| taken_by_survivor.contains(&j)),
        "the slow stage ran again on {survivor}: {taken_by_survivor:?}"
    );
}

#[test]
fn a_worker_back_after_its_lease_expired_has_its_result_refused() {
    let registry = strata_testkit::busybox_registry();
    let (cluster, workers) = started_cluster(&["w1", "w2"]);
    let ctx = slow_context(&registry, 2);
    let out = cluster.dir.path().join("out");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    // Freeze the worker past its lease: the stage runs elsewhere; then let it go on.
    let frozen = cluster.worker_of_slow_stage();
    let pid = workers[frozen].id().to_string();
    let signal = |sig: &str| {
        let _ = Command::new("kill").args([sig, &pid]).status();
    };
    signal("-STOP");
    let (ok, text) = finish_build(child, &log, 120);
    signal("-CONT");
    let name = ["w1", "w2"][frozen];
    cluster.wait_until("the late result being refused", 60, |c| {
        c.log_of(name).contains("the leader refused the result")
    });
    stop(workers);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert_eq!(
        std::fs::read_to_string(out.join("s")).unwrap_or_default(),
        "slow\n"
    );
}

#[test]
fn without_a_quorum_clients_get_a_clear_error_and_a_full_restart_resumes_the_queue() {
    let registry = strata_testkit::busybox_registry();
    let (mut cluster, workers) = started_cluster(&["w1"]);
    // Two of three coordinators gone: no quorum.
    let leader = cluster.leader_index();
    cluster.kill(leader);
    cluster.kill((leader + 1) % 3);
    let ctx = slow_context(&registry, 1);
    let (ok, text) = cluster.build(ctx.path(), &[]);
    assert!(!ok);
    assert!(text.contains("no quorum"), "{text}");

    // A build in flight survives a full restart of the coordinators.
    for i in 0..3 {
        if cluster.children[i].is_none() {
            cluster.start(i);
        }
    }
    cluster.leader_seen_by(0);
    let ctx = slow_context(&registry, 3);
    let out = cluster.dir.path().join("out");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    cluster.wait_until("the build starting", 60, |c| !c.jobs_taken("w1").is_empty());
    for i in 0..3 {
        cluster.kill(i);
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        cluster.start(i);
    }
    let (ok, text) = finish_build(child, &log, 120);
    stop(workers);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert_eq!(
        std::fs::read_to_string(out.join("s")).unwrap_or_default(),
        "slow\n"
    );
}

/// A network partition on loopback: every packet from or to one address is dropped (an
/// iptables chain of its own in INPUT, which loopback traffic crosses in both directions) until
/// the value is dropped.
struct Partition {
    chain: String,
}

fn iptables(args: &[&str]) -> bool {
    Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Partition {
    fn cut(ip: &str) -> Partition {
        let chain = format!("STRATA-CUT-{}", std::process::id());
        let ok = iptables(&["-N", &chain])
            && iptables(&["-A", &chain, "-s", ip, "-j", "DROP"])
            && iptables(&["-A", &chain, "-d", ip, "-j", "DROP"])
            && iptables(&["-I", "INPUT", "-j", &chain]);
        let partition = Partition { chain };
        assert!(
            ok,
            "iptables could not cut {ip} off (run as root with iptables installed)"
        );
        partition
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        iptables(&["-D", "INPUT", "-j", &self.chain]);
        iptables(&["-F", &self.chain]);
        iptables(&["-X", &self.chain]);
    }
}

/// Three loopback addresses of their own (127.a.b.11-13, a and b from the process id) and a
/// fourth on 127.0.0.1, all on one free port.
fn own_loopback_addresses() -> Vec<String> {
    let pid = std::process::id();
    let net = format!("127.{}.{}", 100 + pid % 100, 1 + (pid / 100) % 250);
    for _ in 0..200 {
        let probe = UdpSocket::bind(format!("{net}.11:0")).expect("bind a loopback address");
        let port = probe.local_addr().expect("addr").port();
        drop(probe);
        let addrs: Vec<String> = [11, 12, 13]
            .iter()
            .map(|h| format!("{net}.{h}:{port}"))
            .chain([format!("127.0.0.1:{port}")])
            .collect();
        let held: Vec<_> = addrs
            .iter()
            .filter_map(|a| UdpSocket::bind(a).ok())
            .collect();
        if held.len() == addrs.len() {
            return addrs;
        }
    }
    panic!("no free port on {net}.11-13");
}

#[test]
fn a_partitioned_leader_steps_down_and_no_job_completes_twice() {
    let registry = strata_testkit::busybox_registry();
    let mut cluster = Cluster::init_at(own_loopback_addresses());
    cluster.fast_leases();
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.leader_seen_by(0);
    let workers = vec![cluster.start_worker("w1"), cluster.start_worker("w2")];
    cluster.wait_for_workers(2);
    let ctx = slow_context(&registry, 3);
    let out = cluster.dir.path().join("out");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    cluster.wait_until("the slow stage starting", 60, |c| {
        c.jobs_taken("w1").len() + c.jobs_taken("w2").len() >= 2
    });
    // Cut the leader off the network: it still runs, but hears no one and no one hears it.
    let leader = cluster.leader_index();
    let ip = cluster.addrs[leader]
        .rsplit_once(':')
        .map(|(ip, _)| ip.to_string())
        .unwrap_or_default();
    let partition = Partition::cut(&ip);
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let old = format!("c{}", leader + 1);
    cluster.wait_until("a new leader on the majority side", 30, |c| {
        let seen = c.leader_seen_by(others[0]);
        seen != old
    });
    // Without a quorum the old leader steps down by itself (check-quorum).
    cluster.wait_until("the cut-off leader stepping down", 30, |c| {
        c.log_of(&old)
            .lines()
            .any(|l| l.contains("raft role changed") && l.contains("from=\"leader\""))
    });
    // The build finishes on the majority side while the old leader is still cut off.
    let (ok, text) = finish_build(child, &log, 120);
    drop(partition);
    let new_leader = cluster.leader_seen_by(others[0]);
    cluster.wait_until("the old leader following", 30, |c| {
        c.leader_seen_by(leader) == new_leader
    });
    let taken: Vec<u64> = [cluster.jobs_taken("w1"), cluster.jobs_taken("w2")].concat();
    let delivered = ["w1", "w2"]
        .iter()
        .map(|w| cluster.log_of(w).matches("result delivered").count())
        .sum::<usize>();
    stop(workers);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert_eq!(
        std::fs::read_to_string(out.join("s")).unwrap_or_default(),
        "slow\n"
    );
    assert_no_job_ran_twice(&taken);
    assert_eq!(delivered, 3, "each of the three jobs completed once");
}

/// Membership changes from the command line.
impl Cluster {
    /// `strata coordinator <args>` as a client of every running node; (success, stdout+stderr).
    fn coordinator_cmd(&self, args: &[&str], certificate: bool) -> (bool, String) {
        let coordinators: Vec<String> = self
            .addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| self.children[*i].is_some())
            .map(|(_, a)| a.clone())
            .collect();
        let pki = self.dir.path().join("pki");
        let mut cmd = Command::new(STRATA);
        cmd.arg("coordinator")
            .args(args)
            .args(["--coordinator", &coordinators.join(",")])
            .arg("--ca")
            .arg(pki.join("ca.crt"));
        if certificate {
            cmd.arg("--cert")
                .arg(pki.join("client-client1.crt"))
                .arg("--key")
                .arg(pki.join("client-client1.key"));
        } else {
            cmd.args(["--token", &self.token()]);
        }
        let out = cmd.output().expect("strata coordinator");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Waits (at most 30 s) for coordinator `i` to stop by itself, cleanly.
    fn wait_stopped(&mut self, i: usize) {
        let mut child = self.children[i].take().expect("the coordinator runs");
        let name = format!("c{}", i + 1);
        let status = self.wait_exit(&mut child, &name, 30);
        assert!(status.success(), "{name} stops cleanly: {status}");
    }

    /// Waits (at most `secs`) for the process `name` runs as to exit by itself; killed, with
    /// the logs, when it does not.
    fn wait_exit(&self, child: &mut Child, name: &str, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name} did not stop in {secs}s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The coordinators `strata status` lists when asked at node `i`: (id, state) pairs.
    fn members_seen_by(&self, i: usize) -> Vec<(u64, String)> {
        let text = self.status(i).unwrap_or_default();
        text.lines()
            .skip_while(|l| *l != "coordinators:")
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.first()?.parse().ok()?, f.get(3)?.to_string()))
            })
            .collect()
    }
}

#[test]
fn coordinators_are_added_and_removed_through_raft() {
    let mut cluster = Cluster::init();
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.leader_seen_by(0);

    // A fourth coordinator: a certificate from the cluster CA and a joining configuration.
    let c4_addr = cluster.addrs[3].clone();
    let out = Command::new(STRATA)
        .args(["coordinator", "init-join", "--out"])
        .arg(cluster.dir.path())
        .args(["--listen", &c4_addr])
        .output()
        .expect("strata coordinator init-join");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.contains("coordinator 4 (c4)"),
        "{printed}"
    );
    cluster.start(3);

    // A token only builds; membership needs a client certificate.
    let add = ["add", "--id", "4", "--name", "c4", "--addr", &c4_addr];
    let (ok, text) = cluster.coordinator_cmd(&add, false);
    assert!(!ok && text.contains("need a client certificate"), "{text}");

    // Added: a learner that catches up, then a voter every node counts.
    let (ok, text) = cluster.coordinator_cmd(&add, true);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert!(
        text.contains("added as a voter; 4 voters, tolerating 1 failed")
            && text.contains("voters: [1, 2, 3, 4]"),
        "{text}"
    );
    cluster.wait_until("c4 following the leader", 30, |c| {
        c.leader_seen_by(3) == leader && c.members_seen_by(3).len() == 4
    });
    let ids: Vec<u64> = cluster
        .members_seen_by(0)
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);

    // A worker configured with one coordinator only, a follower about to be removed: it
    // learns the members when it registers.
    let old = index_of(&leader);
    let follower = (old + 1) % 3;
    let w1 = cluster.dir.path().join("worker-w1.toml");
    let text = std::fs::read_to_string(&w1).expect("worker config");
    let listed: String = text
        .lines()
        .map(|l| {
            if l.starts_with("coordinators = ") {
                format!("coordinators = [\"{}\"]", cluster.addrs[follower])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&w1, listed).expect("worker config");
    let mut worker = cluster.start_worker("w1");
    cluster.wait_for_workers(1);

    // The follower removed: the leader stops writing to it before it could apply its own
    // removal, so the members tell it, and it stops.
    let (ok, text) =
        cluster.coordinator_cmd(&["remove", "--id", &(follower + 1).to_string()], true);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert!(text.contains("3 voters, tolerating 1 failed"), "{text}");
    cluster.wait_stopped(follower);
    assert!(
        cluster
            .log_of(&format!("c{}", follower + 1))
            .contains("a member reports that this coordinator was removed"),
        "{}",
        cluster.logs()
    );

    // The leader removed: it hands leadership over and its process stops by itself.
    let id = (old + 1).to_string();
    let (ok, text) = cluster.coordinator_cmd(&["remove", "--id", &id], true);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert!(text.contains("2 voters, tolerating 0 failed"), "{text}");
    cluster.wait_stopped(old);
    assert!(
        cluster
            .log_of(&leader)
            .contains("removed from the cluster; stopping")
    );

    // The two left elect a leader between themselves and list only themselves.
    let survivor = 3;
    cluster.wait_until("a new leader between the two left", 30, |c| {
        c.leader_seen_by(survivor) != leader
    });
    let mut left: Vec<u64> = (1..=4)
        .filter(|n| *n != old as u64 + 1 && *n != follower as u64 + 1)
        .collect();
    left.sort_unstable();
    cluster.wait_until("the group of two", 30, |c| {
        c.members_seen_by(survivor)
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>()
            == left
    });

    // The worker followed the old leader's redirect. Cut off long enough to lose that
    // connection too (frozen past the 4 s idle timeout), it finds the leader again among the
    // members it learnt: the one coordinator it was configured with is gone.
    let registered = |c: &Cluster| c.log_of("w1").matches("registered with the leader").count();
    cluster.wait_until("the worker registered with the new leader", 30, |c| {
        registered(c) >= 2
    });
    let before = registered(&cluster);
    let pid = worker.id().to_string();
    let _ = Command::new("kill").args(["-STOP", &pid]).status();
    std::thread::sleep(Duration::from_secs(6));
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    cluster.wait_until("the worker registered from the learnt members", 30, |c| {
        registered(c) > before
    });
    let _ = (worker.kill(), worker.wait());

    // A removed id is never used again.
    let old_addr = cluster.addrs[old].clone();
    let again = ["add", "--id", &id, "--name", &leader, "--addr", &old_addr];
    let (ok, text) = cluster.coordinator_cmd(&again, true);
    assert!(!ok && text.contains("ids are never reused"), "{text}");

    // The added node restarts from its own store and the two elect a leader again.
    cluster.kill(3);
    cluster.start(3);
    cluster.wait_until("c4 back after a restart", 30, |c| {
        c.status(3)
            .is_ok_and(|t| t.lines().next().is_some_and(|l| l.contains("leader: c")))
    });
    assert_eq!(
        cluster
            .members_seen_by(3)
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        left
    );
}

#[test]
fn a_cancelled_build_stops_its_containers_on_the_workers() {
    let registry = strata_testkit::busybox_registry();
    let mut cluster = Cluster::init();
    cluster.fast_leases();
    // Finished builds are forgotten 3 s after they end.
    for i in 0..3 {
        let path = cluster.config(i);
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, format!("{text}retain_finished_ms = 3000\n")).expect("config");
    }
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.leader_seen_by(0);
    let workers = vec![cluster.start_worker("w1")];
    cluster.wait_for_workers(1);
    let ctx = tempfile::tempdir().expect("tempdir");
    let busybox = format!("{}/library/busybox:latest", registry.addr());
    let out = cluster.dir.path().join("out");

    // An interrupted client cancels its build: the container stops on the worker.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {busybox}\nRUN sleep 297\n"),
    )
    .expect("Dockerfile");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    cluster.wait_until("the long step running", 60, |_| {
        process_running("sleep 297")
    });
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let (ok, text) = finish_build(child, &log, 30);
    assert!(!ok, "{text}");
    assert!(text.contains("cancelled (interrupted)"), "{text}");
    cluster.wait_until("the container stopping", 15, |_| {
        !process_running("sleep 297")
    });
    cluster.wait_until("the worker dropping the job", 15, |c| {
        c.log_of("w1").contains("job cancelled")
    });

    // `strata cancel` does the same for a build started elsewhere.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {busybox}\nRUN sleep 296\n"),
    )
    .expect("Dockerfile");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    cluster.wait_until("the second long step running", 60, |_| {
        process_running("sleep 296")
    });
    let text = log.lock().map(|s| s.clone()).unwrap_or_default();
    let build = text
        .split("build ")
        .filter_map(|r| r.split(' ').next()?.parse::<u64>().ok())
        .last()
        .expect("the build's id in its progress");
    let cancel = |id: &str| {
        Command::new(STRATA)
            .args(["cancel", id, "--coordinator", &cluster.addrs[..3].join(",")])
            .arg("--ca")
            .arg(cluster.dir.path().join("pki/ca.crt"))
            .args(["--token", &cluster.token()])
            .output()
            .expect("strata cancel")
    };
    let done = cancel(&build.to_string());
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let (ok, text) = finish_build(child, &log, 30);
    assert!(!ok && text.contains("cancelled"), "{text}");
    cluster.wait_until("the second container stopping", 15, |_| {
        !process_running("sleep 296")
    });
    // Once its retention is over, the finished build is forgotten.
    let again = cancel(&build.to_string());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && said.contains("is already cancelled"),
        "{said}"
    );
    cluster.wait_until("the cancelled build being forgotten", 30, |_| {
        String::from_utf8_lossy(&cancel(&build.to_string()).stderr)
            .contains(&format!("unknown build {build}"))
    });
    // A build that fails stops its other running stages the same way.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {busybox} AS long\nRUN sleep 295\n\
             FROM {busybox} AS broken\nRUN sleep 4 && exit 3\n\
             FROM {busybox}\nCOPY --from=long /etc/hostname /a\nCOPY --from=broken /etc/hostname /b\n"
        ),
    )
    .expect("Dockerfile");
    let (child, failing) = cluster.spawn_build(ctx.path(), &out);
    cluster.wait_until("the long stage running beside the broken one", 60, |_| {
        process_running("sleep 295")
    });
    let (ok, text) = finish_build(child, &failing, 60);
    assert!(!ok && text.contains("exit code 3"), "{text}");
    cluster.wait_until(
        "the long stage stopping after its sibling failed",
        15,
        |_| !process_running("sleep 295"),
    );

    let unknown = cancel("999999");
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && said.contains("unknown build 999999"),
        "{said}"
    );
    stop(workers);
}

#[test]
fn a_worker_told_to_stop_finishes_its_stage_then_leaves() {
    let registry = strata_testkit::busybox_registry();
    let (cluster, mut workers) = started_cluster(&["w1", "w2"]);
    let ctx = slow_context(&registry, 4);
    let out = cluster.dir.path().join("out");
    let (child, log) = cluster.spawn_build(ctx.path(), &out);
    // SIGTERM (what Kubernetes sends on scale-down) to the worker running the slow stage.
    let busy = cluster.worker_of_slow_stage();
    let name = ["w1", "w2"][busy];
    let _ = Command::new("kill")
        .args(["-TERM", &workers[busy].id().to_string()])
        .status();
    // While its stage finishes, the cluster lists it as draining.
    let leader = cluster.leader_index();
    cluster.wait_until("the worker listed as draining", 10, |c| {
        c.status(leader)
            .is_ok_and(|t| t.contains(&format!("{name} (draining)")))
    });
    let (ok, text) = finish_build(child, &log, 120);
    let mut leaving = workers.remove(busy);
    let status = cluster.wait_exit(&mut leaving, name, 40);
    let taken: Vec<u64> = [cluster.jobs_taken("w1"), cluster.jobs_taken("w2")].concat();
    stop(workers);
    assert!(ok, "{text}\n{}", cluster.logs());
    assert!(status.success(), "{name} leaves cleanly: {status}");
    assert!(
        cluster
            .log_of(name)
            .contains("drained: every running job finished"),
        "{}",
        cluster.log_of(name)
    );
    // Its stage finished where it started: nothing ran twice.
    assert_no_job_ran_twice(&taken);
    // The leader heard it drain, then go.
    let leader_logs: String = (1..=3).map(|i| cluster.log_of(&format!("c{i}"))).collect();
    for mode in ["mode=drain", "mode=gone"] {
        assert!(
            leader_logs
                .lines()
                .any(|l| l.contains("worker leaving") && l.contains(mode)),
            "{mode}:\n{}",
            cluster.logs()
        );
    }
}

#[test]
fn a_leader_told_to_stop_hands_leadership_over_first() {
    let mut cluster = Cluster::init();
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.leader_seen_by(0);
    let old = index_of(&leader);
    let pid = cluster.children[old]
        .as_ref()
        .map(|c| c.id().to_string())
        .unwrap_or_default();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    cluster.wait_stopped(old);
    assert!(
        cluster
            .log_of(&leader)
            .contains("stopping: leadership handed over"),
        "{}",
        cluster.logs()
    );
    let survivor = (old + 1) % 3;
    cluster.wait_until("the successor leading", 10, |c| {
        c.leader_seen_by(survivor) != leader
    });
}

#[test]
fn a_coordinator_that_never_catches_up_stays_a_learner_and_can_be_removed() {
    let mut cluster = Cluster::init();
    for i in 0..3 {
        cluster.start(i);
    }
    cluster.leader_seen_by(0);
    let c4_addr = cluster.addrs[3].clone();
    let out = Command::new(STRATA)
        .args(["coordinator", "init-join", "--out"])
        .arg(cluster.dir.path())
        .args(["--listen", &c4_addr])
        .output()
        .expect("strata coordinator init-join");
    assert!(out.status.success());
    // c4 is never started: it cannot catch up, the add says so, and the quorum is untouched.
    let add = ["add", "--id", "4", "--name", "c4", "--addr", &c4_addr];
    let (ok, text) = cluster.coordinator_cmd(&add, true);
    assert!(!ok, "{text}");
    assert!(
        text.contains("coordinator 4 (c4 at") && text.contains("is a learner but has replicated"),
        "{text}"
    );
    let members = cluster.members_seen_by(0);
    assert!(
        members
            .iter()
            .any(|(id, state)| *id == 4 && state == "Learner"),
        "{members:?}"
    );
    let voters: Vec<u64> = members
        .iter()
        .filter(|(_, s)| s != "Learner")
        .map(|m| m.0)
        .collect();
    assert_eq!(voters, [1, 2, 3]);
    // A learner that will never come is removed like any member.
    let (ok, text) = cluster.coordinator_cmd(&["remove", "--id", "4"], true);
    assert!(
        ok && text.contains("3 voters, tolerating 1 failed"),
        "{text}"
    );
    cluster.wait_until("the group of three again", 10, |c| {
        c.members_seen_by(0).iter().map(|m| m.0).collect::<Vec<_>>() == [1, 2, 3]
    });
}
