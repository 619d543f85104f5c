//! The coordinator cluster as separate processes on loopback: three `strata coordinator`
//! processes elect a leader over QUIC with mutual TLS, survive the loss of the leader, take a
//! restarted node back, and come back from a full restart with their committed log.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// Three coordinators' files and processes; every process is killed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

/// Three consecutive free UDP ports on 127.0.0.1.
fn free_ports() -> Vec<u16> {
    for _ in 0..200 {
        let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port();
        drop(probe);
        if base > 65000 {
            continue;
        }
        let held: Vec<_> = (0..3)
            .filter_map(|i| UdpSocket::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == 3 {
            return (0..3).map(|i| base + i).collect();
        }
    }
    panic!("no three consecutive free UDP ports on 127.0.0.1");
}

impl Cluster {
    fn init() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = free_ports();
        let out = Command::new(STRATA)
            .args(["coordinator", "init", "--out"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{}", ports[0])])
            .output()
            .expect("strata coordinator init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir,
            ports,
            children: vec![None, None, None],
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
            .args([
                "status",
                "--coordinator",
                &format!("127.0.0.1:{}", self.ports[i]),
            ])
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
        (1..=3)
            .map(|i| {
                let p = self.dir.path().join(format!("c{i}.log"));
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- c{i}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
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
        .args([
            "status",
            "--coordinator",
            &format!("127.0.0.1:{}", cluster.ports[0]),
        ])
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
