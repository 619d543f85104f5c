//! Changing the coordinators' group at run time, on the leader.
//!
//! Adding: the new node's name and address go into the replicated state first (every node
//! learns where to reach it, and keeps knowing after a snapshot), then it joins as a learner,
//! receives a snapshot and the log, and only once it has caught up becomes a voter, so the
//! quorum never waits on a node that is still copying. Removing: the id is retired in the
//! replicated state (never reused), then the Raft configuration change; a removed leader hands
//! leadership over and the removed process stops.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use strata_shared::wire::{
    CoordinatorToClient, ErrorCode, ErrorReply, MembershipReply, MembershipRequest,
};

use super::Shared;
use super::clients::{bad_request, propose_error};
use crate::raft::MembershipChange;
use crate::state;

/// How long a coordinator being added has to catch up with the log.
const CATCH_UP: Duration = Duration::from_secs(30);

/// Serves a [`MembershipRequest`]: the group once the change is committed, or why not.
pub(super) async fn change(shared: &Shared, request: MembershipRequest) -> CoordinatorToClient {
    if !shared.is_leader() {
        return CoordinatorToClient::NotLeader(shared.not_leader());
    }
    let done = match request {
        MembershipRequest::Add { id, name, addr } => add(shared, id, name, &addr).await,
        MembershipRequest::Remove { id } => remove(shared, id).await,
    };
    match done {
        Ok(message) => {
            let view = shared.node.view();
            CoordinatorToClient::Membership(MembershipReply {
                voters: view.voters,
                learners: view.learners,
                message,
            })
        }
        Err(reply) => reply,
    }
}

fn error(code: ErrorCode, message: String) -> CoordinatorToClient {
    CoordinatorToClient::Error(ErrorReply { code, message })
}

/// Commits `cmd`; a refusal by the state machine is the client's error.
async fn commit(shared: &Shared, cmd: &state::Command) -> Result<(), CoordinatorToClient> {
    let response = shared
        .submit(cmd)
        .await
        .map_err(|e| propose_error(shared, e))?;
    match response.rejection() {
        Some(reason) => Err(bad_request(reason.to_string())),
        None => Ok(()),
    }
}

async fn add(
    shared: &Shared,
    id: u64,
    name: String,
    addr: &str,
) -> Result<String, CoordinatorToClient> {
    let addr: SocketAddr = addr.parse().map_err(|_| {
        bad_request(format!(
            "coordinator {id}: {addr:?} is not an ip:port address"
        ))
    })?;
    let view = shared.node.view();
    if view.voters.contains(&id) {
        return Ok(format!("coordinator {id} is already a voter"));
    }
    let clash = view
        .voters
        .iter()
        .chain(&view.learners)
        .filter(|m| **m != id)
        .find(|m| shared.node.peer(**m).is_some_and(|p| p.name == name));
    if let Some(other) = clash {
        return Err(bad_request(format!(
            "coordinator {id}: the name {name:?} belongs to coordinator {other}"
        )));
    }
    commit(
        shared,
        &state::Command::SetCoordinator {
            id,
            name: name.clone(),
            addr: addr.to_string(),
        },
    )
    .await?;
    if !view.learners.contains(&id) {
        shared
            .node
            .change_membership(MembershipChange::AddLearner(id))
            .await
            .map_err(|e| propose_error(shared, e))?;
        tracing::info!(node = id, %name, %addr, "coordinator added as a learner");
    }
    // Caught up: it holds everything committed when it became a learner (a snapshot and the
    // log after it). From there it keeps up like any follower.
    let target = shared.node.view().commit_index;
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let matched = shared.node.inspect(move |n| n.matched(id)).await.flatten();
        match matched {
            None => return Err(CoordinatorToClient::NotLeader(shared.not_leader())),
            Some(m) if m >= target => break,
            Some(m) if Instant::now() >= deadline => {
                return Err(error(
                    ErrorCode::Unavailable,
                    format!(
                        "coordinator {id} ({name} at {addr}) is a learner but has replicated \
                         only up to log index {m} of {target} after {}s: is it running with \
                         join = true and reachable? Ask again to resume",
                        CATCH_UP.as_secs()
                    ),
                ));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    shared
        .node
        .change_membership(MembershipChange::AddVoter(id))
        .await
        .map_err(|e| propose_error(shared, e))?;
    tracing::info!(node = id, %name, %addr, "coordinator promoted to voter");
    let voters = shared.node.view().voters.len();
    Ok(format!(
        "coordinator {id} ({name} at {addr}) added as a voter; {}",
        tolerance(voters)
    ))
}

async fn remove(shared: &Shared, id: u64) -> Result<String, CoordinatorToClient> {
    let view = shared.node.view();
    if !view.voters.contains(&id) && !view.learners.contains(&id) {
        return Err(error(
            ErrorCode::NotFound,
            format!(
                "coordinator {id} is not a member (voters {:?}, learners {:?})",
                view.voters, view.learners
            ),
        ));
    }
    if view.voters == [id] {
        return Err(bad_request(format!(
            "coordinator {id} is the only voter: a cluster cannot remove its last coordinator"
        )));
    }
    let (name, addr) = shared.node.peer(id).map_or_else(
        || (String::new(), String::new()),
        |p| (p.name, p.addr.to_string()),
    );
    commit(
        shared,
        &state::Command::RetireCoordinator {
            id,
            name: name.clone(),
            addr,
        },
    )
    .await?;
    shared
        .node
        .change_membership(MembershipChange::Remove(id))
        .await
        .map_err(|e| propose_error(shared, e))?;
    tracing::info!(node = id, %name, "coordinator removed");
    let voters = view.voters.iter().filter(|v| **v != id).count();
    Ok(format!(
        "coordinator {id} ({name}) removed; {}",
        tolerance(voters)
    ))
}

/// How many coordinators a group of `voters` can lose and still commit.
fn tolerance(voters: usize) -> String {
    let failures = voters.saturating_sub(1) / 2;
    let mut text = format!("{voters} voters, tolerating {failures} failed");
    if voters > 0 && voters.is_multiple_of(2) {
        text.push_str(&format!(
            " (no more than {} voters would: add or remove one more)",
            voters - 1
        ));
    }
    text
}
