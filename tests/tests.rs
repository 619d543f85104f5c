//! Integration tests of the `strata` program, compiled into one test binary.

mod build_cli;
mod plan_cli;
