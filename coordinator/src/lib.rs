//! `strata-coordinator`: the coordinator of a strata cluster.
//!
//! It takes build requests, turns each Dockerfile into stage jobs with the frontend in
//! `strata-shared`, commits them through Raft ([`raft`], [`state`]), leases them to workers
//! ([`scheduler`], [`placement`], [`server`]), and assembles and exports the final images
//! ([`export`]). A build with no cluster configured runs on the same path in one process
//! ([`server::LocalCluster`]).

pub mod config;
pub mod export;
pub mod init;
pub mod placement;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod state;

pub use strata_shared as shared;
