//! `strata worker --config FILE [--coordinator ADDR[,ADDR...]]`: runs a build worker that
//! registers with a cluster's leader and takes the stage jobs it offers, until interrupted
//! (Ctrl-C or SIGTERM). Logs go to standard error: `STRATA_LOG` (a tracing filter) chooses what;
//! without it, the worker logs at `info`, since a daemon that says nothing cannot be run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use strata_worker::agent;
use strata_worker::config::WorkerConfig;

/// How long a stopping worker waits for the blocking work of its cancelled jobs.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The configuration file (see deploy/worker.toml).
    #[arg(long)]
    config: PathBuf,
    /// Coordinator addresses, comma-separated (any of them; followers point to the leader).
    /// Replaces the configuration's `coordinators`.
    #[arg(long, value_delimiter = ',')]
    coordinator: Vec<SocketAddr>,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let mut config = WorkerConfig::load(&args.config)?;
    if !args.coordinator.is_empty() {
        config.coordinators = args.coordinator;
    }
    // `main` installed a subscriber when STRATA_LOG is set; otherwise this one takes over.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("strata-worker")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(agent::run_until(config, async {
        strata_shared::signal::stop_requested().await;
    }));
    // A step still running in a blocking thread (a container) is not waited for long.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result.with_context(|| format!("worker configured by {}", args.config.display()))
}
