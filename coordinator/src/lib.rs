//! `strata-coordinator`: the Raft-replicated coordinator of a strata cluster.
//!
//! It takes build requests, turns each Dockerfile into stage jobs with the frontend in
//! `strata-shared`, schedules the jobs on workers, and assembles the final images.

pub use strata_shared as shared;
