//! `strata-coordinator`: the coordinator of a strata cluster.
//!
//! It takes build requests, turns each Dockerfile into stage jobs with the frontend in
//! `strata-shared`, drives the jobs on workers ([`build`]), and assembles and exports the final
//! images ([`export`]).

pub mod build;
pub mod export;
pub mod placement;

pub use strata_shared as shared;
