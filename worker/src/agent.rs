//! The worker agent: what `strata worker` runs. It keeps one registered connection to the
//! cluster's leader, takes the jobs the leader offers, runs them on the [`Engine`], streams
//! their progress and reports their results under the offer's fencing token.
//!
//! The conversation with the coordinators (see [`strata_shared::wire::message`]):
//!
//! 1. **Register.** The worker dials the configured coordinators in turn (the server name is
//!    the coordinator's IP address, which its certificate carries), says [`Hello`] as a worker
//!    and sends [`WorkerMsg::Register`] on a stream of its own. `Ack{accepted}` means it is
//!    registered with the leader; [`CoordinatorToWorker::NotLeader`] names the leader
//!    (`"name=ip:port"`), which the worker dials next; anything else (no quorum, a refusal, a
//!    connection that fails) is retried with a back-off of 200 ms doubling to 2 s, on the next
//!    address. A worker waits for its cluster forever, but logs each failing address at most
//!    once a minute ([`FailureLog`]).
//! 2. **Heartbeat.** Every `heartbeat_ms`, [`WorkerMsg::Heartbeat`] with the jobs it holds. A
//!    `NotLeader` answer, a lost connection or a heartbeat left unanswered ends the session:
//!    the worker connects and registers again. A refused heartbeat (the leader does not know
//!    the worker) is answered by registering again on the same connection.
//! 3. **Offers.** The leader opens streams on the worker's connection with
//!    [`CoordinatorToWorker::Offer`]; the worker answers [`WorkerMsg::Ack`]: taken when the job
//!    is valid for a remote worker ([`StageJob::validate_remote`]) and a slot is free ([`Jobs`], `capacity` jobs at once),
//!    declined with the reason otherwise. [`CoordinatorToWorker::Cancel`] stops a job.
//! 4. **Progress.** Each job's events go to the leader on one unidirectional stream of
//!    [`WorkerMsg::Progress`] frames, finished when the job ends; after a reconnection a new
//!    stream is opened on the new connection. Events that find no connection are dropped.
//! 5. **Result.** [`WorkerMsg::Result`] with the offer's epoch and term, on a stream of its
//!    own, until the leader answers: accepted, or refused (a stale fencing token: the lease
//!    went to someone else; the result is logged and dropped). A lost connection or a
//!    `NotLeader` keeps the result, which is sent again on the next registered connection, for
//!    at most [`RESULT_DEADLINE`].
//!
//! One task owns the session (connect, register, heartbeat); one task per connection accepts
//! the coordinator's streams; one task per job runs it and reports, with a helper task that
//! forwards its progress. They share the [`Link`] (the current registered connection) and the
//! [`Jobs`] table. [`Agent::run`] stops everything when its shutdown future completes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use quinn::VarInt;
use strata_shared::job::{BuildError, JobContext, StageJob, StageOutput};
use strata_shared::platform::Capabilities;
use strata_shared::progress::{Event, Progress};
use strata_shared::store::{BlobStore, StoreError};
use strata_shared::tls::{self, Identity, Role, TlsError};
use strata_shared::wire::{
    self, CoordinatorToWorker, ErrorCode, Heartbeat, Hello, JobAck, JobId, JobOffer, JobOutcome,
    JobProgress, JobResult, RegisterWorker, WireError, WorkerMsg,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::WorkerConfig;
use crate::context;
use crate::engine::Engine;
use crate::jobs::{Admission, Jobs, Lease};
use crate::platforms;

/// The first pause after a failed attempt to register; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest pause between attempts to register (and between tries of a result).
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A failing coordinator address is logged at most this often.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long a result is kept and retried before it is given up.
pub const RESULT_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// How long a QUIC handshake, and the answer to any one request, may take. Longer than a
/// coordinator takes to give up committing an entry (10 s), so that a slow leader answers
/// `NoQuorum` before the worker gives up on it; a dead connection is noticed sooner by QUIC's
/// idle timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished job waits for its progress stream to be written out before it sends
/// its result.
const PROGRESS_DRAIN: Duration = Duration::from_secs(5);
/// `NotLeader` redirections followed at once; more in a row are followed after a pause, so
/// that coordinators that disagree about the leader are not dialled in a tight loop.
const MAX_REDIRECTS: u32 = 3;
/// Application close code of a connection the worker leaves on purpose.
const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading the cluster CA certificate {path}: {source}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker certificate: {0}")]
    Identity(#[source] TlsError),
    #[error(
        "the certificate {cert} belongs to {peer}, but this is worker {name}: a worker needs a certificate of role worker with its name"
    )]
    WrongIdentity {
        cert: PathBuf,
        peer: String,
        name: String,
    },
    #[error("the QUIC endpoint: {0}")]
    Endpoint(#[source] TlsError),
    #[error("opening the blob store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("opening the build engine in {path}: {source}")]
    Engine {
        path: PathBuf,
        #[source]
        source: BuildError,
    },
    #[error("the worker configuration: {0}")]
    Config(String),
    #[error("the {0} task stopped unexpectedly")]
    TaskFailed(&'static str),
}

/// Runs a worker with `config` until the process stops.
pub async fn run(config: WorkerConfig) -> Result<(), AgentError> {
    run_until(config, std::future::pending()).await
}

/// Runs a worker with `config` until `shutdown` completes, then stops its jobs and leaves.
pub async fn run_until(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::open(&config).await?.run(shutdown).await
}

/// The platforms of `caps` as the strings [`RegisterWorker`] carries: `(native, emulated)`,
/// e.g. `(["linux/amd64/v3"], ["linux/arm64"])`.
pub fn capabilities_strings(caps: &Capabilities) -> (Vec<String>, Vec<String>) {
    let list = |ps: &[strata_shared::platform::Platform]| -> Vec<String> {
        ps.iter().map(ToString::to_string).collect()
    };
    (list(&caps.native), list(&caps.emulated))
}

/// What this worker announces when it registers.
pub fn registration(config: &WorkerConfig, caps: &Capabilities) -> RegisterWorker {
    let (native, emulated) = capabilities_strings(caps);
    RegisterWorker {
        name: config.name.clone(),
        native,
        emulated,
        capacity: config.capacity,
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The address of a leader as [`wire::NotLeader`] names it: `"name=ip:port"` (or a bare
/// `ip:port`). `None` when it is not an address.
pub fn parse_leader(leader: &str) -> Option<SocketAddr> {
    let addr = leader.split_once('=').map_or(leader, |(_, addr)| addr);
    addr.trim().parse().ok()
}

/// The outcome a job reports: the stage output, or the error's message. A Dockerfile error is
/// rendered with its line and the offending lines of `dockerfile` (`Dockerfile:3: ...`), as
/// the command line shows it.
pub fn outcome_of(result: Result<StageOutput, BuildError>, job: &StageJob) -> JobOutcome {
    match result {
        Ok(output) => JobOutcome::Built(output),
        Err(BuildError::Dockerfile(e)) => {
            JobOutcome::Failed(e.render(&job.dockerfile_name, &job.dockerfile))
        }
        Err(e) => JobOutcome::Failed(e.to_string()),
    }
}

/// The job an offer carries, or why this worker will not run it.
pub fn check_offer(offer: &JobOffer) -> Result<StageJob, String> {
    offer
        .job
        .validate_remote()
        .map_err(|e| format!("invalid job: {e}"))?;
    Ok(offer.job.clone())
}

/// Spawns `future` as a task inside `span`: every task of the agent has a name and an owner.
fn spawn_in<F>(span: tracing::Span, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(future.instrument(span))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Small pieces: back-off, failure log, the jobs table
// ---------------------------------------------------------------------------------------------

/// Pauses between attempts: [`BACKOFF_FIRST`], doubling up to [`BACKOFF_MAX`].
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }
}

/// When a failing coordinator address was last logged: once per address per
/// [`FAILURE_LOG_INTERVAL`], so that a worker waiting for its cluster does not flood its log.
#[derive(Debug, Default)]
struct FailureLog {
    last: HashMap<SocketAddr, std::time::Instant>,
}

impl FailureLog {
    /// Whether a failure of `addr` at `now` is to be logged (and if so, remembers it).
    fn should_log(&mut self, addr: SocketAddr, now: std::time::Instant) -> bool {
        match self.last.get(&addr) {
            Some(last) if now.saturating_duration_since(*last) < FAILURE_LOG_INTERVAL => false,
            _ => {
                self.last.insert(addr, now);
                true
            }
        }
    }

    /// `addr` works again: its next failure is logged at once.
    fn forget(&mut self, addr: SocketAddr) {
        self.last.remove(&addr);
    }
}

/// The coordinator addresses, dialled in turn.
#[derive(Debug)]
struct Dialer {
    addresses: Vec<SocketAddr>,
    next: usize,
}

impl Dialer {
    /// Takes in the members a coordinator named: they come first, then the configured
    /// addresses that are not among them (one may be down, or not yet added). A coordinator
    /// that names none (one still joining) changes nothing.
    fn learn(&mut self, members: &[SocketAddr], configured: &[SocketAddr]) {
        if members.is_empty() {
            return;
        }
        let mut addresses: Vec<SocketAddr> = members.to_vec();
        for a in configured {
            if !addresses.contains(a) {
                addresses.push(*a);
            }
        }
        if addresses != self.addresses {
            tracing::info!(coordinators = ?addresses, "the coordinators to dial, as the cluster names them");
            self.addresses = addresses;
            self.next = 0;
        }
    }

    fn next_addr(&mut self) -> Option<SocketAddr> {
        let addr = self
            .addresses
            .get(self.next % self.addresses.len().max(1))
            .copied();
        self.next = self.next.wrapping_add(1);
        addr
    }

    /// The next round starts after `addr` (a coordinator just lost), so that it is dialled
    /// last: a dead leader costs a handshake timeout.
    fn start_after(&mut self, addr: SocketAddr) {
        if let Some(i) = self.addresses.iter().position(|a| *a == addr) {
            self.next = i + 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The link: the current registered connection
// ---------------------------------------------------------------------------------------------

/// A connection on which the worker is registered with the leader.
#[derive(Debug, Clone)]
struct Live {
    conn: quinn::Connection,
    /// Counts registrations: a newer connection has a greater generation.
    generation: u64,
    coordinator: SocketAddr,
}

/// The current registered connection, shared by the session task (which replaces it) and the
/// job tasks (which use it, and close it when its coordinator turns out not to be the leader).
#[derive(Debug)]
struct Link {
    current: watch::Sender<Option<Live>>,
    /// Where the leader is, as a job task learnt from a `NotLeader` answer.
    hint: Mutex<Option<SocketAddr>>,
}

impl Link {
    fn new() -> Link {
        Link {
            current: watch::Sender::new(None),
            hint: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Live> {
        self.current.borrow().clone()
    }

    /// The registered connection, once there is one newer than generation `newer_than`.
    async fn connected(&self, newer_than: Option<u64>) -> Live {
        let fits = |live: &Option<Live>| {
            live.as_ref()
                .is_some_and(|l| newer_than.is_none_or(|g| l.generation > g))
        };
        let mut rx = self.current.subscribe();
        loop {
            if let Ok(live) = rx.wait_for(fits).await
                && let Some(live) = live.as_ref()
            {
                return live.clone();
            }
            // The sender lives as long as `self`: unreachable, but never spin.
            std::future::pending::<()>().await;
        }
    }

    /// The coordinator of `live` says it is not the leader: remember where the leader is and
    /// close the connection, which makes the session register again.
    fn not_leader(&self, live: &Live, leader: Option<&str>) {
        if let Some(addr) = leader.and_then(parse_leader) {
            *lock(&self.hint) = Some(addr);
        }
        live.conn.close(CLOSE_NORMAL, b"not the leader");
    }

    fn take_hint(&self) -> Option<SocketAddr> {
        lock(&self.hint).take()
    }
}

/// Why registering with one coordinator did not work.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    /// It is not the leader; the leader's address when it knows it.
    NotLeader(Option<SocketAddr>),
    NoQuorum,
    Refused(String),
    Failed(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::NotLeader(Some(leader)) => {
                write!(f, "not the leader (the leader is {leader})")
            }
            Attempt::NotLeader(None) => f.write_str("not the leader, and the leader is unknown"),
            Attempt::NoQuorum => f.write_str("the cluster has no quorum"),
            Attempt::Refused(reason) => write!(f, "registration refused: {reason}"),
            Attempt::Failed(reason) => f.write_str(reason),
        }
    }
}

/// Why a session with the leader ended.
#[derive(Debug)]
enum SessionEnd {
    /// The coordinator is no longer the leader; the new one's address when known.
    NotLeader(Option<SocketAddr>),
    Lost(String),
}

fn kind(msg: &CoordinatorToWorker) -> &'static str {
    match msg {
        CoordinatorToWorker::Offer(_) => "Offer",
        CoordinatorToWorker::Cancel(_) => "Cancel",
        CoordinatorToWorker::Ack(_) => "Ack",
        CoordinatorToWorker::NotLeader(_) => "NotLeader",
        CoordinatorToWorker::NoQuorum => "NoQuorum",
        CoordinatorToWorker::Error(_) => "Error",
    }
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

/// A worker: its identity, endpoint, engine and the jobs it holds.
pub struct Agent {
    name: String,
    registration: RegisterWorker,
    coordinators: Vec<SocketAddr>,
    heartbeat: Duration,
    endpoint: quinn::Endpoint,
    engine: Engine,
    /// Where build contexts are materialised (`data_dir/contexts`).
    contexts: PathBuf,
    /// One materialisation at a time: two jobs of one build share a context, and
    /// [`context::materialize`] is not safe to run twice at once for the same id.
    materializing: tokio::sync::Mutex<()>,
    jobs: Jobs,
    link: Link,
    failures: Mutex<FailureLog>,
    /// How long running jobs may finish once the worker is told to stop.
    drain: Duration,
    /// Stopping: offers are declined.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.name)
            .field("coordinators", &self.coordinators)
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens a worker: loads and checks its certificate, opens the blob store and the engine
    /// under `data_dir`, detects the platforms this machine builds for, and binds a QUIC
    /// endpoint. Must run inside a tokio runtime.
    pub async fn open(config: &WorkerConfig) -> Result<Agent, AgentError> {
        Agent::open_with(config, platforms::detect()).await
    }

    /// The same, announcing `caps` instead of what this machine detects.
    pub async fn open_with(config: &WorkerConfig, caps: Capabilities) -> Result<Agent, AgentError> {
        config.check().map_err(AgentError::Config)?;
        let ca = std::fs::read_to_string(&config.tls.ca).map_err(|source| AgentError::ReadCa {
            path: config.tls.ca.clone(),
            source,
        })?;
        let identity =
            Identity::load(&config.tls.cert, &config.tls.key).map_err(AgentError::Identity)?;
        let peer = identity.peer().map_err(AgentError::Identity)?;
        if peer.role != Role::Worker || peer.name != config.name {
            return Err(AgentError::WrongIdentity {
                cert: config.tls.cert.clone(),
                peer: peer.to_string(),
                name: config.name.clone(),
            });
        }
        let client = tls::client_config(&ca, Some(&identity)).map_err(AgentError::Endpoint)?;
        let bind: SocketAddr = if config.coordinators.iter().all(SocketAddr::is_ipv4) {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let endpoint = tls::client_endpoint(bind, client).map_err(AgentError::Endpoint)?;
        let store = BlobStore::local(&config.store).map_err(|source| AgentError::Store {
            path: config.store.clone(),
            source,
        })?;
        let engine =
            Engine::open(&config.data_dir, store).map_err(|source| AgentError::Engine {
                path: config.data_dir.clone(),
                source,
            })?;
        Ok(Agent {
            name: config.name.clone(),
            registration: registration(config, &caps),
            coordinators: config.coordinators.clone(),
            heartbeat: Duration::from_millis(config.heartbeat_ms),
            endpoint,
            engine,
            contexts: config.data_dir.join("contexts"),
            materializing: tokio::sync::Mutex::new(()),
            jobs: Jobs::new(config.capacity),
            link: Link::new(),
            failures: Mutex::new(FailureLog::default()),
            drain: Duration::from_millis(config.drain_ms),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Lets the running jobs finish, for up to the drain time, while the leader gives the
    /// worker no new ones.
    async fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let held = self.jobs.held().len();
        if held == 0 || self.drain.is_zero() {
            return;
        }
        tracing::info!(jobs = held, within = ?self.drain, "draining: no new jobs; the running ones may finish");
        self.tell_leader(true).await;
        let deadline = Instant::now() + self.drain;
        while !self.jobs.held().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match self.jobs.held().len() {
            0 => tracing::info!("drained: every running job finished"),
            left => tracing::warn!(
                jobs = left,
                "drain time is up: stopping the jobs left and handing them back"
            ),
        }
    }

    /// Tells the leader the worker is draining (`drain`) or gone; best effort.
    async fn tell_leader(&self, drain: bool) {
        let Some(live) = self.link.current() else {
            return;
        };
        let msg = WorkerMsg::Leave(wire::LeaveCluster { drain });
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            wire::request::<CoordinatorToWorker>(&live.conn, &msg),
        )
        .await;
        match answer {
            Ok(Ok(CoordinatorToWorker::Ack(a))) if a.accepted => {}
            other => tracing::debug!(drain, ?other, "the leader did not take the leave"),
        }
    }

    /// What the worker announces when it registers.
    pub fn registration(&self) -> &RegisterWorker {
        &self.registration
    }

    /// Where build contexts are materialised.
    pub fn contexts_dir(&self) -> &Path {
        &self.contexts
    }

    /// Runs the worker until `shutdown` completes: registers with the leader and serves it.
    /// Then stops the running jobs, closes the connection and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let agent = Arc::new(self);
        tracing::info!(
            worker = %agent.name,
            native = ?agent.registration.native,
            emulated = ?agent.registration.emulated,
            capacity = agent.registration.capacity,
            coordinators = ?agent.coordinators,
            "worker starting"
        );
        let mut session = spawn_in(
            tracing::info_span!("session", worker = %agent.name),
            agent.clone().session(),
        );
        let result = tokio::select! {
            () = shutdown => Ok(()),
            joined = &mut session => {
                tracing::error!(?joined, "the session task stopped");
                Err(AgentError::TaskFailed("session"))
            }
        };
        if result.is_ok() {
            agent.drain().await;
        }
        tracing::info!("worker stopping: cancelling jobs and leaving the cluster");
        session.abort();
        agent.jobs.abort_all();
        // What it held goes back to the queue now, not when its leases run out.
        agent.tell_leader(false).await;
        if let Some(live) = agent.link.current() {
            live.conn.close(CLOSE_NORMAL, b"worker shutting down");
        }
        agent.link.current.send_replace(None);
        agent.endpoint.close(CLOSE_NORMAL, b"worker shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), agent.endpoint.wait_idle()).await;
        tracing::info!("worker stopped");
        result
    }

    // --- session: connect, register, heartbeat ------------------------------------------------

    /// Connects and registers, heartbeats while the connection lasts, and starts over; never
    /// returns.
    async fn session(self: Arc<Self>) {
        let mut dialer = Dialer {
            addresses: self.coordinators.clone(),
            next: 0,
        };
        let mut generation = 0u64;
        let mut hint = None;
        loop {
            let (conn, coordinator, members) =
                self.connect_to_leader(&mut dialer, hint.take()).await;
            dialer.learn(&members, &self.coordinators);
            generation += 1;
            let live = Live {
                conn,
                generation,
                coordinator,
            };
            tracing::info!(%coordinator, generation, "registered with the leader");
            spawn_in(
                tracing::info_span!("requests", %coordinator, generation),
                self.clone().serve_requests(live.clone()),
            );
            self.link.current.send_replace(Some(live.clone()));
            let end = self.heartbeats(&live).await;
            self.link.current.send_replace(None);
            live.conn.close(CLOSE_NORMAL, b"reconnecting");
            let learnt = self.link.take_hint();
            dialer.start_after(coordinator);
            match end {
                SessionEnd::NotLeader(leader) => {
                    tracing::info!(%coordinator, ?leader, "the coordinator is no longer the leader; registering again");
                    hint = leader.or(learnt);
                }
                SessionEnd::Lost(reason) => {
                    tracing::warn!(%coordinator, %reason, "lost the leader; registering again");
                    hint = learnt;
                }
            }
        }
    }

    /// Dials `hint` first, then the configured coordinators in turn, until one registers the
    /// worker as the leader; follows `NotLeader` redirections.
    async fn connect_to_leader(
        &self,
        dialer: &mut Dialer,
        mut hint: Option<SocketAddr>,
    ) -> (quinn::Connection, SocketAddr, Vec<SocketAddr>) {
        let mut backoff = Backoff::new();
        let mut redirects = 0;
        loop {
            let Some(addr) = hint.take().or_else(|| dialer.next_addr()) else {
                // `check` refuses an empty list; wait rather than spin.
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            };
            match self.attempt(addr).await {
                Ok((conn, members)) => {
                    lock(&self.failures).forget(addr);
                    return (conn, addr, members);
                }
                Err(Attempt::NotLeader(Some(leader))) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    tracing::debug!(%addr, %leader, "not the leader; dialling the leader");
                    hint = Some(leader);
                }
                Err(failure) => {
                    redirects = 0;
                    if lock(&self.failures).should_log(addr, std::time::Instant::now()) {
                        tracing::warn!(
                            coordinator = %addr,
                            error = %failure,
                            "cannot register; retrying (each address is logged at most once a minute)"
                        );
                    } else {
                        tracing::debug!(coordinator = %addr, error = %failure, "cannot register");
                    }
                    if let Attempt::NotLeader(Some(leader)) = failure {
                        hint = Some(leader);
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// One attempt: dial `addr`, say hello, register. The connection and the group's members
    /// as the coordinator named them.
    async fn attempt(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, Vec<SocketAddr>), Attempt> {
        let server_name = addr.ip().to_string();
        let conn = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tls::connect(&self.endpoint, addr, &server_name),
        )
        .await
        .map_err(|_| Attempt::Failed(format!("no QUIC handshake within {REQUEST_TIMEOUT:?}")))?
        .map_err(|e| Attempt::Failed(e.to_string()))?;
        let hello = Hello {
            role: Role::Worker,
            name: self.name.clone(),
            token: None,
        };
        let welcome = match wire::send_hello(&conn, &hello).await {
            Ok(welcome) => welcome,
            Err(WireError::Refused(reason)) => return Err(Attempt::Refused(reason)),
            Err(e) => return Err(Attempt::Failed(format!("hello: {e}"))),
        };
        tracing::debug!(%addr, node_id = welcome.node_id, term = welcome.term, leader = ?welcome.leader, "welcomed");
        let members = welcome
            .members
            .iter()
            .filter_map(|m| m.parse().ok())
            .collect();
        match self.register(&conn).await {
            Ok(()) => Ok((conn, members)),
            Err(failure) => {
                conn.close(CLOSE_NORMAL, failure.to_string().as_bytes());
                Err(failure)
            }
        }
    }

    /// Sends [`WorkerMsg::Register`] on `conn` and reads the answer.
    async fn register(&self, conn: &quinn::Connection) -> Result<(), Attempt> {
        let msg = WorkerMsg::Register(self.registration.clone());
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, wire::request(conn, &msg))
            .await
            .map_err(|_| {
                Attempt::Failed(format!("no answer to register within {REQUEST_TIMEOUT:?}"))
            })?
            .map_err(|e| Attempt::Failed(format!("register: {e}")))?;
        match reply {
            CoordinatorToWorker::Ack(ack) if ack.accepted => Ok(()),
            CoordinatorToWorker::Ack(ack) => Err(Attempt::Refused(ack.reason)),
            CoordinatorToWorker::NotLeader(not) => {
                let leader = not.leader.as_deref().and_then(parse_leader);
                if leader.is_none()
                    && let Some(named) = &not.leader
                {
                    tracing::warn!(leader = %named, "NotLeader names a leader that is not an address");
                }
                Err(Attempt::NotLeader(leader))
            }
            CoordinatorToWorker::NoQuorum => Err(Attempt::NoQuorum),
            CoordinatorToWorker::Error(e) => Err(Attempt::Failed(format!(
                "register: {:?}: {}",
                e.code, e.message
            ))),
            other => Err(Attempt::Failed(format!(
                "register: unexpected {} answer",
                kind(&other)
            ))),
        }
    }

    /// Heartbeats on `live` every `heartbeat` until the session ends.
    async fn heartbeats(&self, live: &Live) -> SessionEnd {
        let mut ticker = tokio::time::interval(self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                reason = live.conn.closed() => return SessionEnd::Lost(format!("connection closed: {reason}")),
                _ = ticker.tick() => {}
            }
            let msg = WorkerMsg::Heartbeat(Heartbeat {
                worker: self.name.clone(),
                running: self.jobs.held(),
            });
            let reply = match tokio::time::timeout(REQUEST_TIMEOUT, wire::request(&live.conn, &msg))
                .await
            {
                Err(_) => {
                    return SessionEnd::Lost(format!(
                        "no answer to a heartbeat within {REQUEST_TIMEOUT:?}"
                    ));
                }
                Ok(Err(e)) if e.is_connection_lost() => return SessionEnd::Lost(e.to_string()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    continue;
                }
                Ok(Ok(reply)) => reply,
            };
            match reply {
                CoordinatorToWorker::Ack(ack) if ack.accepted => {}
                CoordinatorToWorker::Ack(ack) => {
                    tracing::warn!(reason = %ack.reason, "the leader refused a heartbeat; registering again");
                    match self.register(&live.conn).await {
                        Ok(()) => tracing::info!("registered again"),
                        Err(Attempt::NotLeader(leader)) => return SessionEnd::NotLeader(leader),
                        Err(failure) => return SessionEnd::Lost(failure.to_string()),
                    }
                }
                CoordinatorToWorker::NotLeader(not) => {
                    return SessionEnd::NotLeader(not.leader.as_deref().and_then(parse_leader));
                }
                CoordinatorToWorker::NoQuorum => {
                    tracing::debug!("heartbeat: the leader has no quorum")
                }
                CoordinatorToWorker::Error(e) => {
                    tracing::warn!(code = ?e.code, message = %e.message, "heartbeat answered with an error");
                }
                other => tracing::warn!(answer = kind(&other), "unexpected answer to a heartbeat"),
            }
        }
    }

    // --- the coordinator's requests: offers and cancellations ---------------------------------

    /// Accepts the streams the coordinator opens on `live` until the connection ends.
    async fn serve_requests(self: Arc<Self>, live: Live) {
        loop {
            match wire::accept_stream(&live.conn).await {
                Ok(Some((send, recv))) => {
                    spawn_in(
                        tracing::debug_span!("request"),
                        self.clone().coordinator_request(live.clone(), send, recv),
                    );
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "no more requests on this connection");
                    return;
                }
            }
        }
    }

    /// Reads one request of the coordinator and answers it with [`WorkerMsg::Ack`].
    async fn coordinator_request(
        self: Arc<Self>,
        live: Live,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let msg: CoordinatorToWorker = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            wire::read_frame(&mut recv),
        )
        .await
        {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) if e.is_connection_lost() => {
                tracing::debug!(coordinator = %live.coordinator, error = %e, "connection lost before a request");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(coordinator = %live.coordinator, error = %e, "unreadable request");
                return;
            }
            Err(_) => {
                tracing::warn!(coordinator = %live.coordinator, "a request stream stayed empty");
                return;
            }
        };
        match msg {
            CoordinatorToWorker::Offer(offer) => self.take_offer(offer, send).await,
            CoordinatorToWorker::Cancel(cancel) => {
                let ack = match self.jobs.cancel(&cancel) {
                    Ok(()) => {
                        tracing::info!(job = cancel.job_id, epoch = cancel.epoch, "job cancelled");
                        accepted()
                    }
                    Err(reason) => {
                        tracing::info!(job = cancel.job_id, epoch = cancel.epoch, %reason, "nothing to cancel");
                        declined(reason)
                    }
                };
                let _ = answer(&mut send, ack).await;
            }
            other => {
                let reason = format!(
                    "a worker takes offers and cancellations, not {}",
                    kind(&other)
                );
                tracing::warn!(%reason, "unexpected request");
                let _ = answer(&mut send, declined(reason)).await;
            }
        }
    }

    /// Answers an offer and, when taken, starts the job.
    async fn take_offer(self: Arc<Self>, offer: JobOffer, mut send: quinn::SendStream) {
        let lease = Lease::of(&offer);
        let stopping = self.draining.load(std::sync::atomic::Ordering::SeqCst);
        let (ack, start) = match check_offer(&offer) {
            Err(reason) => (declined(reason), None),
            Ok(_) if stopping => (declined("the worker is shutting down".into()), None),
            Ok(job) => match self.jobs.admit(lease) {
                Admission::Run => (accepted(), Some(job)),
                Admission::AlreadyHeld => (accepted(), None),
                Admission::Declined(reason) => (declined(reason), None),
            },
        };
        if start.is_none() && ack.accepted {
            tracing::info!(
                job = offer.job_id,
                epoch = offer.epoch,
                term = offer.term,
                "offer of a lease held already: taken, not run again"
            );
        } else if ack.accepted {
            tracing::info!(
                job = offer.job_id,
                epoch = offer.epoch,
                term = offer.term,
                "offer taken"
            );
        } else {
            tracing::info!(job = offer.job_id, epoch = offer.epoch, term = offer.term, reason = %ack.reason, "offer declined");
        }
        let answered = answer(&mut send, ack).await;
        let Some(job) = start else { return };
        if let Err(e) = answered {
            tracing::warn!(job = offer.job_id, error = %e, "cannot answer the offer; not running the job");
            self.jobs.finish(lease);
            return;
        }
        // A job outlives the request that brought it: its span stands on its own.
        let span = tracing::info_span!(
            parent: None,
            "job",
            worker = %self.name,
            id = lease.job_id,
            epoch = lease.epoch,
            term = lease.term
        );
        let task = spawn_in(span, self.clone().run_job(lease, job));
        self.jobs.attach(lease, task.abort_handle());
    }

    // --- jobs ---------------------------------------------------------------------------------

    /// Runs one job, forwards its progress, and delivers its result.
    async fn run_job(self: Arc<Self>, lease: Lease, job: StageJob) {
        let (progress, events) = Progress::channel();
        let forwarder = spawn_in(
            tracing::debug_span!("progress"),
            forward_progress(self.clone(), lease.job_id, events),
        );
        let started = Instant::now();
        let outcome = self.execute(job, &progress).await;
        drop(progress);
        self.jobs.reporting(lease);
        match &outcome {
            JobOutcome::Built(_) => tracing::info!(elapsed = ?started.elapsed(), "job succeeded"),
            JobOutcome::Failed(message) => {
                tracing::info!(elapsed = ?started.elapsed(), %message, "job failed")
            }
        }
        // Let the progress stream end before the result, so that the leader (usually) has the
        // whole log when it learns the outcome.
        let _ = tokio::time::timeout(PROGRESS_DRAIN, forwarder).await;
        self.deliver(JobResult {
            job_id: lease.job_id,
            epoch: lease.epoch,
            term: lease.term,
            outcome,
        })
        .await;
        self.jobs.finish(lease);
    }

    /// Materialises the job's context when it has one, and runs the job on the engine.
    async fn execute(&self, mut job: StageJob, progress: &Progress) -> JobOutcome {
        if let JobContext::Store(id) = &job.context {
            let _one_at_a_time = self.materializing.lock().await;
            match context::materialize(self.engine.store(), id, &self.contexts).await {
                Ok(dir) => job.context = JobContext::Local(dir.to_string_lossy().into_owned()),
                Err(e) => return JobOutcome::Failed(format!("build context {id}: {e}")),
            }
        }
        let result = self.engine.run_stage(&job, progress).await;
        outcome_of(result, &job)
    }

    /// Sends `result` to the leader until it answers, following it across reconnections, for
    /// at most [`RESULT_DEADLINE`].
    async fn deliver(&self, result: JobResult) {
        let deadline = Instant::now() + RESULT_DEADLINE;
        let mut backoff = Backoff::new();
        let mut newer_than = None;
        let (job_id, epoch, term) = (result.job_id, result.epoch, result.term);
        let msg = WorkerMsg::Result(result);
        loop {
            let Ok(live) = tokio::time::timeout_at(deadline, self.link.connected(newer_than)).await
            else {
                break;
            };
            let reply =
                tokio::time::timeout(REQUEST_TIMEOUT, wire::request(&live.conn, &msg)).await;
            let mut pause = true;
            match reply {
                Ok(Ok(CoordinatorToWorker::Ack(ack))) if ack.accepted => {
                    tracing::info!(coordinator = %live.coordinator, "result delivered");
                    return;
                }
                Ok(Ok(CoordinatorToWorker::Ack(ack))) => {
                    tracing::warn!(
                        job = job_id,
                        epoch,
                        term,
                        reason = %ack.reason,
                        "the leader refused the result (its lease is no longer this worker's); dropping it"
                    );
                    return;
                }
                Ok(Ok(CoordinatorToWorker::NotLeader(not))) => {
                    self.link.not_leader(&live, not.leader.as_deref());
                    newer_than = Some(live.generation);
                    pause = false;
                }
                Ok(Ok(CoordinatorToWorker::NoQuorum)) => {
                    tracing::debug!("the leader has no quorum; the result waits");
                }
                Ok(Ok(CoordinatorToWorker::Error(e)))
                    if !matches!(e.code, ErrorCode::Internal | ErrorCode::Overloaded) =>
                {
                    tracing::error!(code = ?e.code, message = %e.message, "the leader rejected the result; dropping it");
                    return;
                }
                Ok(Ok(CoordinatorToWorker::Error(e))) => {
                    tracing::warn!(code = ?e.code, message = %e.message, "the leader could not take the result; retrying");
                }
                Ok(Ok(other)) => {
                    tracing::warn!(
                        answer = kind(&other),
                        "unexpected answer to a result; retrying"
                    );
                }
                Ok(Err(e)) if e.is_connection_lost() => {
                    tracing::info!(error = %e, "connection lost while reporting; the result waits for the next leader");
                    newer_than = Some(live.generation);
                    pause = false;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "reporting the result failed; retrying"),
                Err(_) => {
                    // A live connection whose leader is slow (it commits results through
                    // Raft): ask again. A dead one is noticed by the session.
                    tracing::warn!("no answer to the result within {REQUEST_TIMEOUT:?}; retrying");
                }
            }
            if pause {
                let until = (Instant::now() + backoff.next_delay()).min(deadline);
                tokio::time::sleep_until(until).await;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        tracing::error!(
            job = job_id,
            epoch,
            term,
            "no leader took the result within {RESULT_DEADLINE:?}; giving it up"
        );
    }
}

fn accepted() -> JobAck {
    JobAck {
        accepted: true,
        reason: String::new(),
    }
}

fn declined(reason: String) -> JobAck {
    JobAck {
        accepted: false,
        reason,
    }
}

async fn answer(send: &mut quinn::SendStream, ack: JobAck) -> Result<(), WireError> {
    wire::write_frame(send, &WorkerMsg::Ack(ack)).await?;
    send.finish()?;
    Ok(())
}

/// Sends a job's progress events to the leader on one unidirectional stream, reopened on the
/// new connection after a reconnection, and finishes it when the job ends (`events` closes).
/// An event that finds no connection, or a stream that fails twice, is dropped.
async fn forward_progress(
    agent: Arc<Agent>,
    job_id: JobId,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    let mut stream: Option<(u64, quinn::SendStream)> = None;
    let mut dropped = 0usize;
    while let Some(event) = events.recv().await {
        let frame = WorkerMsg::Progress(JobProgress { job_id, event });
        let mut sent = false;
        for _ in 0..2 {
            let Some(live) = agent.link.current() else {
                break;
            };
            if stream.as_ref().is_none_or(|(g, _)| *g != live.generation) {
                stream = match tokio::time::timeout(REQUEST_TIMEOUT, live.conn.open_uni()).await {
                    Ok(Ok(s)) => Some((live.generation, s)),
                    _ => None,
                };
            }
            let Some((_, s)) = stream.as_mut() else {
                break;
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, wire::write_frame(s, &frame)).await {
                Ok(Ok(())) => {
                    sent = true;
                    break;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "progress stream broken"),
                Err(_) => tracing::debug!("progress stream stalled"),
            }
            stream = None;
        }
        if !sent {
            dropped += 1;
        }
    }
    if let Some((_, mut s)) = stream {
        let _ = s.finish();
    }
    if dropped > 0 {
        tracing::info!(
            dropped,
            "progress events lost (no connection to the leader)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_shared::dockerfile::{FrontendError, Range};
    use strata_shared::platform::Platform;

    #[test]
    fn backoff_doubles_up_to_two_seconds() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn failures_are_logged_once_per_address_per_minute() {
        let mut log = FailureLog::default();
        let a: SocketAddr = "127.0.0.1:7101".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7102".parse().unwrap();
        let t0 = std::time::Instant::now();
        assert!(log.should_log(a, t0));
        assert!(!log.should_log(a, t0 + Duration::from_secs(1)));
        assert!(
            log.should_log(b, t0 + Duration::from_secs(1)),
            "another address"
        );
        assert!(!log.should_log(a, t0 + Duration::from_secs(59)));
        assert!(log.should_log(a, t0 + Duration::from_secs(60)));
        assert!(!log.should_log(a, t0 + Duration::from_secs(61)));
        log.forget(a);
        assert!(
            log.should_log(a, t0 + Duration::from_secs(62)),
            "it worked in between"
        );
    }

    #[test]
    fn dialer_goes_round_the_list() {
        let list: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let mut d = Dialer {
            addresses: list.clone(),
            next: 0,
        };
        let got: Vec<SocketAddr> = (0..5).filter_map(|_| d.next_addr()).collect();
        assert_eq!(got, [list[0], list[1], list[0], list[1], list[0]]);
        d.start_after(list[0]);
        assert_eq!(d.next_addr(), Some(list[1]));
        d.start_after(list[1]);
        assert_eq!(d.next_addr(), Some(list[0]));
        d.start_after("10.0.0.1:1".parse().unwrap());
        assert_eq!(
            d.next_addr(),
            Some(list[1]),
            "an address off the list changes nothing"
        );
        let mut empty = Dialer {
            addresses: Vec::new(),
            next: 0,
        };
        assert_eq!(empty.next_addr(), None);
    }

    #[test]
    fn dialer_puts_the_members_first_and_keeps_the_configured() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let configured = [a("127.0.0.1:1"), a("127.0.0.1:2")];
        let mut d = Dialer {
            addresses: configured.to_vec(),
            next: 1,
        };
        d.learn(&[a("127.0.0.1:2"), a("127.0.0.1:4")], &configured);
        assert_eq!(
            d.addresses,
            [a("127.0.0.1:2"), a("127.0.0.1:4"), a("127.0.0.1:1")]
        );
        assert_eq!(
            d.next_addr(),
            Some(a("127.0.0.1:2")),
            "a new list starts over"
        );
        // A coordinator that names no members (still joining) changes nothing.
        d.learn(&[], &configured);
        assert_eq!(d.addresses[1], a("127.0.0.1:4"));
    }

    #[test]
    fn leaders_are_name_equals_address() {
        assert_eq!(
            parse_leader("c2=127.0.0.1:7102"),
            Some("127.0.0.1:7102".parse().unwrap())
        );
        assert_eq!(
            parse_leader("10.0.0.1:7400"),
            Some("10.0.0.1:7400".parse().unwrap())
        );
        assert_eq!(
            parse_leader("c3=[::1]:7103"),
            Some("[::1]:7103".parse().unwrap())
        );
        assert_eq!(parse_leader("c2"), None);
        assert_eq!(parse_leader("c2=coord-2:7102"), None);
        assert_eq!(parse_leader(""), None);
    }

    #[test]
    fn capabilities_as_strings() {
        let caps = Capabilities {
            native: vec!["linux/amd64/v3".parse::<Platform>().unwrap()],
            emulated: vec![
                "linux/arm64".parse().unwrap(),
                "linux/arm/v7".parse().unwrap(),
            ],
        };
        let (native, emulated) = capabilities_strings(&caps);
        assert_eq!(native, ["linux/amd64/v3"]);
        assert_eq!(emulated, ["linux/arm64", "linux/arm/v7"]);
    }

    /// A job of one stage, its context in the store.
    fn job(dockerfile: &str) -> StageJob {
        StageJob {
            id: 1,
            dockerfile: dockerfile.into(),
            dockerfile_name: "Dockerfile".into(),
            options: Default::default(),
            build_platform: "linux/amd64".parse().unwrap(),
            target_platform: "linux/amd64".parse().unwrap(),
            stage: 0,
            inputs: Default::default(),
            context: JobContext::Store("0".repeat(64)),
            show_platform: false,
            no_cache: false,
            secrets: Default::default(),
            dockerignore: None,
            allow_host_network: false,
            compression: Default::default(),
        }
    }

    #[test]
    fn dockerfile_errors_carry_their_line() {
        let mut df = job("FROM scratch\nCOPY missing.txt /\n");
        df.dockerfile_name = "Dockerfile.dev".into();
        let df = &df;
        let err = BuildError::Dockerfile(FrontendError::at(
            Range::new(2, 2),
            "COPY missing.txt: not found in the build context",
        ));
        let JobOutcome::Failed(message) = outcome_of(Err(err), df) else {
            panic!("an error is an Err outcome");
        };
        assert!(
            message.starts_with("Dockerfile.dev:2: COPY missing.txt"),
            "{message}"
        );
        assert!(message.contains("2 | COPY missing.txt /"), "{message}");
        let JobOutcome::Failed(message) = outcome_of(Err(BuildError::Other("boom".into())), df)
        else {
            panic!("an error is an Err outcome");
        };
        assert_eq!(message, "boom");
    }

    #[test]
    fn offers_naming_local_paths_or_secrets_are_declined_with_the_reason() {
        let job = job("FROM scratch\n");
        let offer = |job: StageJob| JobOffer {
            job_id: 1,
            epoch: 1,
            term: 1,
            deadline_ms: 0,
            job,
        };
        assert!(check_offer(&offer(job.clone())).is_ok());
        let local = StageJob {
            context: JobContext::Local("/etc".into()),
            ..job.clone()
        };
        let err = check_offer(&offer(local)).unwrap_err();
        assert!(
            err.contains("may not name a directory of this machine"),
            "{err}"
        );
        let secret = StageJob {
            secrets: [("id".to_string(), "/root/.ssh/id_rsa".to_string())].into(),
            ..job.clone()
        };
        let err = check_offer(&offer(secret)).unwrap_err();
        assert!(err.contains("may not carry secrets"), "{err}");
        let traversal = StageJob {
            context: JobContext::Store("../../etc".into()),
            ..job.clone()
        };
        assert!(check_offer(&offer(traversal)).is_err());
        let odd = StageJob {
            target_platform: strata_shared::platform::Platform {
                os: "linux".into(),
                architecture: "x86_64".into(),
                variant: String::new(),
            },
            ..job
        };
        let err = check_offer(&offer(odd)).unwrap_err();
        assert!(err.contains("normal form"), "{err}");
    }
}
