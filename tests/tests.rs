//! Integration tests of the `strata` program, compiled into one test binary.

mod build_cli;
mod buildkit_cases;
mod build_multi;
mod cluster;
mod fixture;
mod plan_cli;
