//! `strata-worker`: runs the stage jobs of a strata build in containers and stores their
//! layers.

pub use strata_shared as shared;
