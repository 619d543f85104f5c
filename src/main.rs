//! `strata`: the command-line program of the strata build cluster.
//!
//! `main` only parses the command line, runs the chosen command and prints the whole error
//! chain when it fails; each command lives in its own module.

mod build;
mod cluster;
mod embedded;
mod local;
mod plan;
mod progress;
mod worker_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A distributed container-image build cluster.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Build an image from a Dockerfile and a context (embedded coordinator and worker).
    Build(Box<build::BuildArgs>),
    /// Print the stages a build would run, per platform, pruned to the target.
    Plan(plan::PlanArgs),
    /// Run a coordinator of a cluster (`--config FILE`), or `init` a development cluster.
    Coordinator(cluster::CoordinatorArgs),
    /// Show the coordinators, the leader, the workers and the build queue of a cluster.
    Status(cluster::StatusArgs),
    /// Cancel a build running on a cluster: its jobs stop on their workers.
    Cancel(cluster::CancelArgs),
    /// Run a build worker that takes jobs from a cluster's coordinators.
    Worker(worker_cmd::WorkerArgs),
}

fn main() -> ExitCode {
    // `STRATA_LOG=debug` (any tracing filter) shows what the engine does and how long it takes.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Build(args) => build::run(*args),
        Commands::Plan(args) => plan::run(args),
        Commands::Coordinator(args) => cluster::coordinator(args),
        Commands::Status(args) => cluster::status(args),
        Commands::Cancel(args) => cluster::cancel(args),
        Commands::Worker(args) => worker_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
