//! The worker agent against test coordinators: real QUIC on 127.0.0.1, real certificates from
//! `write_dev_pki`, a real engine and blob store. Each test coordinator is written here with
//! the wire helpers and plays the leader's (or a follower's) side of the worker protocol; it
//! reports everything the worker sends so that the tests can check it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::job::{Compression, JobContext, StageJob, StageOutput};
use strata_shared::platform::{Capabilities, Platform};
use strata_shared::store::BlobStore;
use strata_shared::tls::{self, ClientTokens, DevPki, Identity, Role};
use strata_shared::wire::{
    self, CancelJob, CoordinatorToWorker, Heartbeat, JobAck, JobId, JobOffer, JobOutcome,
    JobProgress, JobResult, NotLeader, RegisterWorker, Welcome, WorkerMsg,
};
use strata_worker::agent::{Agent, AgentError};
use strata_worker::config::{TlsConfig, WorkerConfig};
use strata_worker::context;
use strata_worker::hashcache::HashCache;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long any one expected thing may take to happen.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Collects the logs of every test of this binary (one global subscriber).
fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("strata_worker=debug")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    });
}

fn logs() -> String {
    LOGS.get()
        .map(|buf| {
            String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A test coordinator
// ---------------------------------------------------------------------------------------------

/// How the test coordinator answers.
#[derive(Debug, Clone)]
enum Mode {
    Leader,
    /// Answers everything with `NotLeader` naming this leader (`name=addr`).
    Follower(String),
}

/// How the leader answers a result.
#[derive(Debug, Clone)]
enum Results {
    Accept,
    /// Refuses it with this reason (a stale fencing token).
    Refuse(String),
    /// Closes the connection instead of answering a result that arrives on the first
    /// connection; accepts it on later ones.
    CloseFirst,
    /// Answers `NotLeader` naming this leader (`name=addr`): leadership moved just now.
    Moved(String),
}

/// What the worker sent, and on which connection (0 is the first one accepted).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Seen {
    Register(usize, RegisterWorker),
    Heartbeat(usize, Heartbeat),
    Progress(usize, JobProgress),
    /// A progress stream ended (finished by the worker), after progress of this job.
    ProgressEnd(usize, Option<JobId>),
    Result(usize, JobResult),
    /// The worker leaves: draining first (`true`), then gone.
    Leave(bool),
}

struct Shared {
    mode: Mutex<Mode>,
    results: Mutex<Results>,
    conns: Mutex<Vec<quinn::Connection>>,
    tx: mpsc::UnboundedSender<Seen>,
}

struct TestCoordinator {
    name: String,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl TestCoordinator {
    async fn start(pki: &Path, name: &str, mode: Mode) -> TestCoordinator {
        let ca = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
        let identity = Identity::load_from_dir(pki, Role::Coordinator, name).unwrap();
        let config = tls::server_config(&ca, &identity, true).unwrap();
        let endpoint = tls::server_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            results: Mutex::new(Results::Accept),
            conns: Mutex::new(Vec::new()),
            tx,
        });
        let (ep, sh) = (endpoint.clone(), shared.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(serve_connection(sh.clone(), incoming));
            }
        });
        TestCoordinator {
            name: name.to_string(),
            addr,
            endpoint,
            shared,
            seen,
        }
    }

    /// How `NotLeader` names this coordinator.
    fn as_leader(&self) -> String {
        format!("{}={}", self.name, self.addr)
    }

    fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    fn set_results(&self, results: Results) {
        *self.shared.results.lock().unwrap() = results;
    }

    fn conn(&self, index: usize) -> quinn::Connection {
        self.shared.conns.lock().unwrap()[index].clone()
    }

    /// The next thing the worker sends that `pick` wants (others are skipped).
    async fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(Seen) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(seen)) => {
                    if let Some(t) = pick(seen) {
                        return t;
                    }
                }
                Ok(None) => panic!("{}: the test coordinator stopped", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {WAIT:?}; worker logs:\n{}",
                    self.name,
                    logs()
                ),
            }
        }
    }

    /// Everything the worker sends within `d`.
    async fn drain_for(&mut self, d: Duration) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + d;
        let mut all = Vec::new();
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, self.seen.recv()).await {
            all.push(seen);
        }
        all
    }

    /// Sends a request on a new stream of connection `index` and reads the worker's answer.
    async fn ask(&self, index: usize, msg: CoordinatorToWorker) -> JobAck {
        let reply: WorkerMsg = tokio::time::timeout(WAIT, wire::request(&self.conn(index), &msg))
            .await
            .expect("the worker answers in time")
            .expect("the worker answers");
        match reply {
            WorkerMsg::Ack(ack) => ack,
            other => panic!("expected an Ack, got {other:?}"),
        }
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let Ok(conn) = tls::accept(incoming).await else {
        return;
    };
    let Ok(greeting) = wire::receive_hello(&conn, &ClientTokens::none()).await else {
        return;
    };
    assert_eq!(greeting.peer().role, Role::Worker);
    let welcome = Welcome {
        node_id: 1,
        leader: None,
        term: 1,
        members: Vec::new(),
    };
    if greeting.welcome(welcome).await.is_err() {
        return;
    }
    let index = {
        let mut conns = shared.conns.lock().unwrap();
        conns.push(conn.clone());
        conns.len() - 1
    };
    // Progress: unidirectional streams of frames.
    let (c, sh) = (conn.clone(), shared.clone());
    tokio::spawn(async move {
        while let Ok(mut recv) = c.accept_uni().await {
            let sh = sh.clone();
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    match wire::read_frame_or_eof::<WorkerMsg>(&mut recv).await {
                        Ok(Some(WorkerMsg::Progress(p))) => {
                            last = Some(p.job_id);
                            let _ = sh.tx.send(Seen::Progress(index, p));
                        }
                        Ok(Some(other)) => panic!("unexpected {other:?} on a progress stream"),
                        Ok(None) => {
                            let _ = sh.tx.send(Seen::ProgressEnd(index, last));
                            return;
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    // Requests: bidirectional streams, one request and one answer each.
    while let Ok(Some((mut send, mut recv))) = wire::accept_stream(&conn).await {
        let (conn, shared) = (conn.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(msg) = wire::read_frame::<WorkerMsg>(&mut recv).await else {
                return;
            };
            let mode = shared.mode.lock().unwrap().clone();
            let ack = CoordinatorToWorker::Ack(JobAck {
                accepted: true,
                reason: String::new(),
            });
            let reply = match (msg, mode) {
                (msg, Mode::Follower(leader)) => {
                    if let WorkerMsg::Register(r) = msg {
                        let _ = shared.tx.send(Seen::Register(index, r));
                    }
                    CoordinatorToWorker::NotLeader(NotLeader {
                        leader: Some(leader),
                    })
                }
                (WorkerMsg::Register(r), Mode::Leader) => {
                    let _ = shared.tx.send(Seen::Register(index, r));
                    ack
                }
                (WorkerMsg::Heartbeat(h), Mode::Leader) => {
                    let _ = shared.tx.send(Seen::Heartbeat(index, h));
                    ack
                }
                (WorkerMsg::Result(r), Mode::Leader) => {
                    let _ = shared.tx.send(Seen::Result(index, r));
                    let results = shared.results.lock().unwrap().clone();
                    match results {
                        Results::Accept => ack,
                        Results::Refuse(reason) => CoordinatorToWorker::Ack(JobAck {
                            accepted: false,
                            reason,
                        }),
                        Results::CloseFirst if index == 0 => {
                            conn.close(0u32.into(), b"test: the leader goes away");
                            return;
                        }
                        Results::CloseFirst => ack,
                        Results::Moved(leader) => CoordinatorToWorker::NotLeader(NotLeader {
                            leader: Some(leader),
                        }),
                    }
                }
                (WorkerMsg::Leave(l), Mode::Leader) => {
                    let _ = shared.tx.send(Seen::Leave(l.drain));
                    ack
                }
                (other, Mode::Leader) => panic!("unexpected request {other:?}"),
            };
            if wire::write_frame(&mut send, &reply).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The worker under test
// ---------------------------------------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
    pki: DevPki,
}

impl Setup {
    fn new() -> Setup {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let coordinators = [
            ("c1".to_string(), "127.0.0.1:7101".to_string()),
            ("c2".to_string(), "127.0.0.1:7102".to_string()),
        ];
        let pki = tls::write_dev_pki(&dir.path().join("pki"), &coordinators, &["w1".into()], &[])
            .unwrap();
        Setup { dir, pki }
    }

    fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn config(&self, coordinators: Vec<SocketAddr>) -> WorkerConfig {
        let files = self.pki.identity(Role::Worker, "w1").unwrap();
        WorkerConfig {
            name: "w1".into(),
            coordinators,
            data_dir: self.dir.path().join("worker"),
            store: self.store_dir(),
            capacity: 2,
            heartbeat_ms: 100,
            drain_ms: 0,
            labels: BTreeMap::from([("pool".to_string(), "test".to_string())]),
            tls: TlsConfig {
                ca: self.pki.ca_cert.clone(),
                cert: files.cert.clone(),
                key: files.key.clone(),
            },
        }
    }

    /// A job whose context (one file) is uploaded to the shared store:
    /// `FROM scratch` + `COPY hello.txt /hello.txt`.
    async fn tiny_job(&self) -> StageJob {
        let ctx = self.dir.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("hello.txt"), "hello from a cluster job\n").unwrap();
        let store = BlobStore::local(&self.store_dir()).unwrap();
        let uploaded = context::upload(&store, &ctx, None, Arc::new(HashCache::in_memory()))
            .await
            .unwrap();
        let host = Platform::host();
        StageJob {
            id: 0,
            dockerfile: "FROM scratch\nCOPY hello.txt /hello.txt\n".into(),
            dockerfile_name: "Dockerfile".into(),
            options: BuildOptions::default(),
            build_platform: host.clone(),
            target_platform: host,
            stage: 0,
            inputs: BTreeMap::new(),
            context: JobContext::Store(uploaded.id),
            show_platform: false,
            no_cache: false,
            secrets: BTreeMap::new(),
            dockerignore: None,
            allow_host_network: false,
            compression: Compression::Gzip,
        }
    }
}

/// A job that does not end by itself: its base image is on a "registry" that accepts
/// connections and never answers (the engine waits for it far longer than a test runs).
fn hanging_job(registry: SocketAddr) -> StageJob {
    let host = Platform::host();
    StageJob {
        id: 0,
        dockerfile: format!("FROM {registry}/hang:1\nRUN true\n"),
        dockerfile_name: "Dockerfile".into(),
        options: BuildOptions::default(),
        build_platform: host.clone(),
        target_platform: host,
        stage: 0,
        inputs: BTreeMap::new(),
        context: JobContext::None,
        show_platform: false,
        no_cache: false,
        secrets: BTreeMap::new(),
        dockerignore: None,
        allow_host_network: false,
        compression: Compression::Gzip,
    }
}

fn caps() -> Capabilities {
    Capabilities {
        native: vec!["linux/amd64/v3".parse().unwrap()],
        emulated: vec!["linux/arm64".parse().unwrap()],
    }
}

fn offer(job_id: JobId, epoch: u64, term: u64, job: &StageJob) -> CoordinatorToWorker {
    CoordinatorToWorker::Offer(JobOffer {
        job_id,
        epoch,
        term,
        deadline_ms: 0,
        job: job.clone(),
    })
}

struct RunningWorker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl RunningWorker {
    async fn start(config: WorkerConfig) -> RunningWorker {
        let agent = Agent::open_with(&config, caps()).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        RunningWorker {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the worker stops in time")
            .expect("the worker task does not panic")
            .expect("the worker stops cleanly");
    }
}

fn stage_output(result: &JobResult) -> StageOutput {
    match &result.outcome {
        JobOutcome::Built(output) => output.clone(),
        JobOutcome::Failed(e) => panic!("the job failed: {e}\nworker logs:\n{}", logs()),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_and_answers_requests() {
    let setup = Setup::new();
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await;

    let reg = c1
        .expect("Register", |s| match s {
            Seen::Register(i, r) => Some((i, r)),
            _ => None,
        })
        .await;
    assert_eq!(
        reg,
        (
            0,
            RegisterWorker {
                name: "w1".into(),
                native: vec!["linux/amd64/v3".into()],
                emulated: vec!["linux/arm64".into()],
                capacity: 2,
                labels: vec![("pool".into(), "test".into())],
            }
        )
    );
    for _ in 0..3 {
        let hb = c1
            .expect("Heartbeat", |s| match s {
                Seen::Heartbeat(0, h) => Some(h),
                _ => None,
            })
            .await;
        assert_eq!(hb.worker, "w1");
        assert!(hb.running.is_empty(), "{hb:?}");
    }

    // Requests the worker cannot take are declined with the reason.
    let mut local = hanging_job("127.0.0.1:9".parse().unwrap());
    local.context = JobContext::Local("/".into());
    let ack = c1.ask(0, offer(1, 1, 1, &local)).await;
    assert!(!ack.accepted);
    assert!(ack.reason.contains("invalid job"), "{}", ack.reason);
    let ack = c1
        .ask(
            0,
            CoordinatorToWorker::Cancel(CancelJob {
                job_id: 99,
                epoch: 1,
            }),
        )
        .await;
    assert!(!ack.accepted);
    assert!(
        ack.reason.contains("job 99 does not run here"),
        "{}",
        ack.reason
    );

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_the_worker_to_the_leader() {
    let setup = Setup::new();
    let mut c2 = TestCoordinator::start(&setup.pki_dir(), "c2", Mode::Leader).await;
    let mut c1 =
        TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Follower(c2.as_leader())).await;
    // The worker only knows the follower.
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await;

    c1.expect("Register on the follower", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;
    c2.expect("Register on the leader", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;
    c2.expect("Heartbeat on the leader", |s| match s {
        Seen::Heartbeat(..) => Some(()),
        _ => None,
    })
    .await;

    // Leadership moves to c1: the next heartbeat to c2 is answered NotLeader and the worker
    // registers with c1.
    c1.set_mode(Mode::Leader);
    c2.set_mode(Mode::Follower(c1.as_leader()));
    c1.expect("Register on the new leader", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;
    let hb = c1
        .expect("Heartbeat on the new leader", |s| match s {
            Seen::Heartbeat(_, h) => Some(h),
            _ => None,
        })
        .await;
    assert_eq!(hb.worker, "w1");

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offered_job_runs_streams_progress_and_reports_its_result() {
    let setup = Setup::new();
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await;
    c1.expect("Register", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;

    let job = setup.tiny_job().await;
    let ack = c1.ask(0, offer(42, 3, 2, &job)).await;
    assert!(ack.accepted, "{}", ack.reason);

    // Progress arrives on one unidirectional stream, finished when the job ends; the result
    // on a stream of its own (the two may arrive in either order).
    let mut events = Vec::new();
    let (mut result, mut ended) = (None, false);
    while result.is_none() || !ended {
        match c1
            .expect("progress and the result", |s| match s {
                Seen::Heartbeat(..) => None,
                other => Some(other),
            })
            .await
        {
            Seen::Progress(0, p) => {
                assert_eq!(p.job_id, 42);
                assert!(!ended, "progress after the end of the stream");
                events.push(p.event);
            }
            Seen::ProgressEnd(0, job) => {
                assert_eq!(job, Some(42));
                ended = true;
            }
            Seen::Result(0, r) => result = Some(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        events.iter().any(|e| matches!(
            e,
            strata_shared::progress::Event::Started { text, .. } if text.contains("COPY hello.txt")
        )),
        "{events:#?}"
    );

    let result = result.expect("a result");
    assert_eq!((result.job_id, result.epoch, result.term), (42, 3, 2));
    let output = stage_output(&result);
    assert_eq!(output.layers.len(), 1, "{output:?}");
    let store = BlobStore::local(&setup.store_dir()).unwrap();
    assert!(store.has(&output.layers[0].blake3).await.unwrap());

    // The job is no longer held once its result is accepted.
    c1.expect("a heartbeat without the job", |s| match s {
        Seen::Heartbeat(_, h) if h.running.is_empty() => Some(()),
        _ => None,
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_result_is_logged_and_dropped() {
    let setup = Setup::new();
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    let reason = "stale fencing token: job 7 was leased again as epoch 2 (term 1)";
    c1.set_results(Results::Refuse(reason.into()));
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await;
    c1.expect("Register", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;

    let job = setup.tiny_job().await;
    assert!(c1.ask(0, offer(7, 1, 1, &job)).await.accepted);
    let result = c1
        .expect("the result", |s| match s {
            Seen::Result(_, r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!((result.job_id, result.epoch, result.term), (7, 1, 1));

    // Dropped: never sent again, and no longer held.
    let later = c1.drain_for(Duration::from_secs(1)).await;
    assert!(
        !later.iter().any(|s| matches!(s, Seen::Result(..))),
        "the refused result was sent again: {later:?}"
    );
    assert!(
        later
            .iter()
            .any(|s| matches!(s, Seen::Heartbeat(_, h) if h.running.is_empty())),
        "{later:?}"
    );
    let text = logs();
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("refused the result") && l.contains(reason)),
        "{text}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_result_survives_a_lost_connection() {
    let setup = Setup::new();
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    // A result that reaches the first connection is not answered: that connection closes.
    c1.set_results(Results::CloseFirst);
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await;
    c1.expect("Register", |s| match s {
        Seen::Register(0, _) => Some(()),
        _ => None,
    })
    .await;

    let job = setup.tiny_job().await;
    assert!(c1.ask(0, offer(9, 4, 3, &job)).await.accepted);
    // The leader goes away while the job runs.
    c1.conn(0).close(0u32.into(), b"test: the leader restarts");

    c1.expect("Register on a new connection", |s| match s {
        Seen::Register(i, _) if i > 0 => Some(()),
        _ => None,
    })
    .await;
    let (index, result) = c1
        .expect("the result on the new connection", |s| match s {
            Seen::Result(i, r) if i > 0 => Some((i, r)),
            _ => None,
        })
        .await;
    assert!(index > 0);
    assert_eq!((result.job_id, result.epoch, result.term), (9, 4, 3));
    assert_eq!(stage_output(&result).layers.len(), 1);
    c1.expect("a heartbeat without the job", |s| match s {
        Seen::Heartbeat(i, h) if i == index && h.running.is_empty() => Some(()),
        _ => None,
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_follows_the_leader_it_is_sent_to() {
    let setup = Setup::new();
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    let mut c2 = TestCoordinator::start(&setup.pki_dir(), "c2", Mode::Leader).await;
    // c1 learns it lost the leadership when the result reaches it.
    c1.set_results(Results::Moved(c2.as_leader()));
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await;
    c1.expect("Register", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;

    let job = setup.tiny_job().await;
    assert!(c1.ask(0, offer(11, 2, 5, &job)).await.accepted);
    c1.expect("the result on the old leader", |s| match s {
        Seen::Result(_, r) => Some(r),
        _ => None,
    })
    .await;
    c2.expect("Register on the new leader", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;
    let result = c2
        .expect("the result on the new leader", |s| match s {
            Seen::Result(_, r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!((result.job_id, result.epoch, result.term), (11, 2, 5));
    assert_eq!(stage_output(&result).layers.len(), 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_bounds_the_jobs_taken_and_cancel_stops_one() {
    let setup = Setup::new();
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let job = hanging_job(registry.local_addr().unwrap());
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    let worker = RunningWorker::start(setup.config(vec![c1.addr])).await; // capacity 2
    c1.expect("Register", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;

    assert!(c1.ask(0, offer(1, 1, 1, &job)).await.accepted);
    assert!(c1.ask(0, offer(2, 1, 1, &job)).await.accepted);
    // The same lease offered again is taken without running it twice.
    assert!(c1.ask(0, offer(2, 1, 1, &job)).await.accepted);
    let full = c1.ask(0, offer(3, 1, 1, &job)).await;
    assert!(!full.accepted);
    assert!(
        full.reason.contains("no free slot: 2 of 2"),
        "{}",
        full.reason
    );
    c1.expect("a heartbeat with both jobs", |s| match s {
        Seen::Heartbeat(_, h) if h.running == [1, 2] => Some(()),
        _ => None,
    })
    .await;

    let stale = c1
        .ask(
            0,
            CoordinatorToWorker::Cancel(CancelJob {
                job_id: 2,
                epoch: 0,
            }),
        )
        .await;
    assert!(
        !stale.accepted,
        "a cancel of an older epoch leaves the job alone"
    );
    let cancelled = c1
        .ask(
            0,
            CoordinatorToWorker::Cancel(CancelJob {
                job_id: 1,
                epoch: 1,
            }),
        )
        .await;
    assert!(cancelled.accepted, "{}", cancelled.reason);
    c1.expect("a heartbeat without the cancelled job", |s| match s {
        Seen::Heartbeat(_, h) if h.running == [2] => Some(()),
        _ => None,
    })
    .await;
    // Its slot is free again.
    assert!(c1.ask(0, offer(3, 1, 1, &job)).await.accepted);
    let later = c1.drain_for(Duration::from_millis(500)).await;
    assert!(
        !later.iter().any(|s| matches!(s, Seen::Result(..))),
        "a cancelled job reports nothing: {later:?}"
    );
    worker.stop().await;
    drop(registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_drains_declines_offers_then_hands_its_jobs_back() {
    let setup = Setup::new();
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let job = hanging_job(registry.local_addr().unwrap());
    let mut c1 = TestCoordinator::start(&setup.pki_dir(), "c1", Mode::Leader).await;
    let mut config = setup.config(vec![c1.addr]);
    config.drain_ms = 1500;
    let worker = RunningWorker::start(config).await;
    c1.expect("Register", |s| match s {
        Seen::Register(..) => Some(()),
        _ => None,
    })
    .await;
    assert!(c1.ask(0, offer(1, 1, 1, &job)).await.accepted);

    // Told to stop, it first drains: the leader hears so, and new offers are declined.
    let stopping = tokio::spawn(worker.stop());
    c1.expect("a drain", |s| match s {
        Seen::Leave(true) => Some(()),
        _ => None,
    })
    .await;
    let declined = c1.ask(0, offer(2, 1, 1, &job)).await;
    assert!(
        !declined.accepted && declined.reason.contains("shutting down"),
        "{}",
        declined.reason
    );
    // The job never finishes: once the drain time is up, it is handed back.
    let started = std::time::Instant::now();
    c1.expect("the hand-back", |s| match s {
        Seen::Leave(false) => Some(()),
        _ => None,
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "it waited for the drain time: {:?}",
        started.elapsed()
    );
    stopping.await.unwrap();
    drop(registry);
}
