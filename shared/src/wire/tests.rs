//! The wire and the PKI together, over real QUIC connections on 127.0.0.1 with real
//! certificates: every message kind round-trips, bad frames are clear errors, the handshake
//! admits exactly who it should.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use super::*;
use crate::tls::{
    self, ClientTokens, ClusterCa, Identity, PeerIdentity, Role, TlsError, client_config,
    server_config,
};

const LOCALHOST: &str = "127.0.0.1:0";

fn localhost() -> SocketAddr {
    LOCALHOST.parse().unwrap()
}

struct Pki {
    ca: ClusterCa,
    coordinator: Identity,
}

fn pki() -> Pki {
    logs();
    let ca = ClusterCa::generate("wire test CA").unwrap();
    let coordinator = ca
        .issue(Role::Coordinator, "coord-1", &["127.0.0.1".into()])
        .unwrap();
    Pki { ca, coordinator }
}

fn server(pki: &Pki, require_client_auth: bool) -> quinn::Endpoint {
    let config = server_config(pki.ca.cert_pem(), &pki.coordinator, require_client_auth).unwrap();
    tls::server_endpoint(localhost(), config).unwrap()
}

fn client(ca_pem: &str, identity: Option<&Identity>) -> quinn::Endpoint {
    tls::client_endpoint(localhost(), client_config(ca_pem, identity).unwrap()).unwrap()
}

async fn accept(server: &quinn::Endpoint) -> Result<quinn::Connection, TlsError> {
    let incoming = server.accept().await.expect("endpoint open");
    tls::accept(incoming).await
}

/// Dials `server` and completes the handshake on both sides.
async fn connected(
    server: &quinn::Endpoint,
    client: &quinn::Endpoint,
) -> (quinn::Connection, quinn::Connection) {
    let addr = server.local_addr().unwrap();
    let (client_conn, server_conn) =
        tokio::join!(tls::connect(client, addr, "coord-1"), accept(server));
    (client_conn.unwrap(), server_conn.unwrap())
}

fn welcome() -> Welcome {
    Welcome {
        node_id: 1,
        leader: Some("10.0.0.1:7400".into()),
        term: 3,
        members: vec!["10.0.0.1:7400".into(), "10.0.0.2:7400".into()],
    }
}

// ---------------------------------------------------------------------------------------------
// Every message kind through mutual TLS
// ---------------------------------------------------------------------------------------------

/// Reads one frame of `T` and sends it back: the stream's first frame (a `String`) said which.
async fn echo<T: WireMessage>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), WireError> {
    let msg: T = read_frame(recv).await?;
    write_frame(send, &msg).await
}

/// A server that echoes any of the conversation enums, decoding and re-encoding each.
async fn serve_echo(conn: quinn::Connection) -> Result<(), WireError> {
    while let Some((mut send, mut recv)) = accept_stream(&conn).await? {
        tokio::spawn(async move {
            let kind: String = read_frame(&mut recv).await?;
            match kind.as_str() {
                "Hello" => echo::<Hello>(&mut send, &mut recv).await?,
                "HelloReply" => echo::<HelloReply>(&mut send, &mut recv).await?,
                "PeerMsg" => echo::<PeerMsg>(&mut send, &mut recv).await?,
                "WorkerMsg" => echo::<WorkerMsg>(&mut send, &mut recv).await?,
                "CoordinatorToWorker" => echo::<CoordinatorToWorker>(&mut send, &mut recv).await?,
                "ClientMsg" => echo::<ClientMsg>(&mut send, &mut recv).await?,
                "CoordinatorToClient" => echo::<CoordinatorToClient>(&mut send, &mut recv).await?,
                other => panic!("unknown kind {other}"),
            }
            send.finish()?;
            Ok::<_, WireError>(())
        });
    }
    Ok(())
}

async fn round_trip<T>(conn: &quinn::Connection, kind: &str, msg: &T) -> T
where
    T: WireMessage,
{
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &kind.to_string()).await.unwrap();
    write_frame(&mut send, msg).await.unwrap();
    send.finish().unwrap();
    let back: T = read_frame(&mut recv).await.unwrap();
    assert!(
        read_frame_or_eof::<T>(&mut recv).await.unwrap().is_none(),
        "one reply frame"
    );
    back
}

const STEP_FAILED: &str = "process \"/bin/sh -c make\" did not complete successfully: exit code: 2";

fn platform(s: &str) -> crate::platform::Platform {
    s.parse().unwrap()
}

/// A stage output with every kind of field filled.
pub(crate) fn sample_output() -> crate::job::StageOutput {
    use crate::oci::{EmptyObject, HealthConfig, History, ImageConfig};
    use crate::store::BlobMeta;
    let mut config = ImageConfig::empty(&platform("linux/arm64"));
    config.config.cmd = Some(vec!["/bin/sh".into(), "-c".into(), "make".into()]);
    config.config.exposed_ports = Some([("80/tcp".to_string(), EmptyObject)].into());
    config.config.labels = Some([("team".to_string(), "build".to_string())].into());
    config.config.healthcheck = Some(HealthConfig {
        test: vec!["CMD".into(), "true".into()],
        interval: 5_000_000_000,
        ..Default::default()
    });
    config
        .rootfs
        .diff_ids
        .push(format!("sha256:{}", "d".repeat(64)));
    config.history.push(History {
        created_by: "RUN make # buildkit".into(),
        comment: "buildkit.dockerfile.v0".into(),
        ..Default::default()
    });
    crate::job::StageOutput {
        config,
        layers: vec![BlobMeta {
            version: 1,
            blake3: "b".repeat(64),
            digest: format!("sha256:{}", "a".repeat(64)),
            media_type: crate::oci::MEDIA_OCI_LAYER_GZIP.into(),
            size: 1234,
            diff_id: Some(format!("sha256:{}", "d".repeat(64))),
        }],
        key: "c".repeat(64),
        env: vec![("PATH".into(), "/bin".into())],
        declared: vec![
            ("VERSION".into(), Some("1.2".into())),
            ("EMPTY".into(), None),
        ],
    }
}

/// A stage job with every kind of field filled.
pub(crate) fn sample_job() -> crate::job::StageJob {
    crate::job::StageJob {
        id: 5,
        dockerfile: "FROM busybox AS base\nFROM base\nRUN make\n".into(),
        dockerfile_name: "Dockerfile.dev".into(),
        options: crate::dockerfile::stages::BuildOptions {
            build_args: [("VERSION".to_string(), "1.2".to_string())].into(),
            target: Some("base".into()),
        },
        build_platform: platform("linux/amd64"),
        target_platform: platform("linux/arm/v7"),
        stage: 1,
        inputs: [(0, sample_output())].into(),
        context: crate::job::JobContext::Store("e".repeat(64)),
        show_platform: true,
        no_cache: false,
        secrets: Default::default(),
        dockerignore: Some("*.log\n!keep.log\n".into()),
        allow_host_network: false,
        compression: crate::job::Compression::Zstd,
    }
}

/// A build request with every kind of field filled.
pub(crate) fn sample_request() -> crate::job::BuildRequest {
    crate::job::BuildRequest {
        dockerfile: "FROM busybox\nRUN true\n".into(),
        dockerfile_name: "Dockerfile".into(),
        context: crate::job::JobContext::Store("e".repeat(64)),
        secrets: Default::default(),
        dockerignore: None,
        options: Default::default(),
        platforms: vec![platform("linux/amd64"), platform("linux/arm64")],
        no_cache: true,
        allow_host_network: false,
        compression: crate::job::Compression::Gzip,
        emulation: crate::platform::Emulation::Deny,
        tenant: "team-a".into(),
    }
}

fn events() -> Vec<crate::progress::Event> {
    use crate::progress::Event;
    vec![
        Event::Started {
            job: 1,
            label: "linux/arm64 build".into(),
            n: 2,
            m: 3,
            text: "RUN make".into(),
        },
        Event::Output {
            job: 1,
            n: 2,
            data: "hello\n".into(),
        },
        Event::Cached { job: 1, n: 1 },
        Event::Done {
            job: 1,
            n: 2,
            elapsed: std::time::Duration::from_millis(1250),
        },
        Event::Failed {
            job: 1,
            n: 3,
            message: STEP_FAILED.into(),
        },
        Event::Note {
            text: "exported".into(),
        },
    ]
}

#[tokio::test]
async fn every_message_kind_round_trips_over_mutual_tls() {
    let pki = pki();
    let server = server(&pki, true);
    let peer = pki.ca.issue(Role::Coordinator, "coord-2", &[]).unwrap();
    let client = client(pki.ca.cert_pem(), Some(&peer));
    let (client_conn, server_conn) = connected(&server, &client).await;
    assert_eq!(
        tls::peer_identity(&server_conn),
        Some(PeerIdentity {
            role: Role::Coordinator,
            name: "coord-2".into()
        })
    );
    // The client sees the server's certificate too.
    assert_eq!(
        tls::peer_identity(&client_conn).map(|p| p.name),
        Some("coord-1".into())
    );
    let echo = tokio::spawn(serve_echo(server_conn.clone()));

    let hellos = [
        Hello {
            role: Role::Coordinator,
            name: "coord-2".into(),
            token: None,
        },
        Hello {
            role: Role::Client,
            name: "ci".into(),
            token: Some("t0ken".into()),
        },
    ];
    for msg in &hellos {
        assert_eq!(&round_trip(&client_conn, "Hello", msg).await, msg);
    }
    let replies = [
        HelloReply::Welcome(welcome()),
        HelloReply::Welcome(Welcome {
            node_id: 2,
            leader: None,
            term: 0,
            members: Vec::new(),
        }),
        HelloReply::Refused(Refused {
            reason: "invalid token".into(),
        }),
    ];
    for msg in &replies {
        assert_eq!(&round_trip(&client_conn, "HelloReply", msg).await, msg);
    }
    let peers = [
        PeerMsg::Raft(RaftMessage {
            from: 1,
            to: 2,
            bytes: (0..=255).collect(),
        }),
        PeerMsg::Raft(RaftMessage {
            from: u64::MAX,
            to: 0,
            bytes: Vec::new(),
        }),
        PeerMsg::Removed(RemovedNotice {
            from: 2,
            removed: 1,
            applied_index: 42,
        }),
    ];
    for msg in &peers {
        assert_eq!(&round_trip(&client_conn, "PeerMsg", msg).await, msg);
    }
    let mut workers = vec![
        WorkerMsg::Leave(LeaveCluster { drain: true }),
        WorkerMsg::Register(RegisterWorker {
            name: "w1".into(),
            native: vec!["linux/amd64".into()],
            emulated: vec!["linux/arm64".into(), "linux/arm/v7".into()],
            capacity: 8,
            labels: vec![
                ("zone".into(), "eu-1".into()),
                ("ssd".into(), String::new()),
            ],
        }),
        WorkerMsg::Heartbeat(Heartbeat {
            worker: "w1".into(),
            running: vec![1, 5, 9],
        }),
        WorkerMsg::Ack(JobAck {
            accepted: false,
            reason: "no capacity".into(),
        }),
    ];
    for event in events() {
        workers.push(WorkerMsg::Progress(JobProgress { job_id: 5, event }));
    }
    for outcome in [
        JobOutcome::Built(sample_output()),
        JobOutcome::Failed(STEP_FAILED.into()),
    ] {
        workers.push(WorkerMsg::Result(JobResult {
            job_id: 5,
            epoch: 2,
            term: 3,
            outcome,
        }));
    }
    for msg in &workers {
        assert_eq!(&round_trip(&client_conn, "WorkerMsg", msg).await, msg);
    }
    let to_workers = [
        CoordinatorToWorker::Offer(JobOffer {
            job_id: 5,
            epoch: 2,
            term: 3,
            deadline_ms: 1_700_000_000_000,
            job: sample_job(),
        }),
        CoordinatorToWorker::Cancel(CancelJob {
            job_id: 5,
            epoch: 2,
        }),
        CoordinatorToWorker::Ack(JobAck {
            accepted: true,
            reason: String::new(),
        }),
        CoordinatorToWorker::NotLeader(NotLeader {
            leader: Some("10.0.0.2:7400".into()),
        }),
        CoordinatorToWorker::NotLeader(NotLeader { leader: None }),
        CoordinatorToWorker::NoQuorum,
        CoordinatorToWorker::Error(ErrorReply {
            code: ErrorCode::Forbidden,
            message: "clients cannot register".into(),
        }),
    ];
    for msg in &to_workers {
        assert_eq!(
            &round_trip(&client_conn, "CoordinatorToWorker", msg).await,
            msg
        );
    }
    let clients = [
        ClientMsg::Submit(SubmitBuild {
            request: sample_request(),
        }),
        ClientMsg::Watch(WatchBuild {
            build_id: 42,
            from_event: 17,
        }),
        ClientMsg::Cancel(CancelBuild { build_id: 42 }),
        ClientMsg::Status(StatusRequest {}),
        ClientMsg::Membership(MembershipRequest::Add {
            id: 4,
            name: "c4".into(),
            addr: "127.0.0.1:7104".into(),
        }),
        ClientMsg::Membership(MembershipRequest::Remove { id: 2 }),
    ];
    for msg in &clients {
        assert_eq!(&round_trip(&client_conn, "ClientMsg", msg).await, msg);
    }
    let mut to_clients = vec![
        CoordinatorToClient::Accepted(BuildAccepted { build_id: 42 }),
        CoordinatorToClient::Membership(MembershipReply {
            voters: vec![1, 3, 4],
            learners: Vec::new(),
            message: "coordinator 2 removed".into(),
        }),
        CoordinatorToClient::Status(StatusReply {
            nodes: vec![NodeStatus {
                id: 1,
                name: "coord-1".into(),
                addr: "10.0.0.1:7400".into(),
                state: RaftState::Leader,
                term: 3,
                commit_index: 100,
                applied_index: 99,
                reachable: true,
            }],
            leader: Some("10.0.0.1:7400".into()),
            workers: vec![WorkerStatus {
                name: "w1".into(),
                state: "draining".into(),
                native: vec!["linux/amd64".into()],
                emulated: Vec::new(),
                capacity: 4,
                running: vec![5],
                last_seen_ms: Some(250),
                labels: vec![("zone".into(), "eu-1".into())],
            }],
            queue: vec![BuildStatus {
                build_id: 42,
                submitter: "ci".into(),
                state: "running".into(),
                jobs_total: 5,
                jobs_done: 2,
                submitted_ms: 1_700_000_000_000,
            }],
        }),
        CoordinatorToClient::Status(StatusReply {
            nodes: Vec::new(),
            leader: None,
            workers: Vec::new(),
            queue: Vec::new(),
        }),
        CoordinatorToClient::NotLeader(NotLeader {
            leader: Some("10.0.0.3:7400".into()),
        }),
        CoordinatorToClient::NoQuorum,
        CoordinatorToClient::Error(ErrorReply {
            code: ErrorCode::BadRequest,
            message: "no such target stage: prod".into(),
        }),
    ];
    for (seq, event) in events().into_iter().enumerate() {
        to_clients.push(CoordinatorToClient::Event(BuildEvent {
            seq: seq as u64,
            event,
        }));
    }
    let image = crate::job::TargetImage {
        platform: platform("linux/arm64"),
        output: sample_output(),
    };
    for result in [
        BuildOutcome::Built(vec![image]),
        BuildOutcome::Failed(STEP_FAILED.into()),
    ] {
        to_clients.push(CoordinatorToClient::Done(BuildDone {
            build_id: 42,
            result,
        }));
    }
    for msg in &to_clients {
        assert_eq!(
            &round_trip(&client_conn, "CoordinatorToClient", msg).await,
            msg
        );
    }

    // A message bigger than a QUIC flow-control window, through the same path.
    let big = PeerMsg::Raft(RaftMessage {
        from: 1,
        to: 2,
        bytes: (0..5_000_000u32).map(|i| i as u8).collect(),
    });
    assert_eq!(round_trip(&client_conn, "PeerMsg", &big).await, big);

    client_conn.close(0u32.into(), b"done");
    echo.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The serve pattern: a small coordinator answering clients
// ---------------------------------------------------------------------------------------------

/// How a coordinator serves clients: one task per stream, one request per stream, one or more
/// answers.
async fn serve_clients(conn: quinn::Connection) -> Result<(), WireError> {
    while let Some((mut send, mut recv)) = accept_stream(&conn).await? {
        tokio::spawn(async move {
            let request: ClientMsg = read_frame(&mut recv).await?;
            match request {
                ClientMsg::Submit(submit) => {
                    let answer = if !submit.request.dockerfile.is_empty() {
                        CoordinatorToClient::Accepted(BuildAccepted { build_id: 42 })
                    } else {
                        CoordinatorToClient::Error(ErrorReply {
                            code: ErrorCode::BadRequest,
                            message: "no Dockerfile".into(),
                        })
                    };
                    write_frame(&mut send, &answer).await?;
                }
                ClientMsg::Watch(watch) => {
                    for seq in watch.from_event..5 {
                        let event = CoordinatorToClient::Event(BuildEvent {
                            seq,
                            event: crate::progress::Event::Note {
                                text: format!("event {seq}"),
                            },
                        });
                        write_frame(&mut send, &event).await?;
                    }
                    let done = CoordinatorToClient::Done(BuildDone {
                        build_id: watch.build_id,
                        result: BuildOutcome::Built(Vec::new()),
                    });
                    write_frame(&mut send, &done).await?;
                }
                ClientMsg::Cancel(_) | ClientMsg::Membership(_) => {
                    write_frame(&mut send, &CoordinatorToClient::NoQuorum).await?;
                }
                ClientMsg::Status(_) => {
                    let leader = Some("127.0.0.1:7400".to_string());
                    let status = CoordinatorToClient::Status(StatusReply {
                        nodes: Vec::new(),
                        leader,
                        workers: Vec::new(),
                        queue: Vec::new(),
                    });
                    write_frame(&mut send, &status).await?;
                }
            }
            send.finish()?;
            Ok::<_, WireError>(())
        });
    }
    Ok(())
}

#[tokio::test]
async fn serve_pattern_answers_requests_and_streams_events() {
    let pki = pki();
    let server = server(&pki, false);
    let tokens = ClientTokens::new(["s3cret"]);
    let client = client(pki.ca.cert_pem(), None);

    let addr = server.local_addr().unwrap();
    let coordinator = tokio::spawn(async move {
        let conn = accept(&server).await.unwrap();
        let greeting = receive_hello(&conn, &tokens).await.unwrap();
        greeting.welcome(welcome()).await.unwrap();
        serve_clients(conn).await.unwrap();
        server
    });

    let conn = tls::connect(&client, addr, "coord-1").await.unwrap();
    let hello = Hello {
        role: Role::Client,
        name: "ci".into(),
        token: Some("s3cret".into()),
    };
    assert_eq!(send_hello(&conn, &hello).await.unwrap(), welcome());

    let submit = ClientMsg::Submit(SubmitBuild {
        request: sample_request(),
    });
    let answer: CoordinatorToClient = request(&conn, &submit).await.unwrap();
    assert_eq!(
        answer,
        CoordinatorToClient::Accepted(BuildAccepted { build_id: 42 })
    );
    let bad = ClientMsg::Submit(SubmitBuild {
        request: crate::job::BuildRequest {
            dockerfile: String::new(),
            ..sample_request()
        },
    });
    let answer: CoordinatorToClient = request(&conn, &bad).await.unwrap();
    assert!(
        matches!(
            answer,
            CoordinatorToClient::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                ..
            })
        ),
        "{answer:?}"
    );

    // Requests on one connection run concurrently, each on its own stream.
    let status = ClientMsg::Status(StatusRequest {});
    let (a, b) = tokio::join!(
        request::<CoordinatorToClient>(&conn, &status),
        request::<CoordinatorToClient>(&conn, &submit)
    );
    assert!(matches!(a.unwrap(), CoordinatorToClient::Status(_)));
    assert!(matches!(b.unwrap(), CoordinatorToClient::Accepted(_)));

    let watch = ClientMsg::Watch(WatchBuild {
        build_id: 42,
        from_event: 2,
    });
    let mut events = send_request(&conn, &watch).await.unwrap();
    let mut seqs = Vec::new();
    let mut done = None;
    while let Some(msg) = read_frame_or_eof::<CoordinatorToClient>(&mut events)
        .await
        .unwrap()
    {
        match msg {
            CoordinatorToClient::Event(event) => seqs.push(event.seq),
            CoordinatorToClient::Done(end) => done = Some(end),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, [2, 3, 4]);
    assert_eq!(done.unwrap().result, BuildOutcome::Built(Vec::new()));

    conn.close(0u32.into(), b"bye");
    // The server's accept loop ends normally when the client closes.
    let server = coordinator.await.unwrap();
    server.close(0u32.into(), b"");
}

// ---------------------------------------------------------------------------------------------
// Bad frames over QUIC
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_frames_over_quic_are_clear_errors() {
    let pki = pki();
    let server = server(&pki, true);
    let worker = pki.ca.issue(Role::Worker, "w1", &[]).unwrap();
    let client = client(pki.ca.cert_pem(), Some(&worker));
    let (client_conn, server_conn) = connected(&server, &client).await;

    let valid = {
        let mut out = Vec::new();
        let msg = WorkerMsg::Heartbeat(Heartbeat {
            worker: "w1".into(),
            running: vec![1, 2, 3],
        });
        write_frame(&mut out, &msg).await.unwrap();
        out
    };
    let mut wrong_version = valid.clone();
    wrong_version[4..6].copy_from_slice(&(WIRE_VERSION + 1).to_be_bytes());
    let mut oversize = (u32::MAX).to_be_bytes().to_vec();
    oversize.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    let truncated = valid[..valid.len() - 3].to_vec();
    let mut garbage = ((200u32 + 2).to_be_bytes()).to_vec();
    garbage.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    garbage.extend((0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80));

    let cases = [
        ("valid", valid),
        ("wrong version", wrong_version),
        ("oversize", oversize),
        ("truncated", truncated),
        ("garbage", garbage),
    ];
    for (name, bytes) in cases {
        let (mut send, _recv) = client_conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let (_send, mut recv) = accept_stream(&server_conn).await.unwrap().unwrap();
        let result = read_frame::<WorkerMsg>(&mut recv).await;
        match (name, result) {
            ("valid", Ok(WorkerMsg::Heartbeat(beat))) => assert_eq!(beat.running, [1, 2, 3]),
            ("wrong version", Err(WireError::VersionMismatch { ours, theirs }))
                if ours == WIRE_VERSION && theirs == WIRE_VERSION + 1 => {}
            ("oversize", Err(WireError::FrameTooLarge { .. })) => {}
            ("truncated", Err(WireError::Truncated { .. })) => {}
            ("garbage", Err(WireError::Decode { .. })) => {}
            (name, other) => panic!("{name}: unexpected {other:?}"),
        }
    }

    // A stream reset by the peer and a lost connection are reported as such.
    let (mut send, _recv) = client_conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    send.reset(7u32.into()).unwrap();
    let (_send, mut recv) = accept_stream(&server_conn).await.unwrap().unwrap();
    let err = read_frame::<WorkerMsg>(&mut recv).await.unwrap_err();
    assert!(matches!(err, WireError::StreamReset(7)), "{err:?}");

    let (mut send, _recv) = client_conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    let (_send, mut recv) = accept_stream(&server_conn).await.unwrap().unwrap();
    client_conn.close(9u32.into(), b"going away");
    let err = read_frame::<WorkerMsg>(&mut recv).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Connection(quinn::ConnectionError::ApplicationClosed(_))
        ),
        "{err:?}"
    );
    assert!(err.is_connection_lost());
    assert!(accept_stream(&server_conn).await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Who gets in
// ---------------------------------------------------------------------------------------------

/// Collects what a `tracing` subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The captured lines that contain every one of `needles`.
    fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .map(str::to_string)
            .collect()
    }
}

/// Everything this test binary logs at INFO and above, through one global subscriber installed
/// before the first connection of any test here ([`pki`] calls this). A thread-local
/// `set_default` subscriber is not enough: tracing caches a callsite's interest globally, and
/// while only one thread-local subscriber exists, a callsite first reached on another test's
/// thread is cached as "never" and the event is lost (this made the log checks flaky).
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("wire::tests installs the one global tracing subscriber of this test binary");
        captured
    })
}

#[tokio::test]
async fn certificate_of_another_ca_is_refused_in_the_handshake_and_logged() {
    let logs = logs();

    let pki = pki();
    // A CA of the same name (only the signature differs: BadSignature) and another one
    // (UnknownIssuer); on servers that require client certificates and on those that do not.
    let cases = ["wire test CA", "evil CA"]
        .into_iter()
        .flat_map(|ca_name| [(ca_name, true), (ca_name, false)]);
    for (ca_name, require_client_auth) in cases {
        let rogue = ClusterCa::generate(ca_name)
            .unwrap()
            .issue(Role::Worker, "w1", &[])
            .unwrap();
        let server = server(&pki, require_client_auth);
        // The rogue trusts the real CA, so the server's certificate passes on its side.
        let client = client(pki.ca.cert_pem(), Some(&rogue));
        let client_addr = client.local_addr().unwrap();
        let addr = server.local_addr().unwrap();

        let dial = async {
            let conn = tls::connect(&client, addr, "coord-1").await?;
            let hello = Hello {
                role: Role::Worker,
                name: "w1".into(),
                token: None,
            };
            // The client may finish its half of the handshake before the server rejects its
            // certificate; then the first request fails.
            send_hello(&conn, &hello)
                .await
                .map_err(|e| TlsError::Certificate {
                    what: "hello".into(),
                    reason: e.to_string(),
                })
        };
        let (dialled, accepted) = tokio::join!(dial, accept(&server));
        assert!(dialled.is_err(), "rogue client got in: {dialled:?}");
        match accepted {
            Err(TlsError::Handshake { remote, source }) => {
                assert_eq!(remote, client_addr);
                assert!(
                    source.to_string().contains("invalid peer certificate"),
                    "{ca_name}: {source}"
                );
            }
            other => panic!("server accepted the rogue certificate: {other:?}"),
        }
        let remote = format!("remote={client_addr}");
        let lines = logs.lines_with(&["WARN", "refused connection", &remote]);
        assert_eq!(
            lines.len(),
            1,
            "the refusal is logged once with the remote address: {}",
            logs.text()
        );
    }
}

#[tokio::test]
async fn worker_certificate_is_seen_as_worker_and_can_be_offered_jobs() {
    let pki = pki();
    let server = server(&pki, true);
    let worker = pki.ca.issue(Role::Worker, "w-arm64-1", &[]).unwrap();
    let client = client(pki.ca.cert_pem(), Some(&worker));
    let (worker_conn, coord_conn) = connected(&server, &client).await;

    assert_eq!(
        tls::peer_identity(&coord_conn),
        Some(PeerIdentity {
            role: Role::Worker,
            name: "w-arm64-1".into()
        })
    );
    let hello = Hello {
        role: Role::Worker,
        name: "w-arm64-1".into(),
        token: None,
    };
    let no_tokens = ClientTokens::none();
    let coordinator_side = async {
        let greeting = receive_hello(&coord_conn, &no_tokens).await?;
        assert_eq!(greeting.auth(), AuthMethod::Certificate);
        assert_eq!(greeting.hello(), &hello);
        greeting.welcome(welcome()).await
    };
    let (welcomed, peer) = tokio::join!(send_hello(&worker_conn, &hello), coordinator_side);
    assert_eq!(peer.unwrap().role, Role::Worker);
    assert_eq!(welcomed.unwrap(), welcome());

    // The coordinator opens a stream to the worker to offer a job; the worker answers.
    let worker_side = tokio::spawn(async move {
        let (mut send, mut recv) = accept_stream(&worker_conn).await.unwrap().unwrap();
        let offer: CoordinatorToWorker = read_frame(&mut recv).await.unwrap();
        let CoordinatorToWorker::Offer(offer) = offer else {
            panic!("expected an offer, got {offer:?}");
        };
        let ack = WorkerMsg::Ack(JobAck {
            accepted: offer.job == sample_job(),
            reason: String::new(),
        });
        write_frame(&mut send, &ack).await.unwrap();
        send.finish().unwrap();
        worker_conn
    });
    let offer = CoordinatorToWorker::Offer(JobOffer {
        job_id: 1,
        epoch: 1,
        term: 1,
        deadline_ms: 0,
        job: sample_job(),
    });
    let ack: WorkerMsg = request(&coord_conn, &offer).await.unwrap();
    assert_eq!(
        ack,
        WorkerMsg::Ack(JobAck {
            accepted: true,
            reason: String::new()
        })
    );
    let _worker_conn = worker_side.await.unwrap();
}

#[tokio::test]
async fn hello_must_match_the_certificate() {
    let pki = pki();
    let server = server(&pki, true);
    let worker = pki.ca.issue(Role::Worker, "w1", &[]).unwrap();
    let client = client(pki.ca.cert_pem(), Some(&worker));
    let (worker_conn, coord_conn) = connected(&server, &client).await;
    let lie = Hello {
        role: Role::Coordinator,
        name: "coord-9".into(),
        token: None,
    };
    let no_tokens = ClientTokens::none();
    let (sent, received) = tokio::join!(
        send_hello(&worker_conn, &lie),
        receive_hello(&coord_conn, &no_tokens)
    );
    let sent = sent.unwrap_err();
    assert!(
        matches!(&sent, WireError::Refused(reason) if reason.contains("worker w1")),
        "{sent:?}"
    );
    assert!(matches!(received, Err(WireError::Unauthenticated(_))));
}

#[tokio::test]
async fn token_clients_get_in_with_the_right_token_only() {
    let logs = logs();
    let pki = pki();
    let server = server(&pki, false);
    let tokens = ClientTokens::new(["right-token", "other-token"]);

    let attempts: [(Role, Option<&str>, bool); 5] = [
        (Role::Client, Some("right-token"), true),
        (Role::Client, Some("other-token"), true),
        (Role::Client, Some("wrong-token"), false),
        (Role::Client, None, false),
        // Tokens are for clients only.
        (Role::Worker, Some("right-token"), false),
    ];
    for (role, token, admitted) in attempts {
        let client = client(pki.ca.cert_pem(), None);
        let (client_conn, server_conn) = connected(&server, &client).await;
        assert_eq!(tls::peer_identity(&server_conn), None);
        let hello = Hello {
            role,
            name: "ci".into(),
            token: token.map(str::to_string),
        };
        let server_side = async {
            let greeting = receive_hello(&server_conn, &tokens).await?;
            assert_eq!(greeting.auth(), AuthMethod::Token);
            assert_eq!(greeting.hello().token, None, "the token is not handed on");
            greeting.welcome(welcome()).await
        };
        let (sent, received) = tokio::join!(send_hello(&client_conn, &hello), server_side);
        if admitted {
            assert_eq!(sent.unwrap(), welcome());
            assert_eq!(
                received.unwrap(),
                PeerIdentity {
                    role: Role::Client,
                    name: "ci".into()
                }
            );
        } else {
            let sent = sent.unwrap_err();
            assert!(matches!(sent, WireError::Refused(_)), "{token:?}: {sent:?}");
            assert!(
                matches!(received, Err(WireError::Unauthenticated(_))),
                "{received:?}"
            );
            // The connection is closed after the refusal.
            let closed = client_conn.closed().await;
            let refused = match &closed {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    close.error_code == CLOSE_REFUSED
                }
                _ => false,
            };
            assert!(refused, "{closed:?}");
        }
    }
    let text = logs.text();
    assert!(
        !logs
            .lines_with(&["WARN", "refused connection", "invalid token"])
            .is_empty(),
        "{text}"
    );
    assert!(
        !text.contains("wrong-token"),
        "tokens never reach the logs: {text}"
    );

    // A server that requires certificates refuses a certificate-less client in the handshake.
    let strict = self::server(&pki, true);
    let client = client(pki.ca.cert_pem(), None);
    let addr = strict.local_addr().unwrap();
    let dial = async {
        let conn = tls::connect(&client, addr, "coord-1")
            .await
            .map_err(|e| e.to_string())?;
        let hello = Hello {
            role: Role::Client,
            name: "ci".into(),
            token: Some("right-token".into()),
        };
        send_hello(&conn, &hello).await.map_err(|e| e.to_string())
    };
    let (dialled, accepted) = tokio::join!(dial, accept(&strict));
    assert!(dialled.is_err());
    assert!(matches!(accepted, Err(TlsError::Handshake { .. })));
}

#[tokio::test]
async fn server_name_must_match_the_certificate() {
    let pki = pki();
    let server = server(&pki, true);
    let worker = pki.ca.issue(Role::Worker, "w1", &[]).unwrap();
    let client = client(pki.ca.cert_pem(), Some(&worker));
    let addr = server.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let result = accept(&server).await;
        (server, result.is_err())
    });
    let err = tls::connect(&client, addr, "coord-2").await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    let (_server, refused) = server_task.await.unwrap();
    assert!(refused);
}

#[tokio::test]
async fn dev_pki_files_work_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tls::write_dev_pki(
        dir.path(),
        &[
            ("coord-1".into(), "127.0.0.1:7400".into()),
            ("coord-2".into(), "127.0.0.2:7400".into()),
        ],
        &["w1".into()],
        &["alice".into()],
    )
    .unwrap();
    let ca_pem = std::fs::read_to_string(&pki.ca_cert).unwrap();
    let coordinator = Identity::load_from_dir(dir.path(), Role::Coordinator, "coord-1").unwrap();
    let server_endpoint = tls::server_endpoint(
        localhost(),
        server_config(&ca_pem, &coordinator, true).unwrap(),
    )
    .unwrap();
    let addr = server_endpoint.local_addr().unwrap();

    for (role, name) in [
        (Role::Worker, "w1"),
        (Role::Client, "alice"),
        (Role::Coordinator, "coord-2"),
    ] {
        let files = pki.identity(role, name).unwrap();
        let identity = Identity::load(&files.cert, &files.key).unwrap();
        let client = client(&ca_pem, Some(&identity));
        let (client_conn, server_conn) = tokio::join!(
            tls::connect(&client, addr, "coord-1"),
            accept(&server_endpoint)
        );
        let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());
        assert_eq!(
            tls::peer_identity(&server_conn),
            Some(PeerIdentity {
                role,
                name: name.into()
            })
        );
        let hello = Hello {
            role,
            name: name.into(),
            token: None,
        };
        let (sent, received) = tokio::join!(send_hello(&client_conn, &hello), async {
            receive_hello(&server_conn, &ClientTokens::none())
                .await?
                .welcome(welcome())
                .await
        });
        assert_eq!(sent.unwrap(), welcome());
        assert_eq!(received.unwrap().name, name);
    }
}
