//! Runs the process of a RUN step in a container through an OCI runtime (runc).
//!
//! [`Runc::run`] takes a [`RunRequest`] (a root filesystem, a [`ProcessSpec`], extra [`Mount`]s
//! and a [`NetworkMode`]), writes an OCI runtime bundle whose `config.json` follows Docker's
//! default container spec (capabilities, namespaces, masked and read-only paths, `/proc`, `/dev`
//! and `/sys` mounts), runs `runc run` in the foreground, streams the merged stdout and stderr of
//! the step to a callback and returns the exit code. Everything the run needed outside the
//! container (the bundle, runc's state) is removed afterwards, and so are the empty mount points
//! that runc had to create inside the root filesystem, so a step's layer only holds what its
//! command changed, as BuildKit's mount stub cleaner ensures. [`resolve_user`] turns a `USER`
//! value into numeric ids from the image's `/etc/passwd` and `/etc/group`, with the semantics of
//! Docker and BuildKit. All of this is blocking code: async callers use `spawn_blocking`.

use crate::rootfs::resolve_in_root;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use filetime::FileTime;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// How a RUN step's process is started.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The command and its arguments, already final (the caller prepends the shell for the
    /// shell form). It must not be empty; a command that is not found makes runc fail to
    /// start the container ([`ExecError::Start`]).
    pub args: Vec<String>,
    /// The environment as `KEY=value` entries. When no `PATH` is given, the default
    /// `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin` is added, as BuildKit does.
    pub env: Vec<String>,
    /// The working directory, an absolute path in the container. It is created (like
    /// `mkdir -p`, mode 0755, owned by root) when missing, as BuildKit does.
    pub cwd: String,
    /// The `USER` value: `""`, `name`, `uid`, `name:group` or `uid:gid`; see [`resolve_user`].
    pub user: String,
    /// The container's host name; empty means `buildkitsandbox`, BuildKit's default.
    pub hostname: String,
}

/// Where the content of a [`Mount`] comes from.
#[derive(Debug, Clone)]
pub enum MountSource {
    /// A file or directory of the host, bind-mounted recursively.
    Bind {
        /// The host path; it must exist.
        source: PathBuf,
        /// Mount it read-only.
        readonly: bool,
    },
    /// A fresh tmpfs (mode 1777, `nosuid`), limited to `size` bytes when given.
    Tmpfs {
        /// The size limit in bytes; `None` leaves the kernel default (half of the RAM).
        size: Option<u64>,
    },
}

/// An extra mount of a RUN step (`RUN --mount=...`, the context or a cache directory).
#[derive(Debug, Clone)]
pub struct Mount {
    /// The absolute path in the container where the mount appears.
    pub destination: String,
    /// What is mounted there.
    pub source: MountSource,
}

/// The network a RUN step sees (`RUN --network=none|host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// A network namespace of its own with only the loopback interface, which runc brings up.
    /// `/etc/resolv.conf` is generated from the host's without loopback name servers, and
    /// `/etc/hosts` names `localhost` and the container's host name.
    None,
    /// The host's network namespace; the host's `/etc/resolv.conf` and `/etc/hosts` are
    /// bind-mounted read-only.
    Host,
}

/// Everything needed to run one RUN step.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The root filesystem of the container (for instance a mounted overlay); the step writes
    /// into it.
    pub rootfs: PathBuf,
    /// The process to start.
    pub process: ProcessSpec,
    /// Extra mounts, mounted after the default ones, parents before children.
    pub mounts: Vec<Mount>,
    /// The network the step sees.
    pub network: NetworkMode,
    /// The container id, chosen by the caller and unique among the runs of this [`Runc`]:
    /// ASCII letters, digits, `_`, `+`, `-` and `.`.
    pub id: String,
}

/// What can go wrong while preparing, running or cleaning up a container. A command that exits
/// with a non-zero code is not an error: [`Runc::run`] returns its code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// No runc binary was found.
    #[error("runc not found on PATH (nor in {searched}): install it with `apt-get install runc`")]
    RuntimeMissing {
        /// The directories that were searched.
        searched: String,
    },
    /// The runc binary given explicitly is missing or not executable.
    #[error(
        "OCI runtime {path} is not an executable file: install runc with `apt-get install runc`"
    )]
    RuntimeNotExecutable {
        /// The path given.
        path: PathBuf,
    },
    /// The runtime's state directory could not be created.
    #[error("cannot create runtime state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The USER value names a user that the image's `/etc/passwd` lacks.
    #[error("USER {user:?}: no user named {name:?} in {passwd}")]
    UnknownUser {
        /// The whole USER value.
        user: String,
        /// The user name that was not found.
        name: String,
        /// The passwd file that was searched (in the root filesystem).
        passwd: PathBuf,
    },
    /// The USER value names a group that the image's `/etc/group` lacks.
    #[error("USER {user:?}: no group named {name:?} in {group_file}")]
    UnknownGroup {
        /// The whole USER value.
        user: String,
        /// The group name that was not found.
        name: String,
        /// The group file that was searched (in the root filesystem).
        group_file: PathBuf,
    },
    /// The USER value is malformed (for instance an id out of range).
    #[error("USER {user:?}: {reason}")]
    InvalidUser {
        /// The whole USER value.
        user: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `/etc/passwd` or `/etc/group` of the root filesystem could not be read.
    #[error("cannot read {path}: {source}")]
    UserDatabase {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The container id is not usable by runc.
    #[error(
        "invalid container id {id:?}: use ASCII letters, digits, '_', '+', '-' and '.' (not '.' or '..')"
    )]
    InvalidId {
        /// The id given.
        id: String,
    },
    /// The root filesystem is missing or not a directory.
    #[error("root filesystem {path}: {source}")]
    Rootfs {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A requested mount is invalid.
    #[error("mount at {destination:?}: {reason}")]
    InvalidMount {
        /// The destination given.
        destination: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The source of a bind mount does not exist or cannot be resolved.
    #[error("bind mount source {source_path} (for {destination:?}): {source}")]
    BindSource {
        /// The host path.
        source_path: PathBuf,
        /// The destination in the container.
        destination: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The working directory could not be created in the root filesystem.
    #[error("cannot create working directory {cwd:?} at {path}: {source}")]
    WorkingDir {
        /// The working directory in the container.
        cwd: String,
        /// The host path that failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The OCI bundle (config.json, generated files) could not be written.
    #[error("cannot write OCI bundle file {path}: {source}")]
    Bundle {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// runc could not be started, or its output could not be read or waited for.
    #[error("`{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        source: io::Error,
    },
    /// runc failed to create or start the container (its error message is included).
    #[error("`{command}` failed to start container {id} (exit code {exit_code}): {message}")]
    Start {
        /// The container id.
        id: String,
        /// The command line.
        command: String,
        /// runc's exit code.
        exit_code: i32,
        /// runc's error messages.
        message: String,
    },
    /// `runc kill` failed.
    #[error("`{command}` failed (exit code {exit_code:?}): {message}")]
    Kill {
        /// The command line.
        command: String,
        /// runc's exit code, if it exited.
        exit_code: Option<i32>,
        /// runc's stderr.
        message: String,
    },
}

/// The `PATH` given to a process whose environment lacks one (BuildKit's default).
pub const DEFAULT_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host name of a container when [`ProcessSpec::hostname`] is empty (BuildKit's default).
pub const DEFAULT_HOSTNAME: &str = "buildkitsandbox";

/// Directories searched for runc after `PATH` (Debian installs it in `/usr/sbin`, which a
/// non-login `PATH` may lack).
const FALLBACK_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Docker's default capability set.
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Docker's masked paths (hidden behind `/dev/null` or an empty read-only tmpfs).
const MASKED_PATHS: [&str; 12] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The soft and hard `RLIMIT_NOFILE` of a step (BuildKit's value), unless the host does not
/// allow it (see [`nofile_limit`]).
const NOFILE_LIMIT: u64 = 1_048_576;

/// The capability bit of `CAP_SYS_RESOURCE`, needed to raise a hard resource limit.
const CAP_SYS_RESOURCE: u32 = 24;

/// Largest uid or gid accepted in a USER value (as runc's user package does).
const MAX_ID: u32 = i32::MAX as u32;

/// Resolves a USER value against a root filesystem: `(uid, gid, additional gids)`.
///
/// Follows BuildKit (which uses runc's user package): `""` is uid 0, looked up like any user;
/// `uid:gid` with both numeric is taken as is, without reading any file; otherwise the user part
/// is looked up by name or uid in the rootfs's `/etc/passwd` (an unknown name is an error, an
/// unknown numeric uid gets gid 0), and the group part, when given, by name or gid in
/// `/etc/group` (an unknown name is an error, an unknown number is used as is). The additional
/// gids are the primary gid, then, when no group is explicit, every group of `/etc/group` that
/// lists the user's name as a member. Symbolic links in the rootfs are followed without leaving
/// it.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32, Vec<u32>), ExecError> {
    let (uid, gid, memberships) = lookup_user(rootfs, user)?;
    // The primary group comes first among the supplementary ones, as BuildKit sets them since
    // the fix of CVE-2023-25173: a process never runs with fewer groups than its own.
    let mut groups = vec![gid];
    for g in memberships {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok((uid, gid, groups))
}

/// The uid, gid and the groups `/etc/group` lists the user in. No user is root.
fn lookup_user(rootfs: &Path, user: &str) -> Result<(u32, u32, Vec<u32>), ExecError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (user, None),
    };
    let user_arg = if user_part.is_empty() { "0" } else { user_part };
    let uid_arg = parse_id(user, user_arg)?;
    let gid_arg = match group_part {
        Some(g) => parse_id(user, g)?,
        None => None,
    };
    if let (Some(uid), Some(gid)) = (uid_arg, gid_arg) {
        return Ok((uid, gid, Vec::new()));
    }

    let passwd_path = user_db_path(rootfs, "/etc/passwd");
    let passwd = read_user_db(&passwd_path)?;
    let entry = passwd
        .as_deref()
        .and_then(|text| parse_passwd(text).find(|e| e.name == user_arg || Some(e.uid) == uid_arg));
    let (uid, mut gid, name) = match (entry, uid_arg) {
        (Some(e), _) => (e.uid, e.gid, e.name),
        (None, Some(uid)) => (uid, 0, ""),
        (None, None) => {
            return Err(ExecError::UnknownUser {
                user: user.to_owned(),
                name: user_arg.to_owned(),
                passwd: passwd_path,
            });
        }
    };

    let mut additional = Vec::new();
    if group_part.is_some() || !name.is_empty() {
        let group_path = user_db_path(rootfs, "/etc/group");
        let groups = read_user_db(&group_path)?;
        let groups = groups.as_deref().unwrap_or("");
        match group_part {
            Some(group_arg) => {
                let found =
                    parse_group(groups).find(|g| g.name == group_arg || Some(g.gid) == gid_arg);
                gid = match (found, gid_arg) {
                    (Some(g), _) => g.gid,
                    (None, Some(n)) => n,
                    (None, None) => {
                        return Err(ExecError::UnknownGroup {
                            user: user.to_owned(),
                            name: group_arg.to_owned(),
                            group_file: group_path,
                        });
                    }
                };
            }
            None => {
                additional = parse_group(groups)
                    .filter(|g| g.members.split(',').any(|m| m.trim() == name))
                    .map(|g| g.gid)
                    .collect();
            }
        }
    }
    Ok((uid, gid, additional))
}

/// Parses a numeric uid or gid; `Ok(None)` when `text` is a name.
fn parse_id(user: &str, text: &str) -> Result<Option<u32>, ExecError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match text.parse::<u32>() {
        Ok(n) if n <= MAX_ID => Ok(Some(n)),
        _ => Err(ExecError::InvalidUser {
            user: user.to_owned(),
            reason: format!("id {text} is out of range 0-{MAX_ID}"),
        }),
    }
}

fn user_db_path(rootfs: &Path, file: &str) -> PathBuf {
    // A symlink loop degrades to the lexical path, which then fails to read with a clear error.
    resolve_in_root(rootfs, Path::new(file))
        .unwrap_or_else(|_| rootfs.join(file.trim_start_matches('/')))
}

/// Reads a passwd or group file; `Ok(None)` when it does not exist.
fn read_user_db(path: &Path) -> Result<Option<String>, ExecError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ExecError::UserDatabase {
            path: path.to_owned(),
            source,
        }),
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

/// The well-formed entries of a passwd file (`name:password:uid:gid:gecos:home:shell`).
fn parse_passwd(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    user_db_lines(text).filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = fields.next()?.trim().parse().ok()?;
        let gid = fields.next()?.trim().parse().ok()?;
        Some(PasswdEntry { name, uid, gid })
    })
}

/// The well-formed entries of a group file (`name:password:gid:member,member`).
fn parse_group(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    user_db_lines(text).filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let gid = fields.next()?.trim().parse().ok()?;
        let members = fields.next().unwrap_or("");
        Some(GroupEntry { name, gid, members })
    })
}

fn user_db_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// Runs containers with runc (an OCI runtime given by path).
///
/// Its state lives under one directory: `runc/` is runc's `--root`, `bundles/<id>/` holds the
/// bundle of each running container. Both are emptied again when each run ends. A `Runc` is
/// `Send + Sync`: several threads may run containers (with distinct ids) at once.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    state_root: PathBuf,
    nofile: u64,
}

/// Stops a container whose step is no longer wanted: the job was cancelled, so the future
/// waiting on the blocking [`Runc::run`] was dropped, and the container would otherwise run to
/// its end. Dropped before [`StopOnDrop::disarm`], it marks the run cancelled (a run that has
/// not started yet does not start, see [`RunGate::cancelled`]) and kills the container from a
/// thread of its own, again and again until the run has returned: a container still being
/// created when the cancellation came is killed too.
pub struct StopOnDrop {
    runc: std::sync::Arc<Runc>,
    id: String,
    gate: std::sync::Arc<RunGate>,
    armed: bool,
}

/// What a blocking run and its [`StopOnDrop`] share.
#[derive(Debug, Default)]
pub struct RunGate {
    cancelled: std::sync::atomic::AtomicBool,
    done: std::sync::atomic::AtomicBool,
}

impl RunGate {
    /// Whether the step was cancelled: check before starting the container.
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The run returned: no more killing.
    pub fn done(&self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long a cancelled container is killed again and again while its run has not returned.
const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

impl StopOnDrop {
    pub fn new(runc: std::sync::Arc<Runc>, id: &str) -> StopOnDrop {
        StopOnDrop {
            runc,
            id: id.to_string(),
            gate: std::sync::Arc::default(),
            armed: true,
        }
    }

    /// The gate the blocking run checks and marks.
    pub fn gate(&self) -> std::sync::Arc<RunGate> {
        self.gate.clone()
    }

    /// The run was awaited to its end: nothing to stop.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.armed || self.gate.done.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.gate
            .cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (runc, id, gate) = (self.runc.clone(), self.id.clone(), self.gate.clone());
        tracing::info!(container = %id, "step cancelled; stopping its container");
        let spawned = std::thread::Builder::new()
            .name("stop-container".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                while !gate.done.load(std::sync::atomic::Ordering::SeqCst)
                    && started.elapsed() < STOP_PATIENCE
                {
                    if runc.runc_root().join(&id).exists() {
                        let _ = runc.kill(&id, Signal::SIGKILL);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(container = %self.id, error = %e, "cannot start the thread that stops a cancelled container");
        }
    }
}

impl Runc {
    /// Finds `runc` on `PATH` (then in `/usr/local/sbin`, `/usr/sbin` and `/sbin`) unless
    /// `binary` is given, checks that it is an executable file (the error says to
    /// `apt-get install runc` if it is missing), and creates the state directory `state_root`.
    /// It also settles the `RLIMIT_NOFILE` of the containers (see [`Runc::run`]).
    pub fn new(binary: Option<PathBuf>, state_root: &Path) -> Result<Self, ExecError> {
        let binary = match binary {
            Some(path) => {
                if !is_executable_file(&path) {
                    return Err(ExecError::RuntimeNotExecutable { path });
                }
                path
            }
            None => find_runtime(std::env::var_os("PATH").as_deref(), &FALLBACK_DIRS)?,
        };
        for dir in [state_root.join("runc"), state_root.join("bundles")] {
            fs::create_dir_all(&dir).map_err(|source| ExecError::StateDir { path: dir, source })?;
        }
        let state_root = fs::canonicalize(state_root).map_err(|source| ExecError::StateDir {
            path: state_root.to_owned(),
            source,
        })?;
        Ok(Self {
            binary,
            state_root,
            nofile: nofile_limit(),
        })
    }

    /// The runc binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// runc's `--root`: where it keeps the state of running containers.
    pub fn runc_root(&self) -> PathBuf {
        self.state_root.join("runc")
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_root.join("bundles").join(id)
    }

    /// Sends `signal` to the process of the running container `id` (`runc kill`), for
    /// instance to cancel a step from another thread while [`Runc::run`] waits for it. A
    /// container killed this way makes `run` return 128 + the signal number.
    pub fn kill(&self, id: &str, signal: Signal) -> Result<(), ExecError> {
        validate_id(id)?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(self.runc_root())
            .arg("kill")
            .arg(id)
            .arg((signal as i32).to_string());
        let command = command_line(&cmd);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ExecError::Spawn {
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ExecError::Kill {
                command,
                exit_code: out.status.code(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Writes an OCI runtime bundle for `req`, runs `runc run --bundle DIR ID` with stdin
    /// null, streams stdout and stderr (merged into one pipe, in order of arrival, whole
    /// chunks as read) to `output`, waits, then cleans up. Returns the exit code of the command
    /// (a signal `n` gives `128 + n`); a non-zero code is not an error.
    ///
    /// runc relays the container's stdout and stderr through two pipes of its own, so each
    /// stream keeps its order but a write to one and an immediately following write to the
    /// other may arrive swapped (BuildKit, which also runs `runc run`, has the same property).
    ///
    /// The bundle's `config.json` has Docker's default capabilities (in the bounding,
    /// effective and permitted sets), namespaces pid, ipc, uts, mount and network (not network
    /// for [`NetworkMode::Host`]), Docker's masked and read-only paths, `/proc`, `/dev`,
    /// `/dev/pts`, `/dev/shm`, `/dev/mqueue`, `/sys` and `/sys/fs/cgroup` (read-only) mounts,
    /// read-only `/etc/resolv.conf` and `/etc/hosts` (see [`NetworkMode`]; a requested mount at
    /// the same place wins), `RLIMIT_NOFILE` 1048576 (lowered to this process's hard limit
    /// when it lacks `CAP_SYS_RESOURCE`, and to `fs.nr_open`, since runc could not set more),
    /// `noNewPrivileges`, umask 0022, and the requested mounts, parents first. The working
    /// directory is created first if missing.
    ///
    /// Mount points that runc had to create in the rootfs (for the default mounts,
    /// `/etc/resolv.conf`, `/etc/hosts`, the requested mounts, and their missing parents) are
    /// removed afterwards when still empty, and the modification time of the directory that
    /// held them is restored when its entries are back to what they were, so they never show
    /// up in the step's layer.
    ///
    /// Errors: invalid id or mounts, user resolution, bundle writing, and runc failing to
    /// start the container (its error message is included; runc also prints it to its stderr,
    /// which is part of `output`). If a bundle of the same id is left over from a crashed
    /// process, that container is deleted first.
    pub fn run(&self, req: &RunRequest, output: &mut dyn FnMut(&[u8])) -> Result<i32, ExecError> {
        validate_id(&req.id)?;
        let rootfs = fs::canonicalize(&req.rootfs).map_err(|source| ExecError::Rootfs {
            path: req.rootfs.clone(),
            source,
        })?;
        if !rootfs.is_dir() {
            return Err(ExecError::Rootfs {
                path: req.rootfs.clone(),
                source: io::Error::from(io::ErrorKind::NotADirectory),
            });
        }
        let (uid, gid, additional_gids) = resolve_user(&rootfs, &req.process.user)?;
        let requested = requested_mounts(&req.mounts)?;
        let hostname = if req.process.hostname.is_empty() {
            DEFAULT_HOSTNAME
        } else {
            req.process.hostname.as_str()
        };

        let bundle = self.bundle_dir(&req.id);
        if bundle.exists() || self.runc_root().join(&req.id).exists() {
            tracing::warn!(id = %req.id, bundle = %bundle.display(), "removing a leftover container of the same id");
            self.delete(&req.id);
            remove_dir_all_logged(&bundle);
        }
        fs::create_dir(&bundle).map_err(|source| ExecError::Bundle {
            path: bundle.clone(),
            source,
        })?;
        let mut cleanup = Cleanup {
            runc: self,
            id: &req.id,
            bundle: bundle.clone(),
            stubs: None,
        };

        let net_files = network_files(req.network, hostname, &bundle)?;
        let mut mounts = default_mounts();
        for (destination, source) in &net_files {
            mounts.push(bind_mount(destination, source, true));
        }
        mounts.retain(|m| {
            let dest = m.get("destination").and_then(Value::as_str);
            !requested
                .iter()
                .any(|r| Some(r.destination.as_str()) == dest)
        });
        mounts.extend(requested.iter().map(RequestedMount::to_oci));

        let destinations: Vec<&str> = mounts
            .iter()
            .filter_map(|m| m.get("destination").and_then(Value::as_str))
            .collect();
        let stubs = cleanup
            .stubs
            .insert(MountStubs::detect(&rootfs, &destinations));
        let cwd = clean_container_path(&req.process.cwd);
        let cwd_host = create_working_dir(&rootfs, &cwd)?;
        stubs.keep_ancestors_of(&cwd_host);

        let env = with_default_path(&req.process.env);
        let spec = runtime_spec(&SpecInput {
            rootfs: &rootfs,
            args: &req.process.args,
            env: &env,
            cwd: &cwd,
            uid,
            gid,
            additional_gids: &additional_gids,
            hostname,
            network: req.network,
            nofile: self.nofile,
            mounts,
        });
        let config_path = bundle.join("config.json");
        let config = serde_json::to_vec_pretty(&spec).map_err(|e| ExecError::Bundle {
            path: config_path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&config_path, config).map_err(|source| ExecError::Bundle {
            path: config_path,
            source,
        })?;

        let log_path = bundle.join("runc.log");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(self.runc_root())
            .arg("--log")
            .arg(&log_path)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&req.id);
        let command = command_line(&cmd);
        let status = run_streaming(cmd, output).map_err(|source| ExecError::Spawn {
            command: command.clone(),
            source,
        })?;
        let exit_code = exit_code(status);
        if exit_code != 0 {
            let errors = runc_errors(&log_path);
            if !errors.is_empty() {
                return Err(ExecError::Start {
                    id: req.id.clone(),
                    command,
                    exit_code,
                    message: errors.join("; "),
                });
            }
        }
        Ok(exit_code)
    }

    /// `runc delete --force ID` if runc still has state for `id`; failures are logged.
    fn delete(&self, id: &str) {
        if !self.runc_root().join(id).exists() {
            return;
        }
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(self.runc_root())
            .arg("delete")
            .arg("--force")
            .arg(id);
        let command = command_line(&cmd);
        match cmd.stdin(Stdio::null()).stdout(Stdio::null()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => tracing::warn!(
                %command,
                code = ?out.status.code(),
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "runc delete failed"
            ),
            Err(e) => tracing::warn!(%command, error = %e, "cannot run runc delete"),
        }
    }
}

/// Removes what a run left behind, whatever way `run` returns (or unwinds).
struct Cleanup<'a> {
    runc: &'a Runc,
    id: &'a str,
    bundle: PathBuf,
    stubs: Option<MountStubs>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.runc.delete(self.id);
        remove_dir_all_logged(&self.bundle);
        if let Some(stubs) = self.stubs.take() {
            stubs.clean();
        }
    }
}

fn remove_dir_all_logged(path: &Path) {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove directory"),
    }
}

/// Spawns `cmd` with stdin null and stdout and stderr on one pipe, hands every chunk read from
/// the pipe to `output` until end of file, and waits for the process.
fn run_streaming(mut cmd: Command, output: &mut dyn FnMut(&[u8])) -> io::Result<ExitStatus> {
    let (mut reader, writer) = io::pipe()?;
    let writer_err = writer.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(writer).stderr(writer_err);
    let mut child = cmd.spawn()?;
    // The command holds our copies of the pipe's write end: drop it so that the end of the
    // container's output is seen as end of file.
    drop(cmd);
    let mut buf = vec![0u8; 64 * 1024];
    let mut read_error = None;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(chunk) = buf.get(..n) {
                    output(chunk);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                read_error = Some(e);
                break;
            }
        }
    }
    drop(reader);
    let status = child.wait()?;
    match read_error {
        Some(e) => Err(e),
        None => Ok(status),
    }
}

/// The exit code of runc: its code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 128,
    }
}

/// The error messages of a runc `--log-format json` log. runc logs at level error only when it
/// fails itself; the exit code of the container is returned without any log entry.
fn runc_errors(log_path: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(log_path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| {
            matches!(
                entry.get("level").and_then(Value::as_str),
                Some("error" | "fatal" | "panic")
            )
        })
        .filter_map(|entry| entry.get("msg").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn validate_id(id: &str) -> Result<(), ExecError> {
    let valid_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if id.is_empty() || !valid_chars || id == "." || id == ".." {
        return Err(ExecError::InvalidId { id: id.to_owned() });
    }
    Ok(())
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds an executable `runc` in the directories of `path_var`, then in `fallback`.
fn find_runtime(path_var: Option<&OsStr>, fallback: &[&str]) -> Result<PathBuf, ExecError> {
    let dirs: Vec<PathBuf> = path_var
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.iter()
        .map(PathBuf::as_path)
        .chain(fallback.iter().map(Path::new))
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("runc"))
        .find(|candidate| is_executable_file(candidate))
        .ok_or_else(|| ExecError::RuntimeMissing {
            searched: fallback.join(", "),
        })
}

/// Lexically cleans an absolute container path: `/` plus normal components, `..` stopping at
/// the root. A relative path is taken from `/`.
fn clean_container_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A requested mount, validated.
struct RequestedMount {
    destination: String,
    kind: RequestedKind,
}

enum RequestedKind {
    Bind { source: PathBuf, readonly: bool },
    Tmpfs { size: Option<u64> },
}

impl RequestedMount {
    fn to_oci(&self) -> Value {
        match &self.kind {
            RequestedKind::Bind { source, readonly } => {
                bind_mount(&self.destination, source, *readonly)
            }
            RequestedKind::Tmpfs { size } => {
                let mut options = vec!["nosuid".to_owned()];
                if let Some(size) = size.filter(|s| *s > 0) {
                    options.push(format!("size={size}"));
                }
                json!({
                    "destination": self.destination,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": options,
                })
            }
        }
    }
}

/// Validates the requested mounts and sorts them parents first (stable for equal depth).
fn requested_mounts(mounts: &[Mount]) -> Result<Vec<RequestedMount>, ExecError> {
    let mut out = Vec::with_capacity(mounts.len());
    for m in mounts {
        let invalid = |reason: &str| ExecError::InvalidMount {
            destination: m.destination.clone(),
            reason: reason.to_owned(),
        };
        if !m.destination.starts_with('/') {
            return Err(invalid("the destination must be an absolute path"));
        }
        if m.destination.contains('\0') {
            return Err(invalid("the destination contains a NUL byte"));
        }
        let destination = clean_container_path(&m.destination);
        if destination == "/" {
            return Err(invalid("cannot mount over the root directory"));
        }
        let kind = match &m.source {
            MountSource::Bind { source, readonly } => {
                let resolved = fs::canonicalize(source).map_err(|e| ExecError::BindSource {
                    source_path: source.clone(),
                    destination: m.destination.clone(),
                    source: e,
                })?;
                RequestedKind::Bind {
                    source: resolved,
                    readonly: *readonly,
                }
            }
            MountSource::Tmpfs { size } => RequestedKind::Tmpfs { size: *size },
        };
        out.push(RequestedMount { destination, kind });
    }
    out.sort_by_key(|m| m.destination.split('/').filter(|p| !p.is_empty()).count());
    Ok(out)
}

fn bind_mount(destination: &str, source: &Path, readonly: bool) -> Value {
    json!({
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", if readonly { "ro" } else { "rw" }],
    })
}

/// Docker's default mounts.
fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["ro", "nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
    ]
}

/// The `/etc/resolv.conf` and `/etc/hosts` to bind-mount: the host's for the host network
/// (generated when the host lacks one), generated files in the bundle otherwise.
fn network_files(
    network: NetworkMode,
    hostname: &str,
    bundle: &Path,
) -> Result<Vec<(&'static str, PathBuf)>, ExecError> {
    let host_resolv = Path::new("/etc/resolv.conf");
    let host_hosts = Path::new("/etc/hosts");
    let mut files = Vec::with_capacity(2);
    if network == NetworkMode::Host && host_resolv.exists() {
        files.push(("/etc/resolv.conf", host_resolv.to_owned()));
    } else {
        let host = fs::read_to_string(host_resolv).unwrap_or_default();
        let path = bundle.join("resolv.conf");
        write_bundle_file(&path, &isolated_resolv_conf(&host))?;
        files.push(("/etc/resolv.conf", path));
    }
    if network == NetworkMode::Host && host_hosts.exists() {
        files.push(("/etc/hosts", host_hosts.to_owned()));
    } else {
        let path = bundle.join("hosts");
        write_bundle_file(&path, &hosts_file(hostname))?;
        files.push(("/etc/hosts", path));
    }
    Ok(files)
}

fn write_bundle_file(path: &Path, content: &str) -> Result<(), ExecError> {
    fs::write(path, content).map_err(|source| ExecError::Bundle {
        path: path.to_owned(),
        source,
    })
}

/// The host's resolv.conf without loopback name servers (unreachable from another network
/// namespace); Google's public servers when none is left, as Docker and BuildKit do.
fn isolated_resolv_conf(host: &str) -> String {
    let mut out = String::new();
    let mut nameservers = 0;
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let Some(addr) = words.next() else { continue };
            let loopback = addr
                .split('%')
                .next()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback());
            if loopback {
                continue;
            }
            nameservers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if nameservers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

/// BuildKit's generated `/etc/hosts`.
fn hosts_file(hostname: &str) -> String {
    format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
}

fn with_default_path(env: &[String]) -> Vec<String> {
    let mut env = env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH_ENV}"));
    }
    env
}

struct SpecInput<'a> {
    rootfs: &'a Path,
    args: &'a [String],
    env: &'a [String],
    cwd: &'a str,
    uid: u32,
    gid: u32,
    additional_gids: &'a [u32],
    hostname: &'a str,
    network: NetworkMode,
    nofile: u64,
    mounts: Vec<Value>,
}

/// The OCI runtime spec (`config.json`) of a step.
fn runtime_spec(input: &SpecInput<'_>) -> Value {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if input.network == NetworkMode::None {
        namespaces.push(json!({"type": "network"}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {
                "uid": input.uid,
                "gid": input.gid,
                "umask": 0o022,
                "additionalGids": input.additional_gids,
            },
            "args": input.args,
            "env": input.env,
            "cwd": input.cwd,
            "capabilities": {
                "bounding": DEFAULT_CAPABILITIES,
                "effective": DEFAULT_CAPABILITIES,
                "permitted": DEFAULT_CAPABILITIES,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": input.nofile, "soft": input.nofile}],
            // Set-user-id programs work (`sudo` in a step), as in BuildKit's
            // `oci.WithNewPrivileges`.
            "noNewPrivileges": false,
        },
        "root": {"path": input.rootfs, "readonly": false},
        "hostname": input.hostname,
        "mounts": input.mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": {
                "devices": [
                    {"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "access": "m"},
                    {"allow": true, "type": "b", "access": "m"},
                ],
            },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    })
}

/// The `RLIMIT_NOFILE` runc can give a container: [`NOFILE_LIMIT`], capped by the kernel's
/// `fs.nr_open`, and by this process's own hard limit when it lacks `CAP_SYS_RESOURCE`.
fn nofile_limit() -> u64 {
    let mut limit = NOFILE_LIMIT;
    if let Some(nr_open) = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        limit = limit.min(nr_open);
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !has_capability(&status, CAP_SYS_RESOURCE) {
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        if let Some(hard) = nofile_hard_limit(&limits) {
            limit = limit.min(hard);
        }
    }
    limit
}

/// Whether the `CapEff` line of a `/proc/<pid>/status` text holds capability `bit`.
fn has_capability(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1u64 << bit) != 0)
}

/// The hard "Max open files" limit of a `/proc/<pid>/limits` text (`None` when unlimited).
fn nofile_hard_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line.trim_start_matches("Max open files").split_whitespace();
    let _soft = values.next()?;
    values.next()?.parse().ok()
}

/// Creates the working directory in the rootfs if missing (each new directory mode 0755,
/// owned by the caller, root), and returns its host path.
fn create_working_dir(rootfs: &Path, cwd: &str) -> Result<PathBuf, ExecError> {
    let err = |path: &Path, source| ExecError::WorkingDir {
        cwd: cwd.to_owned(),
        path: path.to_owned(),
        source,
    };
    let target = resolve_in_root(rootfs, Path::new(cwd)).map_err(|e| err(&rootfs.join(cwd), e))?;
    let relative = target.strip_prefix(rootfs).unwrap_or(Path::new(""));
    let mut current = rootfs.to_owned();
    for component in relative.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(err(&current, io::Error::from(io::ErrorKind::NotADirectory)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&current)
                    .map_err(|e| err(&current, e))?;
                fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                    .map_err(|e| err(&current, e))?;
            }
            Err(e) => return Err(err(&current, e)),
        }
    }
    Ok(target)
}

/// The mount points runc will create in a rootfs, found before a run and removed after it
/// when still empty (BuildKit's `MountStubsCleaner`, recursive form).
struct MountStubs {
    root: PathBuf,
    /// Paths that did not exist before the run, deepest first.
    paths: Vec<PathBuf>,
    /// The existing directories that will receive new entries, with their entries and times
    /// before the run.
    parents: BTreeMap<PathBuf, ParentState>,
}

struct ParentState {
    entries: BTreeSet<OsString>,
    atime: FileTime,
    mtime: FileTime,
}

impl MountStubs {
    fn detect(root: &Path, destinations: &[&str]) -> Self {
        let mut paths = BTreeSet::new();
        let mut parents = BTreeMap::new();
        for destination in destinations {
            let Ok(mut path) = resolve_in_root(root, Path::new(destination)) else {
                continue;
            };
            if path == root {
                continue;
            }
            let mut missing = false;
            loop {
                match fs::symlink_metadata(&path) {
                    Ok(_) => {
                        if missing {
                            record_parent(&mut parents, &path);
                        }
                        break;
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.kind() == io::ErrorKind::NotADirectory =>
                    {
                        paths.insert(path.clone());
                        missing = true;
                    }
                    Err(_) => break,
                }
                match path.parent() {
                    Some(parent) if parent == root => {
                        record_parent(&mut parents, root);
                        break;
                    }
                    Some(parent) if parent.starts_with(root) => path = parent.to_owned(),
                    _ => break,
                }
            }
        }
        let mut paths: Vec<PathBuf> = paths.into_iter().collect();
        paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        Self {
            root: root.to_owned(),
            paths,
            parents,
        }
    }

    /// Keeps `path` and its ancestors (the working directory created for the step).
    fn keep_ancestors_of(&mut self, path: &Path) {
        self.paths.retain(|stub| !path.starts_with(stub));
    }

    /// Whether `path` still resolves to itself inside the root (the command may have replaced
    /// a parent with a symbolic link; never follow it out of the rootfs).
    fn unmoved(&self, path: &Path) -> bool {
        let Ok(relative) = path.strip_prefix(&self.root) else {
            return false;
        };
        resolve_in_root(&self.root, relative).is_ok_and(|p| p == path)
    }

    fn clean(self) {
        for path in &self.paths {
            let Ok(meta) = fs::symlink_metadata(path) else {
                continue;
            };
            if !self.unmoved(path) {
                continue;
            }
            let removed = if meta.is_dir() {
                let empty = fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none());
                if !empty {
                    continue;
                }
                fs::remove_dir(path)
            } else if meta.is_file() && meta.len() == 0 {
                fs::remove_file(path)
            } else {
                continue;
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove mount stub");
            }
        }
        for (dir, before) in &self.parents {
            let unchanged = self.unmoved(dir) && dir_entries(dir).as_ref() == Some(&before.entries);
            if !unchanged {
                continue;
            }
            if let Err(e) = filetime::set_file_times(dir, before.atime, before.mtime) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot restore directory times");
            }
        }
    }
}

fn record_parent(parents: &mut BTreeMap<PathBuf, ParentState>, dir: &Path) {
    if parents.contains_key(dir) {
        return;
    }
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let Some(entries) = dir_entries(dir) else {
        return;
    };
    parents.insert(
        dir.to_owned(),
        ParentState {
            entries,
            atime: FileTime::from_last_access_time(&meta),
            mtime: FileTime::from_last_modification_time(&meta),
        },
    );
}

fn dir_entries(dir: &Path) -> Option<BTreeSet<OsString>> {
    fs::read_dir(dir)
        .ok()?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Where the busybox rootfs template is cached between test runs.
    const BUSYBOX_CACHE: &str = "/var/tmp/strata-test-busybox";

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        app:x:1000:1000:app:/home/app:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nwheel:x:10:root\nnogroup:x:65534:\napp:x:1000:\nextra:x:2000:app\n";

    static TEMPLATE_LOCK: Mutex<()> = Mutex::new(());
    static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

    /// A rootfs with busybox (and its applets in /bin), /etc/passwd and /etc/group, built once
    /// from Debian's busybox-static package and cached under [`BUSYBOX_CACHE`].
    fn busybox_template() -> PathBuf {
        let cache = Path::new(BUSYBOX_CACHE);
        let template = cache.join("rootfs");
        let _guard = TEMPLATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if template.join("bin/busybox").exists() {
            return template;
        }
        fs::create_dir_all(cache).unwrap();
        let work = tempfile::tempdir_in(cache).unwrap();
        let status = Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(work.path())
            .stdout(Stdio::null())
            .status()
            .expect("apt-get must be available to fetch busybox-static");
        assert!(status.success(), "apt-get download busybox-static failed");
        let deb = fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension() == Some(OsStr::new("deb")))
            .expect("apt-get download left no .deb");
        let extracted = work.path().join("x");
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&extracted)
            .status()
            .unwrap();
        assert!(status.success(), "dpkg-deb -x {} failed", deb.display());
        let staging = work.path().join("rootfs");
        fs::create_dir_all(staging.join("bin")).unwrap();
        fs::create_dir_all(staging.join("etc")).unwrap();
        fs::copy(extracted.join("bin/busybox"), staging.join("bin/busybox")).unwrap();
        let list = Command::new(staging.join("bin/busybox"))
            .arg("--list")
            .output()
            .unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                symlink("busybox", staging.join("bin").join(applet)).unwrap();
            }
        }
        fs::write(staging.join("etc/passwd"), PASSWD).unwrap();
        fs::write(staging.join("etc/group"), GROUP).unwrap();
        if let Err(e) = fs::rename(&staging, &template) {
            assert!(template.join("bin/busybox").exists(), "caching rootfs: {e}");
        }
        template
    }

    struct Fixture {
        dir: tempfile::TempDir,
        rootfs: PathBuf,
        runc: Runc,
    }

    /// A fresh copy of the busybox rootfs and a runc with its own state directory.
    fn fixture() -> Fixture {
        let template = busybox_template();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(template.join("."))
            .arg(&rootfs)
            .status()
            .unwrap();
        assert!(status.success());
        let runc = Runc::new(None, &dir.path().join("state")).unwrap();
        Fixture { dir, rootfs, runc }
    }

    fn unique_id(tag: &str) -> String {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        format!("strata-test-{tag}-{}-{n}", std::process::id())
    }

    fn request(f: &Fixture, args: &[&str]) -> RunRequest {
        RunRequest {
            rootfs: f.rootfs.clone(),
            process: ProcessSpec {
                args: args.iter().map(|a| a.to_string()).collect(),
                env: Vec::new(),
                cwd: "/".to_owned(),
                user: String::new(),
                hostname: String::new(),
            },
            mounts: Vec::new(),
            network: NetworkMode::None,
            id: unique_id("run"),
        }
    }

    fn sh(f: &Fixture, script: &str) -> RunRequest {
        request(f, &["/bin/sh", "-c", script])
    }

    fn run(f: &Fixture, req: &RunRequest) -> (i32, String) {
        let mut out = Vec::new();
        let code = f
            .runc
            .run(req, &mut |chunk| out.extend_from_slice(chunk))
            .unwrap();
        (code, String::from_utf8(out).unwrap())
    }

    fn interfaces(proc_net_dev: &str) -> BTreeSet<String> {
        proc_net_dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|name| name.trim().to_owned())
            .collect()
    }

    #[test]
    fn exit_codes_are_returned() {
        let f = fixture();
        assert_eq!(run(&f, &request(&f, &["true"])).0, 0);
        assert_eq!(run(&f, &sh(&f, "exit 3")).0, 3);
        assert_eq!(run(&f, &request(&f, &["false"])).0, 1);
    }

    #[test]
    fn killed_command_returns_128_plus_signal() {
        let f = fixture();
        let req = sh(&f, "echo ready; sleep 60");
        let started = Instant::now();
        let mut killed = false;
        let code = f
            .runc
            .run(&req, &mut |chunk| {
                if !killed && chunk.windows(5).any(|w| w == b"ready") {
                    f.runc.kill(&req.id, Signal::SIGKILL).unwrap();
                    killed = true;
                }
            })
            .unwrap();
        assert!(killed);
        assert_eq!(code, 128 + 9);
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn stdout_and_stderr_are_merged_in_order_of_arrival() {
        let f = fixture();
        // runc relays the two streams separately: writes apart in time arrive in order.
        let (code, out) = run(
            &f,
            &sh(
                &f,
                "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; \
                 echo err2 >&2",
            ),
        );
        assert_eq!(code, 0);
        assert_eq!(out, "out1\nerr1\nout2\nerr2\n");

        // Back-to-back writes: every line arrives, each stream in its own order.
        let (code, out) = run(
            &f,
            &sh(&f, "for i in 1 2 3 4 5; do echo o$i; echo e$i >&2; done"),
        );
        assert_eq!(code, 0);
        let stream = |p: char| -> Vec<&str> { out.lines().filter(|l| l.starts_with(p)).collect() };
        assert_eq!(stream('o'), ["o1", "o2", "o3", "o4", "o5"]);
        assert_eq!(stream('e'), ["e1", "e2", "e3", "e4", "e5"]);
        assert_eq!(out.lines().count(), 10);

        let mut total = 0;
        let mut chunks = 0;
        let code = f
            .runc
            .run(&sh(&f, "head -c 3000000 /dev/zero"), &mut |chunk| {
                total += chunk.len();
                chunks += 1;
            })
            .unwrap();
        assert_eq!(code, 0);
        assert_eq!(total, 3_000_000);
        assert!(chunks > 1);
    }

    #[test]
    fn environment_is_passed_and_path_defaulted() {
        let f = fixture();
        let mut req = sh(&f, "echo \"$FOO\"; echo \"$PATH\"; echo \"$HOME\"");
        req.process.env = vec!["FOO=bar baz".to_owned()];
        let (code, out) = run(&f, &req);
        assert_eq!(code, 0);
        assert_eq!(out, format!("bar baz\n{DEFAULT_PATH_ENV}\n/root\n"));

        req.id = unique_id("env");
        req.process.env = vec!["PATH=/bin".to_owned()];
        assert_eq!(run(&f, &req).1, "\n/bin\n/root\n");
    }

    #[test]
    fn missing_working_directory_is_created_owned_by_root() {
        let f = fixture();
        let mut req = sh(&f, "pwd; id -u");
        req.process.cwd = "/work/deep/dir".to_owned();
        req.process.user = "app".to_owned();
        let (code, out) = run(&f, &req);
        assert_eq!(code, 0);
        assert_eq!(out, "/work/deep/dir\n1000\n");
        for dir in ["work", "work/deep", "work/deep/dir"] {
            let meta = fs::metadata(f.rootfs.join(dir)).unwrap();
            assert!(meta.is_dir());
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{dir}");
            assert_eq!(meta.mode() & 0o7777, 0o755, "{dir}");
        }
    }

    #[test]
    fn user_values_resolve_like_docker_inside_the_container() {
        let f = fixture();
        let cases = [
            ("", "0 0 0"),
            ("app", "1000 1000 1000 2000"),
            ("1000", "1000 1000 1000 2000"),
            ("app:extra", "1000 2000 2000"),
            ("1000:2000", "1000 2000 2000"),
            ("nobody", "65534 65534 65534"),
            ("4242", "4242 0 0"),
            ("4242:4343", "4242 4343 4343"),
        ];
        for (user, expected) in cases {
            let mut req = sh(&f, "echo $(id -u) $(id -g) $(id -G)");
            req.process.user = user.to_owned();
            let (code, out) = run(&f, &req);
            assert_eq!(code, 0, "USER {user:?}: {out}");
            assert_eq!(out.trim(), expected, "USER {user:?}");
        }

        let mut req = request(&f, &["true"]);
        req.process.user = "ghost".to_owned();
        let err = f.runc.run(&req, &mut |_| {}).unwrap_err();
        assert!(matches!(&err, ExecError::UnknownUser { name, .. } if name == "ghost"));
        assert!(err.to_string().contains("ghost"), "{err}");
    }

    #[test]
    fn resolve_user_reads_passwd_and_group_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("etc")).unwrap();
        // /etc/passwd is an absolute symlink: it must resolve inside the rootfs.
        fs::write(root.join("etc/passwd.real"), PASSWD).unwrap();
        symlink("/etc/passwd.real", root.join("etc/passwd")).unwrap();
        fs::write(root.join("etc/group"), GROUP).unwrap();

        // The primary gid always comes first among the additional ones (BuildKit's `id`
        // output: no USER gives `groups=0(root),10(wheel)`, `USER 4242` gives `groups=0(root)`).
        type Expected = (u32, u32, &'static [u32]);
        let cases: [(&str, Expected); 13] = [
            ("", (0, 0, &[0, 10])),
            ("root", (0, 0, &[0, 10])),
            ("app", (1000, 1000, &[1000, 2000])),
            ("1000", (1000, 1000, &[1000, 2000])),
            ("app:extra", (1000, 2000, &[2000])),
            ("app:2000", (1000, 2000, &[2000])),
            ("app:777", (1000, 777, &[777])),
            ("1000:2000", (1000, 2000, &[2000])),
            ("5:6", (5, 6, &[6])),
            ("4242", (4242, 0, &[0])),
            (":extra", (0, 2000, &[2000])),
            ("app:", (1000, 1000, &[1000, 2000])),
            ("nobody", (65534, 65534, &[65534])),
        ];
        for (user, (uid, gid, groups)) in cases {
            assert_eq!(
                resolve_user(root, user).unwrap(),
                (uid, gid, groups.to_vec()),
                "USER {user:?}"
            );
        }

        let err = resolve_user(root, "ghost").unwrap_err();
        assert!(
            matches!(&err, ExecError::UnknownUser { name, passwd, .. }
                if name == "ghost" && passwd.ends_with("etc/passwd.real")),
            "{err:?}"
        );
        let err = resolve_user(root, "app:ghosts").unwrap_err();
        assert!(
            matches!(&err, ExecError::UnknownGroup { name, .. } if name == "ghosts"),
            "{err:?}"
        );
        assert!(err.to_string().contains("ghosts"));
        let err = resolve_user(root, "3000000000").unwrap_err();
        assert!(matches!(err, ExecError::InvalidUser { .. }), "{err:?}");

        // Without /etc/passwd and /etc/group, only numeric values work.
        let bare = tempfile::tempdir().unwrap();
        assert_eq!(resolve_user(bare.path(), "123").unwrap(), (123, 0, vec![0]));
        assert_eq!(
            resolve_user(bare.path(), "123:45").unwrap(),
            (123, 45, vec![45])
        );
        assert!(matches!(
            resolve_user(bare.path(), "app"),
            Err(ExecError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve_user(bare.path(), "123:staff"),
            Err(ExecError::UnknownGroup { .. })
        ));
    }

    #[test]
    fn bind_mounts_are_readonly_or_writable() {
        let f = fixture();
        let host = f.dir.path().join("host");
        fs::create_dir_all(host.join("ro")).unwrap();
        fs::create_dir_all(host.join("rw")).unwrap();
        fs::write(host.join("ro/in"), "input\n").unwrap();
        fs::write(host.join("app.conf"), "conf\n").unwrap();
        let mut req = sh(
            &f,
            "cat /ro/in; echo written > /data/out; \
             if touch /ro/new 2>/dev/null; then echo ro-writable; else echo ro-denied; fi; \
             cat /etc/app.conf",
        );
        req.mounts = vec![
            Mount {
                destination: "/ro".to_owned(),
                source: MountSource::Bind {
                    source: host.join("ro"),
                    readonly: true,
                },
            },
            Mount {
                destination: "/data".to_owned(),
                source: MountSource::Bind {
                    source: host.join("rw"),
                    readonly: false,
                },
            },
            Mount {
                destination: "/etc/app.conf".to_owned(),
                source: MountSource::Bind {
                    source: host.join("app.conf"),
                    readonly: true,
                },
            },
        ];
        let (code, out) = run(&f, &req);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, "input\nro-denied\nconf\n");
        assert_eq!(
            fs::read_to_string(host.join("rw/out")).unwrap(),
            "written\n"
        );
        assert!(!host.join("ro/new").exists());
        for stub in ["ro", "data", "etc/app.conf"] {
            assert!(!f.rootfs.join(stub).exists(), "stub {stub} left in rootfs");
        }
    }

    #[test]
    fn tmpfs_mount_is_sized_and_leaves_nothing() {
        let f = fixture();
        let mut req = sh(
            &f,
            "grep ' /scratch ' /proc/mounts; echo data > /scratch/keep; \
             if dd if=/dev/zero of=/scratch/f bs=1024 count=2048 2>/dev/null; \
             then echo fits; else echo full; fi",
        );
        req.mounts = vec![Mount {
            destination: "/scratch".to_owned(),
            source: MountSource::Tmpfs {
                size: Some(1024 * 1024),
            },
        }];
        let (code, out) = run(&f, &req);
        assert_eq!(code, 0, "{out}");
        assert!(out.starts_with("tmpfs /scratch tmpfs "), "{out}");
        assert!(out.contains("size=1024k"), "{out}");
        assert!(out.ends_with("full\n"), "{out}");
        assert!(!f.rootfs.join("scratch").exists());
    }

    #[test]
    fn network_none_has_only_loopback_and_generated_files() {
        let f = fixture();
        let (code, out) = run(
            &f,
            &sh(
                &f,
                "cat /proc/net/dev; echo; cat /sys/class/net/lo/flags; hostname; cat /etc/hosts",
            ),
        );
        assert_eq!(code, 0, "{out}");
        let (net_dev, rest) = out.split_once("\n\n").unwrap();
        assert_eq!(interfaces(net_dev), BTreeSet::from(["lo".to_owned()]));
        let mut lines = rest.lines();
        let flags = lines.next().unwrap().trim_start_matches("0x");
        assert_eq!(u32::from_str_radix(flags, 16).unwrap() & 1, 1, "lo is up");
        assert_eq!(lines.next(), Some(DEFAULT_HOSTNAME));
        assert_eq!(
            lines.next(),
            Some(format!("127.0.0.1\tlocalhost {DEFAULT_HOSTNAME}").as_str())
        );
        // The loopback interface works: a server and a client talk over 127.0.0.1.
        let (code, out) = run(
            &f,
            &sh(
                &f,
                // The server's stdin stays open (a pipe from `sleep`): busybox nc may stop
                // reading its socket once its stdin ends. The file is polled instead.
                "sleep 30 | nc -l -p 7777 > /tmp-received & \
                 for i in $(seq 100); do echo hello | nc 127.0.0.1 7777 2>/dev/null && break; sleep 0.1; done; \
                 for i in $(seq 100); do [ -s /tmp-received ] && break; sleep 0.1; done; \
                 cat /tmp-received",
            ),
        );
        assert_eq!((code, out.as_str()), (0, "hello\n"));
    }

    #[test]
    fn network_host_shares_the_host_interfaces() {
        let f = fixture();
        let mut req = sh(
            &f,
            "cat /proc/net/dev; echo; hostname; cat /etc/resolv.conf",
        );
        req.network = NetworkMode::Host;
        req.process.hostname = "builder-1".to_owned();
        let (code, out) = run(&f, &req);
        assert_eq!(code, 0, "{out}");
        let (net_dev, rest) = out.split_once("\n\n").unwrap();
        let host = fs::read_to_string("/proc/net/dev").unwrap();
        assert_eq!(interfaces(net_dev), interfaces(&host));
        let (hostname, resolv) = rest.split_once('\n').unwrap();
        assert_eq!(hostname, "builder-1");
        if let Ok(host_resolv) = fs::read_to_string("/etc/resolv.conf") {
            assert_eq!(resolv, host_resolv);
        }
    }

    #[test]
    fn mount_stubs_are_removed_after_the_run() {
        let f = fixture();
        let host_file = f.dir.path().join("x.conf");
        fs::write(&host_file, "x").unwrap();
        let etc_mtime =
            FileTime::from_last_modification_time(&fs::metadata(f.rootfs.join("etc")).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        let mut req = sh(
            &f,
            "echo kept > /kept; mkdir /mnt/y; ls /proc/self >/dev/null",
        );
        req.mounts = vec![
            Mount {
                destination: "/a/b/c".to_owned(),
                source: MountSource::Tmpfs { size: None },
            },
            Mount {
                destination: "/etc/conf.d/x.conf".to_owned(),
                source: MountSource::Bind {
                    source: host_file,
                    readonly: true,
                },
            },
            Mount {
                destination: "/mnt/x".to_owned(),
                source: MountSource::Tmpfs { size: None },
            },
        ];
        let (code, out) = run(&f, &req);
        assert_eq!(code, 0, "{out}");
        for gone in [
            "proc",
            "dev",
            "sys",
            "etc/resolv.conf",
            "etc/hosts",
            "a",
            "etc/conf.d",
            "mnt/x",
        ] {
            assert!(
                fs::symlink_metadata(f.rootfs.join(gone)).is_err(),
                "{gone} left in rootfs"
            );
        }
        for kept in ["kept", "mnt/y", "etc/passwd", "bin/busybox"] {
            assert!(f.rootfs.join(kept).exists(), "{kept} missing");
        }
        let etc_after = fs::metadata(f.rootfs.join("etc")).unwrap();
        assert_eq!(
            FileTime::from_last_modification_time(&etc_after),
            etc_mtime,
            "/etc mtime restored"
        );
    }

    #[test]
    fn existing_mount_points_are_kept() {
        let f = fixture();
        fs::create_dir(f.rootfs.join("proc")).unwrap();
        fs::create_dir(f.rootfs.join("cache")).unwrap();
        fs::write(f.rootfs.join("etc/resolv.conf"), "").unwrap();
        let mut req = sh(&f, "cat /etc/resolv.conf >/dev/null");
        req.mounts = vec![Mount {
            destination: "/cache".to_owned(),
            source: MountSource::Tmpfs { size: None },
        }];
        assert_eq!(run(&f, &req).0, 0);
        for kept in ["proc", "cache", "etc/resolv.conf"] {
            assert!(f.rootfs.join(kept).exists(), "{kept} was removed");
        }
        assert_eq!(fs::read(f.rootfs.join("etc/resolv.conf")).unwrap(), b"");
    }

    #[test]
    fn twenty_sequential_runs_leave_no_state() {
        let f = fixture();
        let mut ids = BTreeSet::new();
        let mut total = Duration::ZERO;
        for _ in 0..20 {
            let req = request(&f, &["true"]);
            assert!(ids.insert(req.id.clone()));
            let started = Instant::now();
            assert_eq!(run(&f, &req).0, 0);
            total += started.elapsed();
            let leftovers: Vec<_> = fs::read_dir(f.runc.runc_root())
                .unwrap()
                .chain(fs::read_dir(f.dir.path().join("state/bundles")).unwrap())
                .map(|e| e.unwrap().path())
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            assert!(!Path::new("/sys/fs/cgroup/pids").join(&req.id).exists());
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(f.rootfs.to_str().unwrap()));
        assert!(fs::symlink_metadata(f.rootfs.join("proc")).is_err());
        eprintln!(
            "runc run of `true`: {:.1} ms on average over 20 runs",
            total.as_secs_f64() * 1000.0 / 20.0
        );
    }

    #[test]
    fn start_failure_is_an_error_with_runc_message() {
        let f = fixture();
        let req = request(&f, &["/no/such/binary"]);
        let mut out = Vec::new();
        let err = f
            .runc
            .run(&req, &mut |c| out.extend_from_slice(c))
            .unwrap_err();
        match &err {
            ExecError::Start { id, message, .. } => {
                assert_eq!(id, &req.id);
                assert!(message.contains("/no/such/binary"), "{message}");
            }
            other => panic!("expected a start error, got {other:?}"),
        }
        assert!(err.to_string().contains("runc"));
        assert!(!f.dir.path().join("state/bundles").join(&req.id).exists());
    }

    #[test]
    fn invalid_requests_are_rejected_before_running() {
        let f = fixture();
        let mut req = request(&f, &["true"]);
        req.id = "a/b".to_owned();
        assert!(matches!(
            f.runc.run(&req, &mut |_| {}),
            Err(ExecError::InvalidId { .. })
        ));
        req.id = "..".to_owned();
        assert!(matches!(
            f.runc.run(&req, &mut |_| {}),
            Err(ExecError::InvalidId { .. })
        ));

        let mut req = request(&f, &["true"]);
        req.mounts = vec![Mount {
            destination: "relative".to_owned(),
            source: MountSource::Tmpfs { size: None },
        }];
        assert!(matches!(
            f.runc.run(&req, &mut |_| {}),
            Err(ExecError::InvalidMount { .. })
        ));
        req.mounts = vec![Mount {
            destination: "/data".to_owned(),
            source: MountSource::Bind {
                source: f.dir.path().join("missing"),
                readonly: true,
            },
        }];
        let err = f.runc.run(&req, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ExecError::BindSource { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"));

        let mut req = request(&f, &["true"]);
        req.process.cwd = "/etc/passwd/sub".to_owned();
        let err = f.runc.run(&req, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ExecError::WorkingDir { .. }), "{err:?}");
        assert!(err.to_string().contains("/etc/passwd/sub"), "{err}");

        let mut req = request(&f, &[]);
        let err = f.runc.run(&req, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ExecError::Start { .. }), "{err:?}");

        req.rootfs = f.dir.path().join("no-rootfs");
        assert!(matches!(
            f.runc.run(&req, &mut |_| {}),
            Err(ExecError::Rootfs { .. })
        ));
        let leftovers = fs::read_dir(f.dir.path().join("state/bundles")).unwrap();
        assert_eq!(leftovers.count(), 0);
    }

    #[test]
    fn missing_runtime_tells_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_runtime(Some(dir.path().as_os_str()), &[]).unwrap_err();
        assert!(err.to_string().contains("apt-get install runc"), "{err}");
        let err = Runc::new(Some(dir.path().join("runc")), dir.path()).unwrap_err();
        assert!(matches!(err, ExecError::RuntimeNotExecutable { .. }));
        assert!(err.to_string().contains("apt-get install runc"), "{err}");

        let fake = dir.path().join("bin");
        fs::create_dir(&fake).unwrap();
        fs::write(fake.join("runc"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(fake.join("runc"), fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([dir.path().join("nothing"), fake.clone()]).unwrap();
        assert_eq!(find_runtime(Some(&path), &[]).unwrap(), fake.join("runc"));
    }

    #[test]
    fn resolve_in_root_never_leaves_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("real/sub")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../../../real/sub", root.join("up")).unwrap();
        symlink("/etc", root.join("hostetc")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let r = |p: &str| resolve_in_root(root, Path::new(p)).unwrap();
        assert_eq!(r("/abs/sub"), root.join("real/sub"));
        assert_eq!(r("/up/x"), root.join("real/sub/x"));
        assert_eq!(r("/../../etc/passwd"), root.join("etc/passwd"));
        assert_eq!(r("/hostetc/passwd"), root.join("etc/passwd"));
        assert_eq!(r("/"), root.to_owned());
        assert!(resolve_in_root(root, Path::new("/loop/x")).is_err());
    }

    #[test]
    fn working_dir_through_a_symlink_stays_in_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let outside = dir.path().join("outside");
        symlink(&outside, root.join("escape")).unwrap();
        let created = create_working_dir(&root, "/escape/work").unwrap();
        assert!(created.starts_with(&root));
        assert!(!outside.exists());
        assert!(
            root.join(outside.strip_prefix("/").unwrap())
                .join("work")
                .is_dir()
        );
    }

    #[test]
    fn nofile_limit_respects_what_the_host_allows() {
        let status = "Name:\tx\nCapEff:\t000001fffeffffff\n";
        assert!(!has_capability(status, CAP_SYS_RESOURCE));
        assert!(has_capability(status, 21));
        assert!(has_capability(
            "CapEff:\t000001ffffffffff\n",
            CAP_SYS_RESOURCE
        ));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 20000                files\n";
        assert_eq!(nofile_hard_limit(limits), Some(20000));
        assert_eq!(
            nofile_hard_limit("Max open files            unlimited            unlimited   files\n"),
            None
        );
        let limit = nofile_limit();
        assert!(limit > 0 && limit <= NOFILE_LIMIT);
    }

    #[test]
    fn resolv_conf_without_loopback_servers() {
        let host = "search example.com\nnameserver 127.0.0.53\nnameserver ::1\n\
                    nameserver 10.0.0.2\noptions edns0\n";
        assert_eq!(
            isolated_resolv_conf(host),
            "search example.com\nnameserver 10.0.0.2\noptions edns0\n"
        );
        assert_eq!(
            isolated_resolv_conf("nameserver 127.0.0.1\n"),
            "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
    }

    #[test]
    fn spec_follows_docker_defaults() {
        let input = |network| SpecInput {
            rootfs: Path::new("/rootfs"),
            args: &[],
            env: &[],
            cwd: "/",
            uid: 1000,
            gid: 1000,
            additional_gids: &[2000],
            hostname: "h",
            network,
            nofile: NOFILE_LIMIT,
            mounts: default_mounts(),
        };
        let spec = runtime_spec(&input(NetworkMode::None));
        let namespaces = |spec: &Value| -> Vec<String> {
            spec["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["type"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(namespaces(&spec), ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(
            namespaces(&runtime_spec(&input(NetworkMode::Host))),
            ["pid", "ipc", "uts", "mount"]
        );
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert_eq!(spec["process"]["noNewPrivileges"], false);
        assert_eq!(spec["process"]["rlimits"][0]["soft"], 1_048_576);
        assert_eq!(spec["process"]["user"]["additionalGids"], json!([2000]));
        assert!(
            spec["linux"]["maskedPaths"]
                .as_array()
                .unwrap()
                .contains(&json!("/proc/kcore"))
        );
    }
}
