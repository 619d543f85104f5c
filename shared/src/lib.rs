//! `strata-shared`: what the coordinator, the worker and the command-line program all need.
//!
//! - [`dockerfile`]: the Dockerfile frontend (directives, parser, shell-word expansion, typed
//!   instructions, stages and build arguments), matching BuildKit's reading of a Dockerfile.
//! - [`dag`]: the stage graph built with petgraph, pruned to the target and instantiated once
//!   per requested platform.
//! - [`platform`]: OCI platforms (`linux/arm64/v8`), parsing and normalisation.
//! - [`reference`]: image references, normalised as Docker does.

pub mod dag;
pub mod dockerfile;
pub mod platform;
pub mod reference;
