//! The cluster commands: `strata coordinator` (run one, or `init` a development cluster's
//! files) and `strata status`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use strata_coordinator::config::CoordinatorConfig;
use strata_coordinator::init::{InitPlan, consecutive, init, init_join};
use strata_shared::job::{BuildRequest, StageOutput};
use strata_shared::platform::Platform;
use strata_shared::progress::{Event, Progress};
use strata_shared::store::BlobStore;
use strata_shared::tls::{self, Identity, Role};
use strata_shared::wire::{
    self, BuildOutcome, CancelBuild, ClientMsg, CoordinatorToClient, Hello, MembershipRequest,
    StatusReply, StatusRequest, SubmitBuild, WatchBuild,
};
use strata_worker::context::upload;
use strata_worker::copy::DockerIgnore;
use strata_worker::hashcache::HashCache;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorArgs {
    #[command(subcommand)]
    command: Option<CoordinatorCommand>,
    /// The configuration file (see deploy/coordinator.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CoordinatorCommand {
    /// Write a development cluster's certificates and configuration files.
    Init(InitArgs),
    /// Prepare one more coordinator for a development cluster written by `init`: a
    /// certificate and a configuration that joins the running cluster.
    InitJoin(InitJoinArgs),
    /// Add a coordinator (running with `join = true`) to the cluster: a learner until it has
    /// caught up, then a voter.
    Add(AddArgs),
    /// Remove a coordinator from the cluster; it stops, and its id is never used again.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
struct InitJoinArgs {
    /// The directory `init` wrote.
    #[arg(long)]
    out: PathBuf,
    /// The new coordinator's address.
    #[arg(long)]
    listen: SocketAddr,
}

#[derive(Debug, Args)]
struct AddArgs {
    /// The new coordinator's Raft id (unique, never used before).
    #[arg(long)]
    id: u64,
    /// The name in its certificate.
    #[arg(long)]
    name: String,
    /// Its QUIC address.
    #[arg(long)]
    addr: SocketAddr,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct RemoveArgs {
    /// The Raft id of the coordinator to remove.
    #[arg(long)]
    id: u64,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// The directory to write into.
    #[arg(long)]
    out: PathBuf,
    /// Coordinators (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Workers to issue certificates for.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Clients to issue certificates for (a token is written too).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// The first coordinator's address; the others take the next ports.
    #[arg(long, default_value = "127.0.0.1:7101", conflicts_with = "addrs")]
    listen: SocketAddr,
    /// Every coordinator's address instead, comma-separated (one host each, say); their
    /// number is the number of coordinators.
    #[arg(long, value_delimiter = ',', conflicts_with = "coordinators")]
    addrs: Vec<SocketAddr>,
}

/// How a client reaches the cluster.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Coordinator addresses, comma-separated (any of them; followers point to the leader).
    #[arg(
        long,
        value_delimiter = ',',
        env = "STRATA_COORDINATOR",
        required = true
    )]
    coordinator: Vec<SocketAddr>,
    /// The cluster CA certificate.
    #[arg(long, env = "STRATA_CA")]
    ca: PathBuf,
    /// A client token (instead of a certificate).
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A client certificate and its key (instead of a token).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The build's id (`strata status` lists the queue; `strata build` prints it).
    build: u64,
    #[command(flatten)]
    client: ClientArgs,
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    match (args.command, args.config) {
        (Some(CoordinatorCommand::Init(a)), _) => {
            let report = init(
                &a.out,
                &InitPlan {
                    coordinators: if a.addrs.is_empty() {
                        consecutive(a.coordinators, a.listen)?
                    } else {
                        a.addrs
                    },
                    workers: a.workers,
                    clients: a.clients,
                },
            )?;
            for (path, addr) in report.coordinator_configs.iter().zip(&report.addresses) {
                println!(
                    "coordinator {addr}: strata coordinator --config {}",
                    path.display()
                );
            }
            for path in &report.worker_configs {
                println!("worker: strata worker --config {}", path.display());
            }
            println!("client token: {}", report.token_file.display());
            println!("shared store: {}", report.store.display());
            Ok(())
        }
        (Some(CoordinatorCommand::InitJoin(a)), _) => {
            let r = init_join(&a.out, a.listen)?;
            println!(
                "coordinator {} ({}) at {}: strata coordinator --config {}",
                r.id,
                r.name,
                r.addr,
                r.config.display()
            );
            println!(
                "then, with a client certificate: strata coordinator add --id {} --name {} --addr {}",
                r.id, r.name, r.addr
            );
            Ok(())
        }
        (Some(CoordinatorCommand::Add(a)), _) => {
            let request = MembershipRequest::Add {
                id: a.id,
                name: a.name.clone(),
                addr: a.addr.to_string(),
            };
            change_membership(&a.client, request)
        }
        (Some(CoordinatorCommand::Remove(a)), _) => {
            change_membership(&a.client, MembershipRequest::Remove { id: a.id })
        }
        (None, Some(path)) => {
            let config = CoordinatorConfig::load(&path)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(strata_coordinator::server::serve(config))?;
            Ok(())
        }
        (None, None) => {
            bail!("give --config FILE to run a coordinator, or `init` to write a cluster's files")
        }
    }
}

/// `strata coordinator add` / `remove`: asks the leader and prints the group once the change
/// is committed.
fn change_membership(args: &ClientArgs, request: MembershipRequest) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let access = ClusterAccess::from(args);
    let msg = ClientMsg::Membership(request);
    match runtime.block_on(ask_leader(&access, &msg, "membership change"))? {
        (_, CoordinatorToClient::Membership(m)) => {
            println!("{}", m.message);
            println!("voters: {:?}; learners: {:?}", m.voters, m.learners);
            Ok(())
        }
        (addr, CoordinatorToClient::Error(e)) => bail!("{addr}: {}", e.message),
        (addr, other) => bail!("{addr}: unexpected answer to a membership change: {other:?}"),
    }
}

/// How a client reaches and authenticates to a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterAccess {
    pub coordinators: Vec<SocketAddr>,
    pub ca: PathBuf,
    pub token: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The group's members as the last coordinator reached named them: dialled first, so that
    /// a long build outlives the replacement of the coordinators it was given.
    pub learnt: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl ClusterAccess {
    /// The members learnt, then the configured coordinators that are not among them.
    fn addresses(&self) -> Vec<SocketAddr> {
        let mut addrs = self.learnt.lock().map(|l| l.clone()).unwrap_or_default();
        for a in &self.coordinators {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
        addrs
    }
}

impl From<&ClientArgs> for ClusterAccess {
    fn from(a: &ClientArgs) -> Self {
        ClusterAccess {
            coordinators: a.coordinator.clone(),
            ca: a.ca.clone(),
            token: a.token.clone(),
            cert: a.cert.clone(),
            key: a.key.clone(),
            learnt: Default::default(),
        }
    }
}

/// A connection to one of the coordinators, after the hello: the leader when the first node
/// that answers names one.
async fn connect(args: &ClusterAccess) -> Result<(quinn::Connection, SocketAddr)> {
    let (conn, addr, leader) = connect_any(args, &args.addresses()).await?;
    if let Some(leader) = leader.filter(|l| *l != addr)
        && let Ok((conn, addr, _)) = connect_any(args, &[leader]).await
    {
        return Ok((conn, addr));
    }
    Ok((conn, addr))
}

/// `name=ip:port` as a coordinator names the leader.
fn leader_addr(named: &str) -> Option<SocketAddr> {
    named.rsplit('=').next()?.parse().ok()
}

async fn connect_any(
    args: &ClusterAccess,
    addrs: &[SocketAddr],
) -> Result<(quinn::Connection, SocketAddr, Option<SocketAddr>)> {
    let ca = std::fs::read_to_string(&args.ca)
        .with_context(|| format!("reading {}", args.ca.display()))?;
    let identity = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => Some(Identity::load(c, k)?),
        _ => None,
    };
    if identity.is_none() && args.token.is_none() {
        bail!("give --token (or STRATA_TOKEN) or --cert and --key to reach the cluster");
    }
    let endpoint = tls::client_endpoint(
        "0.0.0.0:0".parse()?,
        tls::client_config(&ca, identity.as_ref())?,
    )?;
    let name = match &identity {
        Some(i) => i.peer()?.name,
        None => "client".to_string(),
    };
    let mut errors = Vec::new();
    for addr in addrs {
        let attempt = async {
            let conn = tls::connect(&endpoint, *addr, &addr.ip().to_string()).await?;
            let hello = Hello {
                role: Role::Client,
                name: name.clone(),
                token: args.token.clone(),
            };
            let welcome = wire::send_hello(&conn, &hello).await?;
            let members: Vec<SocketAddr> = welcome
                .members
                .iter()
                .filter_map(|m| m.parse().ok())
                .collect();
            if !members.is_empty()
                && let Ok(mut learnt) = args.learnt.lock()
            {
                *learnt = members;
            }
            Ok::<_, anyhow::Error>((conn, welcome.leader.as_deref().and_then(leader_addr)))
        };
        match tokio::time::timeout(std::time::Duration::from_secs(5), attempt).await {
            Ok(Ok((conn, leader))) => return Ok((conn, *addr, leader)),
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: no answer within 5s")),
        }
    }
    Err(anyhow!("no coordinator answered: {}", errors.join("; ")))
}

async fn ask_status(args: &ClientArgs) -> Result<(StatusReply, SocketAddr)> {
    let access = ClusterAccess::from(args);
    let (conn, addr, _) = connect_any(&access, &access.coordinators).await?;
    match wire::request::<CoordinatorToClient>(&conn, &ClientMsg::Status(StatusRequest {})).await? {
        CoordinatorToClient::Status(s) => Ok((s, addr)),
        CoordinatorToClient::Error(e) => Err(anyhow!("{addr}: {}", e.message)),
        other => Err(anyhow!("{addr}: unexpected answer {other:?}")),
    }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (reply, addr) = runtime.block_on(ask_status(&args.client))?;
    let mut out = String::new();
    let leader = reply.leader.as_deref().unwrap_or("none (no quorum)");
    let _ = writeln!(out, "asked {addr}; leader: {leader}");
    let _ = writeln!(out, "coordinators:");
    for n in &reply.nodes {
        let detail = if n.term > 0 {
            format!(
                "  term {} commit {} applied {}",
                n.term, n.commit_index, n.applied_index
            )
        } else if n.commit_index > 0 {
            format!("  replicated {}", n.commit_index)
        } else {
            String::new()
        };
        let detail = if n.reachable {
            detail
        } else {
            format!("{detail}  (not heard from)")
        };
        let _ = writeln!(
            out,
            "  {} {} {} {:?}{detail}",
            n.id, n.name, n.addr, n.state
        );
    }
    let _ = writeln!(out, "workers: {}", reply.workers.len());
    for w in &reply.workers {
        let seen = match w.last_seen_ms {
            Some(ms) => format!("heartbeat {:.1}s ago", ms as f64 / 1000.0),
            None => "not connected here".to_string(),
        };
        let draining = if w.state == "active" {
            String::new()
        } else {
            format!(" ({})", w.state)
        };
        let _ = writeln!(
            out,
            "  {}{draining} native {} emulated {} capacity {} running {}  {seen}",
            w.name,
            w.native.join(","),
            w.emulated.join(","),
            w.capacity,
            w.running.len()
        );
    }
    let _ = writeln!(out, "queue: {}", reply.queue.len());
    for b in &reply.queue {
        let _ = writeln!(
            out,
            "  build {} {} {}/{} jobs",
            b.build_id, b.state, b.jobs_done, b.jobs_total
        );
    }
    // A closed pipe (`strata status | head`) is not an error worth a message.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}

/// `strata cancel BUILD`.
pub fn cancel(args: CancelArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(cancel_build(&ClusterAccess::from(&args.client), args.build))?;
    println!("build {} cancelled", args.build);
    Ok(())
}

/// Asks the leader to cancel `build`.
async fn cancel_build(access: &ClusterAccess, build: u64) -> Result<()> {
    let msg = ClientMsg::Cancel(CancelBuild { build_id: build });
    match ask_leader(access, &msg, "cancellation").await? {
        (_, CoordinatorToClient::Accepted(_)) => Ok(()),
        (addr, CoordinatorToClient::Error(e)) => bail!("{addr}: {}", e.message),
        (addr, other) => bail!("{addr}: unexpected answer to a cancellation: {other:?}"),
    }
}

/// How long a build request waits for a leader before the client gives up.
const SUBMIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// Sends `msg` to the leader, following redirects and waiting out an election for
/// [`SUBMIT_PATIENCE`]: the first answer that is neither "not the leader" nor "no quorum".
async fn ask_leader(
    access: &ClusterAccess,
    msg: &ClientMsg,
    what: &str,
) -> Result<(SocketAddr, CoordinatorToClient)> {
    let deadline = std::time::Instant::now() + SUBMIT_PATIENCE;
    loop {
        let answer = async {
            let (conn, addr) = connect(access).await?;
            let reply = wire::request::<CoordinatorToClient>(&conn, msg).await?;
            Ok::<_, anyhow::Error>((addr, reply))
        }
        .await;
        let why = match answer {
            Ok((addr, CoordinatorToClient::NotLeader(n))) => format!(
                "{addr} is not the leader and knows none{}",
                n.leader
                    .map(|l| format!(" (it named {l})"))
                    .unwrap_or_default()
            ),
            Ok((addr, CoordinatorToClient::NoQuorum)) => {
                format!("{addr} could not commit the {what}")
            }
            Ok(answer) => return Ok(answer),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() >= deadline {
            let asked: Vec<String> = access
                .coordinators
                .iter()
                .map(ToString::to_string)
                .collect();
            bail!(
                "no quorum: no coordinator leads the cluster after {}s (asked {}); last answer: {why}",
                SUBMIT_PATIENCE.as_secs(),
                asked.join(", ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// Runs a build on a cluster: uploads the context (only the files the store lacks), submits
/// the request to the leader, prints its progress, and returns each platform's image once the
/// build is done. A leader change on the way is survived: the client reconnects to whichever
/// coordinator leads and goes on watching.
pub async fn build_on_cluster(
    access: &ClusterAccess,
    store: &BlobStore,
    context: &std::path::Path,
    ignore: Option<DockerIgnore>,
    hashes: std::sync::Arc<HashCache>,
    mut request: BuildRequest,
    progress: &Progress,
) -> Result<Vec<(Platform, StageOutput)>> {
    let started = std::time::Instant::now();
    let up = upload(store, context, ignore, hashes).await?;
    progress.send(Event::Note {
        text: format!(
            "context: {} files, {} uploaded ({} bytes) in {:.1}s",
            up.files,
            up.uploaded,
            up.bytes_uploaded,
            started.elapsed().as_secs_f64()
        ),
    });
    request.context = strata_shared::job::JobContext::Store(up.id);

    // Submit to the leader; a cluster without one is waited for a while, then reported.
    let msg = ClientMsg::Submit(SubmitBuild { request });
    let build_id = match ask_leader(access, &msg, "build").await? {
        (_, CoordinatorToClient::Accepted(a)) => a.build_id,
        (_, CoordinatorToClient::Error(e)) => bail!("{}", e.message),
        (addr, other) => bail!("{addr}: unexpected answer to a build request: {other:?}"),
    };
    progress.send(Event::Note {
        text: format!("build {build_id} accepted by the cluster"),
    });

    // Watch it to the end; an interrupted client cancels it rather than leave it running.
    tokio::select! {
        done = watch_to_end(access, build_id, progress) => done,
        signal = strata_shared::signal::stop_requested() => {
            progress.send(Event::Note {
                text: format!("{signal}: cancelling build {build_id} on the cluster"),
            });
            cancel_build(access, build_id).await?;
            bail!("build {build_id} cancelled ({signal})")
        }
    }
}

/// Watches build `build_id` to its end, from any coordinator, resuming after the last event
/// seen; each platform's image when it succeeded.
async fn watch_to_end(
    access: &ClusterAccess,
    build_id: u64,
    progress: &Progress,
) -> Result<Vec<(Platform, StageOutput)>> {
    let mut next_event = 0u64;
    let mut last_error = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(24 * 3600);
    while std::time::Instant::now() < deadline {
        let watched = async {
            let (conn, _) = connect(access).await?;
            let mut recv = wire::send_request(
                &conn,
                &ClientMsg::Watch(WatchBuild {
                    build_id,
                    from_event: next_event,
                }),
            )
            .await?;
            loop {
                match wire::read_frame::<CoordinatorToClient>(&mut recv).await? {
                    CoordinatorToClient::Event(e) => {
                        next_event = e.seq + 1;
                        progress.send(e.event);
                    }
                    CoordinatorToClient::Done(d) => return Ok::<_, anyhow::Error>(Some(d.result)),
                    CoordinatorToClient::Error(e) => bail!("{}", e.message),
                    _ => return Ok(None),
                }
            }
        }
        .await;
        match watched {
            Ok(Some(BuildOutcome::Built(images))) => {
                return Ok(images.into_iter().map(|t| (t.platform, t.output)).collect());
            }
            Ok(Some(BuildOutcome::Failed(e))) => bail!("{e}"),
            Ok(None) => {}
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    bail!("lost the build: {last_error}")
}
