//! `strata-worker`: the build engine. It runs the stage jobs of a build: pulls base images,
//! assembles root filesystems from layers, runs steps in containers through an OCI runtime,
//! turns each step's changes into a layer, and stores layers in the content-addressed store.
pub mod agent;
pub mod config;
pub mod context;
pub mod copy;
pub mod engine;
pub mod executor;
pub mod hashcache;
pub mod jobs;
pub mod layer;
pub mod local;
pub mod metadata;
pub use strata_shared::registry;
pub mod platforms;
pub mod rootfs;
pub mod snapshot;
