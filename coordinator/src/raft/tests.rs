//! Scenario tests of the Raft core on the simulated network ([`super::sim`]). Every test is
//! deterministic (fixed per-node election timeouts, ordered delivery) and bounded in ticks.
//! Section numbers refer to the Raft paper (Ongaro and Ousterhout, 2014) or thesis.

use std::collections::BTreeSet;
use std::path::Path;

use raft::Storage as _;
use redb::ReadableDatabase;

use super::node::{ProposalError, ProposalId, ProposalResponse};
use super::sim::{Cluster, RecordingMachine};
use super::storage::{DB_FILE, ENTRIES, META, RedbStorage, StoreOptions};
use super::{MembershipChange, RaftConfig, RaftError, RaftNode};

/// Generous bound for an election (timeouts are 10 to 14 ticks).
const ELECTION: u64 = 60;
/// Bound for replication / catch-up after a change.
const CATCH_UP: u64 = 100;

fn config() -> RaftConfig {
    RaftConfig::default()
}

fn cluster(dir: &Path, voters: u64, config: RaftConfig) -> Cluster<RecordingMachine> {
    Cluster::recording(dir, voters, config).expect("cluster bootstraps")
}

/// Proposes `data` on the current leader and runs until its outcome is known.
fn commit(c: &mut Cluster<RecordingMachine>, data: &str) -> ProposalResponse {
    let leader = c.wait_for_leader(ELECTION).expect("a leader");
    let id = c.propose(leader, data).expect("leader accepts");
    c.run_until(|c| c.response(leader, id).is_some(), CATCH_UP)
        .unwrap_or_else(|e| panic!("{data:?} not resolved: {e}; {c:?}"));
    let response = c.response(leader, id).unwrap().clone();
    assert!(response.result.is_ok(), "{data:?}: {response:?}");
    response
}

/// Runs until every running node applied `expected` (in order).
fn wait_values(c: &mut Cluster<RecordingMachine>, expected: &[String]) {
    c.run_until(
        |c| c.live().iter().all(|&id| c.values(id) == expected),
        CATCH_UP,
    )
    .unwrap_or_else(|e| {
        let got: Vec<_> = c.live().iter().map(|&id| (id, c.values(id))).collect();
        panic!("values did not converge: {e}; expected {expected:?}, got {got:?}")
    });
}

/// §5.3 Log Matching / State Machine Safety, checked on the running nodes: same applied
/// commands everywhere, each applied once, in order; and for every index two stores both hold,
/// the same term.
fn assert_consistent(c: &Cluster<RecordingMachine>) {
    let live = c.live();
    let first = c.node(live[0]).state_machine();
    for &id in &live {
        let sm = c.node(id).state_machine();
        assert!(
            sm.violations().is_empty(),
            "node {id}: {:?}",
            sm.violations()
        );
        assert_eq!(
            sm.applied(),
            first.applied(),
            "node {id} diverges from {}",
            live[0]
        );
        let distinct: BTreeSet<_> = sm.applied().iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(
            distinct.len(),
            sm.applied().len(),
            "node {id} applied a command twice"
        );
    }
    for (i, &a) in live.iter().enumerate() {
        for &b in &live[i + 1..] {
            let (sa, sb) = (c.node(a).storage(), c.node(b).storage());
            let lo = sa.first_index().unwrap().max(sb.first_index().unwrap());
            let hi = c.node(a).commit_index().min(c.node(b).commit_index());
            for index in lo..=hi {
                assert_eq!(
                    sa.term(index).unwrap(),
                    sb.term(index).unwrap(),
                    "nodes {a} and {b} disagree on the term of committed index {index}"
                );
            }
        }
    }
}

/// Node `id`'s voters, sorted (raft-rs builds the list from a hash set).
fn voters(c: &Cluster<RecordingMachine>, id: u64) -> Vec<u64> {
    let mut voters = c.node(id).conf_state().voters;
    voters.sort_unstable();
    voters
}

fn strings(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn single_node_elects_itself_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 1, config());
    assert_eq!(c.wait_for_leader(ELECTION).unwrap(), 1);
    let response = commit(&mut c, "hello");
    // Index 1 is the bootstrap snapshot, 2 the leader's no-op (§5.4.2), 3 the command.
    assert_eq!(response.index, 3);
    assert_eq!(response.result, Ok(b"3".to_vec()));
    assert_eq!(c.values(1), vec!["hello"]);
    assert_eq!(c.node(1).applied_index(), 3);
}

#[test]
fn three_and_five_nodes_elect_a_leader_and_replicate() {
    for voters in [3, 5] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path(), voters, config());
        let leader = c.wait_for_leader(ELECTION).unwrap();
        for id in c.ids() {
            assert_eq!(
                c.node(id).leader_id(),
                Some(leader),
                "node {id} knows the leader"
            );
        }
        // Followers refuse proposals and name the leader.
        let follower = c.ids().into_iter().find(|&id| id != leader).unwrap();
        match c.propose(follower, "x") {
            Err(RaftError::NotLeader { leader_id }) => assert_eq!(leader_id, Some(leader)),
            other => panic!("follower accepted a proposal: {other:?}"),
        }
        let values = strings("cmd", 20);
        let ids: Vec<ProposalId> = values
            .iter()
            .map(|v| c.propose(leader, v.as_str()).unwrap())
            .collect();
        wait_values(&mut c, &values);
        c.run_until(
            |c| ids.iter().all(|p| c.response(leader, *p).is_some()),
            CATCH_UP,
        )
        .unwrap();
        let mut last = 0;
        for p in &ids {
            let r = c.response(leader, *p).unwrap();
            assert!(r.index > last, "responses in log order");
            last = r.index;
            assert_eq!(r.result, Ok(r.index.to_string().into_bytes()));
        }
        assert_consistent(&c);
    }
}

#[test]
fn partitioned_leader_is_replaced_cannot_commit_and_catches_up_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 5, config());
    let old = c.wait_for_leader(ELECTION).unwrap();
    let mut expected = strings("before", 3);
    for v in &expected {
        commit(&mut c, v);
    }
    let old_term = c.node(old).term();

    c.isolate(old);
    // The old leader still believes it leads and accepts a proposal it can never commit.
    let lost = c.propose(old, "lost").expect("old leader still accepts");
    // §5.2: the majority elects a new leader in a higher term.
    c.run_until(|c| c.leader().is_some_and(|l| l != old), ELECTION)
        .unwrap();
    let new = c.leader().unwrap();
    assert!(c.node(new).term() > old_term);
    for v in strings("after", 3) {
        commit(&mut c, &v);
        expected.push(v);
    }
    // Check-quorum: the isolated leader steps down on its own.
    c.run_until(|c| !c.node(old).is_leader(), ELECTION).unwrap();
    for id in c.ids() {
        assert!(
            !c.values(id).contains(&"lost".to_string()),
            "node {id} applied the isolated leader's entry"
        );
    }
    assert!(c.response(old, lost).is_none(), "unresolved while isolated");

    c.heal();
    c.run_until(
        |c| {
            c.node(old).leader_id() == Some(new)
                && c.node(old).applied_index() == c.node(new).applied_index()
        },
        CATCH_UP,
    )
    .unwrap();
    wait_values(&mut c, &expected);
    // §5.3: the old leader's uncommitted entry was overwritten; its proposer learns so.
    let response = c.response(old, lost).expect("resolved after healing");
    assert!(
        matches!(response.result, Err(ProposalError::Dropped { .. })),
        "{response:?}"
    );
    assert!(!c.node(old).is_leader());
    assert_consistent(&c);
}

#[test]
fn restarted_follower_catches_up_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 3, config());
    let leader = c.wait_for_leader(ELECTION).unwrap();
    let follower = c.ids().into_iter().find(|&id| id != leader).unwrap();
    let mut expected = strings("a", 5);
    for v in &expected {
        commit(&mut c, v);
    }
    c.crash(follower);
    for v in strings("b", 10) {
        commit(&mut c, &v);
        expected.push(v);
    }
    c.restart(follower).unwrap();
    wait_values(&mut c, &expected);
    assert_eq!(c.node(follower).stats().snapshots_applied, 0);
    assert_eq!(c.node(leader).stats().snapshots_sent, 0);
    assert_consistent(&c);
}

#[test]
fn restarted_follower_behind_a_compacted_log_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let config = RaftConfig {
        snapshot_threshold: 5,
        retain_entries: 0,
        ..config()
    };
    let mut c = cluster(dir.path(), 3, config);
    let leader = c.wait_for_leader(ELECTION).unwrap();
    let follower = c.ids().into_iter().find(|&id| id != leader).unwrap();
    let mut expected = strings("a", 3);
    for v in &expected {
        commit(&mut c, v);
    }
    c.crash(follower);
    for v in strings("b", 20) {
        commit(&mut c, &v);
        expected.push(v);
    }
    assert!(c.node(leader).stats().snapshots_created >= 1);
    let follower_last = 1 + 1 + 3; // bootstrap snapshot, no-op, three commands
    assert!(
        c.node(leader).storage().first_index().unwrap() > follower_last + 1,
        "the leader compacted the entries the follower lacks"
    );
    c.restart(follower).unwrap();
    wait_values(&mut c, &expected);
    assert!(
        c.node(leader).stats().snapshots_sent >= 1,
        "leader sent a snapshot"
    );
    assert!(c.net_stats().snapshots_delivered >= 1);
    assert!(
        c.node(follower).stats().snapshots_applied >= 1,
        "follower installed it"
    );
    assert!(
        c.node(follower).state_machine().restores() >= 2,
        "open + received"
    );
    // And the cluster keeps going with the follower in it.
    for v in strings("c", 3) {
        commit(&mut c, &v);
        expected.push(v);
    }
    wait_values(&mut c, &expected);
    assert_consistent(&c);
}

#[test]
fn full_cluster_restart_keeps_every_committed_entry() {
    let dir = tempfile::tempdir().unwrap();
    // Small threshold with retained entries: recovery goes through a snapshot, retained
    // entries below it and replayed entries above it.
    let config = RaftConfig {
        snapshot_threshold: 4,
        retain_entries: 2,
        ..config()
    };
    let mut c = cluster(dir.path(), 3, config);
    let mut expected = strings("a", 10);
    for v in &expected {
        commit(&mut c, v);
    }
    wait_values(&mut c, &expected);
    let term = c.node(c.leader().unwrap()).term();
    for id in c.ids() {
        c.crash(id);
    }
    for id in c.ids() {
        c.restart(id).unwrap();
        assert!(
            c.node(id).storage().snapshot_metadata().index > 1,
            "node {id} snapshotted"
        );
    }
    let leader = c.wait_for_leader(ELECTION).unwrap();
    assert!(c.node(leader).term() > term);
    wait_values(&mut c, &expected);
    for v in strings("b", 3) {
        commit(&mut c, &v);
        expected.push(v);
    }
    wait_values(&mut c, &expected);
    assert_consistent(&c);
}

#[test]
fn membership_add_a_fourth_node_then_remove_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 3, config());
    let leader = c.wait_for_leader(ELECTION).unwrap();
    let mut expected = strings("a", 3);
    for v in &expected {
        commit(&mut c, v);
    }

    // §6 (thesis 4.1): one server at a time, through the log. The new node starts empty and
    // is brought up to date with a snapshot (which carries the configuration) then the log.
    c.add_node(4).unwrap();
    let add = c
        .propose_conf_change(leader, MembershipChange::AddVoter(4))
        .unwrap();
    assert!(matches!(
        c.propose_conf_change(leader, MembershipChange::AddVoter(5)),
        Err(RaftError::ConfChangeInProgress)
    ));
    c.run_until(|c| c.response(leader, add).is_some(), CATCH_UP)
        .unwrap();
    assert_eq!(c.response(leader, add).unwrap().result, Ok(Vec::new()));
    wait_values(&mut c, &expected);
    assert!(
        c.node(4).stats().snapshots_applied >= 1,
        "joined from a snapshot"
    );
    c.run_until(
        |c| c.ids().iter().all(|&id| voters(c, id) == [1, 2, 3, 4]),
        CATCH_UP,
    )
    .unwrap();
    let v = "b".to_string();
    commit(&mut c, &v);
    expected.push(v);
    wait_values(&mut c, &expected);

    // Four voters: a quorum is three, so with two down nothing commits.
    let leader = c.leader().unwrap();
    let down: Vec<u64> = [4]
        .into_iter()
        .chain(c.ids().into_iter().find(|&id| id != leader && id != 4))
        .collect();
    for &id in &down {
        c.crash(id);
    }
    let stalled = c.propose(leader, "stalled").unwrap();
    c.run_ticks(30);
    assert!(
        c.response(leader, stalled).is_none(),
        "no quorum, no commit"
    );
    for id in c.live() {
        assert!(!c.values(id).contains(&"stalled".to_string()));
    }
    for &id in &down {
        c.restart(id).unwrap();
    }
    let leader = c.wait_for_leader(ELECTION).unwrap();
    let v = "c".to_string();
    commit(&mut c, &v);
    c.run_until(
        |c| {
            let reference = c.values(leader);
            reference.contains(&v) && c.live().iter().all(|&id| c.values(id) == reference)
        },
        CATCH_UP,
    )
    .unwrap();
    // "stalled" may or may not have committed after the restart; either way everywhere alike.
    expected = c.values(leader);

    // Remove node 4: back to three voters, a quorum of two.
    let leader = c.leader().unwrap();
    let remove = c
        .propose_conf_change(leader, MembershipChange::Remove(4))
        .unwrap();
    c.run_until(|c| c.response(leader, remove).is_some(), CATCH_UP)
        .unwrap();
    assert_eq!(c.response(leader, remove).unwrap().result, Ok(Vec::new()));
    c.run_until(
        |c| [1, 2, 3].iter().all(|&id| voters(c, id) == [1, 2, 3]),
        CATCH_UP,
    )
    .unwrap();
    // The removed node and one more down: two of three remain, which is a quorum now.
    let other = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    c.crash(4);
    c.crash(other);
    let v = "after-remove".to_string();
    commit(&mut c, &v);
    expected.push(v);
    wait_values(&mut c, &expected);
    assert_consistent(&c);
}

#[test]
fn removing_the_leader_hands_over_leadership() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path(), 3, config());
    let old = c.wait_for_leader(ELECTION).unwrap();
    let mut expected = strings("a", 2);
    for v in &expected {
        commit(&mut c, v);
    }
    let remove = c
        .propose_conf_change(old, MembershipChange::Remove(old))
        .unwrap();
    c.run_until(|c| c.response(old, remove).is_some(), CATCH_UP)
        .unwrap();
    assert!(c.node(old).is_removed());
    c.run_until(|c| c.leader().is_some_and(|l| l != old), ELECTION)
        .unwrap_or_else(|e| panic!("{e}: {c:?}"));
    let remaining: Vec<u64> = c.ids().into_iter().filter(|&id| id != old).collect();
    c.crash(old);
    for &id in &remaining {
        assert!(!c.node(id).conf_state().voters.contains(&old));
    }
    let v = "after".to_string();
    commit(&mut c, &v);
    expected.push(v);
    wait_values(&mut c, &expected);
    assert_consistent(&c);
}

#[test]
fn the_same_actions_give_the_same_run() {
    /// (id, term, commit, last index, applied values) per node; ticks; network counters.
    type Outcome = (
        Vec<(u64, u64, u64, u64, Vec<String>)>,
        u64,
        super::sim::NetStats,
    );
    fn run(dir: &Path) -> Outcome {
        let mut c = cluster(dir, 3, config());
        let leader = c.wait_for_leader(ELECTION).unwrap();
        for v in strings("a", 5) {
            commit(&mut c, &v);
        }
        c.isolate(leader);
        let _ = c.propose(leader, "lost");
        c.run_until(|c| c.leader().is_some_and(|l| l != leader), ELECTION)
            .unwrap();
        for v in strings("b", 5) {
            commit(&mut c, &v);
        }
        c.heal();
        c.run_ticks(20);
        let nodes = c
            .ids()
            .into_iter()
            .map(|id| {
                let n = c.node(id);
                (id, n.term(), n.commit_index(), n.last_index(), c.values(id))
            })
            .collect();
        (nodes, c.ticks(), c.net_stats())
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(run(a.path()), run(b.path()));
}

#[test]
fn entries_are_in_redb_when_handle_ready_returns() {
    let dir = tempfile::tempdir().unwrap();
    let config = RaftConfig {
        shared_readers: true,
        ..config()
    };
    let mut node =
        RaftNode::open(1, dir.path(), &[1], RecordingMachine::default(), config).unwrap();
    node.campaign().unwrap();
    node.handle_ready().unwrap();
    assert!(node.is_leader());
    let proposal = node.propose(b"durable".to_vec()).unwrap();
    node.handle_ready().unwrap();
    let response = node.take_responses();
    assert_eq!(response.len(), 1);
    assert_eq!(response[0].id, proposal);
    let index = response[0].index;

    // Read the file through a second, read-only handle while the node keeps it open.
    let mut builder = redb::Builder::new();
    builder.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    let db = builder
        .open_read_only(dir.path().join(DB_FILE))
        .expect("read-only open beside the writer");
    let txn = db.begin_read().unwrap();
    let entries = txn.open_table(ENTRIES).unwrap();
    let stored = entries.get(index).unwrap().expect("entry stored");
    let entry =
        <raft::eraftpb::Entry as protobuf::Message>::parse_from_bytes(stored.value()).unwrap();
    assert_eq!(&entry.data[..], b"durable");
    assert_eq!(entry.term, node.term());
    let meta = txn.open_table(META).unwrap();
    let hs = meta.get("hard_state").unwrap().expect("hard state stored");
    let hs = <raft::eraftpb::HardState as protobuf::Message>::parse_from_bytes(hs.value()).unwrap();
    assert_eq!(hs.term, node.term());
    assert_eq!(hs.vote, 1);
}

#[test]
fn a_crash_image_taken_after_handle_ready_recovers_the_entries() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let mut node = RaftNode::open(1, &live, &[1], RecordingMachine::default(), config()).unwrap();
    node.campaign().unwrap();
    node.handle_ready().unwrap();
    for i in 0..5 {
        node.propose(format!("v{i}").into_bytes()).unwrap();
        node.handle_ready().unwrap();
    }
    // Copy the file while the node still has it open: what a power cut would leave behind.
    let image = dir.path().join("image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::copy(live.join(DB_FILE), image.join(DB_FILE)).unwrap();
    let (store, _) = RedbStorage::open(&image, 1, StoreOptions::default()).expect("recovers");
    let first = store.first_index().unwrap();
    let last = store.last_index().unwrap();
    let data: Vec<String> = store
        .entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
        .unwrap()
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect();
    assert_eq!(data, ["v0", "v1", "v2", "v3", "v4"]);
    drop(store);
    // And a node reopened on the image rebuilds the same state.
    drop(node);
    let mut node = RaftNode::open(1, &image, &[], RecordingMachine::default(), config()).unwrap();
    // The first Ready replays the entries up to the stored commit index, before any election.
    node.handle_ready().unwrap();
    let replayed = node.state_machine().values();
    assert!(replayed.len() >= 4, "replayed {replayed:?}");
    assert_eq!(
        replayed[..],
        ["v0", "v1", "v2", "v3", "v4"][..replayed.len()]
    );
    node.campaign().unwrap();
    node.handle_ready().unwrap();
    assert_eq!(
        node.state_machine().values(),
        ["v0", "v1", "v2", "v3", "v4"]
    );
}

#[test]
fn a_node_can_move_to_its_own_task() {
    fn assert_send<T: Send>() {}
    assert_send::<RaftNode<RecordingMachine>>();
}

#[test]
fn a_node_of_another_id_or_a_bad_bootstrap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(
        RaftNode::open(
            1,
            dir.path(),
            &[1, 2, 3],
            RecordingMachine::default(),
            config(),
        )
        .unwrap(),
    );
    assert!(matches!(
        RaftNode::open(2, dir.path(), &[], RecordingMachine::default(), config()),
        Err(RaftError::Store(super::StoreError::WrongNode { .. }))
    ));
    let other = tempfile::tempdir().unwrap();
    assert!(matches!(
        RaftNode::open(
            4,
            other.path(),
            &[1, 2, 3],
            RecordingMachine::default(),
            config()
        ),
        Err(RaftError::Config(_))
    ));
}
