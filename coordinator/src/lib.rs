//! `strata-coordinator`: the coordinator of a strata cluster.
//!
//! It takes build requests, turns each Dockerfile into stage jobs with the frontend in
//! `strata-shared`, drives the jobs on workers ([`build`]), and assembles and exports the final
//! images ([`export`]).

pub mod build;
pub mod config;
pub mod export;
pub mod init;
pub mod placement;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod state;

pub use strata_shared as shared;
