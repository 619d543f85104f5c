//! `strata-shared`: what the coordinator, the worker and the command-line program all need.
//!
//! - [`dockerfile`]: the Dockerfile frontend (directives, parser, shell-word expansion, typed
//!   instructions, stages and build arguments), matching BuildKit's reading of a Dockerfile.
//! - [`dag`]: the stage graph built with petgraph, pruned to the target and instantiated once
//!   per requested platform.
//! - [`platform`]: OCI platforms (`linux/arm64/v8`), parsing and normalisation.
//! - [`reference`]: image references, normalised as Docker does.
//! - [`registry`]: the OCI distribution API client (pull, auth).
//! - [`oci`]: OCI descriptors, manifests, indexes and image configs.
//! - [`cachekey`]: build-step cache keys (BuildKit's semantics, blake3).
//! - [`job`]: stage jobs, their outputs and errors.
//! - [`progress`]: build progress events.
//! - [`store`]: the content-addressed blob store (blake3 keys) on `object_store`.
//! - [`tls`]: the cluster's PKI (CA, node identities with their role) and the QUIC/TLS configs.
//! - [`wire`]: the messages between nodes, as rkyv archives in versioned frames on quinn streams.

pub mod cachekey;
pub mod config;
pub mod dag;
pub mod dockerfile;
pub mod job;
pub mod oci;
pub mod platform;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod signal;
pub mod store;
pub mod tls;
pub mod wire;
