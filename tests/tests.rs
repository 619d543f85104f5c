//! Integration tests of the `strata` program, compiled into one test binary.

mod build_cli;
mod build_multi;
mod buildkit_cases;
mod cluster;
mod fixture;
mod plan_cli;
