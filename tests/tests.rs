//! Integration tests of the `strata` program, compiled into one test binary.

mod plan_cli;
