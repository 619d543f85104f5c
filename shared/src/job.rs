//! Builds and stage jobs as they travel: the request a client submits ([`BuildRequest`]), the
//! unit of work the coordinator hands to a worker (one stage of a Dockerfile for one platform,
//! [`StageJob`]), what a finished job returns ([`StageOutput`]), the images of a finished build
//! ([`TargetImage`]), and how a job fails ([`BuildError`]).
//!
//! These are wire types (rkyv) as well as serde types: the wire messages carry them as they
//! are, and the replicated state keeps them in its snapshots.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dockerfile::stages::BuildOptions;
use crate::dockerfile::{FrontendError, Range};
use crate::oci::{ImageConfig, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_LAYER_ZSTD};
use crate::platform::{Emulation, Platform};
use crate::store::{BlobMeta, StoreError};

/// A build as a client submits it to a cluster.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BuildRequest {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The Dockerfile's file name, as errors name it (`Dockerfile.dev:3: ...`).
    pub dockerfile_name: String,
    /// The build context: its manifest in the cluster's store (a remote client), or its
    /// directory (the embedded client, in the coordinator's own process).
    pub context: JobContext,
    /// `--secret`: secret id to the file holding it. Only the embedded client, whose worker
    /// is on the same machine, may send secrets.
    pub secrets: BTreeMap<String, String>,
    /// The ignore file named after the Dockerfile (`Dockerfile.dockerignore`, beside it), which
    /// takes precedence over the context's `.dockerignore`, as BuildKit reads it.
    pub dockerignore: Option<String>,
    pub options: BuildOptions,
    /// Target platforms, at least one.
    pub platforms: Vec<Platform>,
    pub no_cache: bool,
    /// `--allow network.host`.
    pub allow_host_network: bool,
    pub compression: Compression,
    pub emulation: Emulation,
    /// The queue it is fair-shared in.
    pub tenant: String,
}

/// The largest Dockerfile a build request may carry.
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;
/// The most target platforms one build may ask for.
pub const MAX_PLATFORMS: usize = 32;

impl BuildRequest {
    /// Checks what a coordinator relies on before it plans the request: a Dockerfile of a
    /// sane size, platforms in their normal form, a context in the store named by a blake3
    /// key, and names that fit in logs and labels. A request from another machine
    /// (`in_process` false) may not name a directory or carry secrets.
    pub fn validate(&self, in_process: bool) -> Result<(), String> {
        if self.dockerfile.trim().is_empty() {
            return Err("the Dockerfile is empty".into());
        }
        if self.dockerfile.len() > MAX_DOCKERFILE_BYTES {
            return Err(format!(
                "the Dockerfile is {} bytes; at most {MAX_DOCKERFILE_BYTES} are accepted",
                self.dockerfile.len()
            ));
        }
        if self.platforms.is_empty() || self.platforms.len() > MAX_PLATFORMS {
            return Err(format!(
                "{} target platforms; 1 to {MAX_PLATFORMS} are accepted",
                self.platforms.len()
            ));
        }
        for p in &self.platforms {
            check_platform(p)?;
        }
        match &self.context {
            JobContext::None => {}
            JobContext::Store(id) if is_blake3_hex(id) => {}
            JobContext::Store(id) => {
                return Err(format!(
                    "context {id:?} is not a blake3 key (64 lower-case hex digits)"
                ));
            }
            JobContext::Local(_) if in_process => {}
            JobContext::Local(dir) => {
                return Err(format!(
                    "a client may not name a directory of the cluster's machines ({dir}): upload the context"
                ));
            }
        }
        if self
            .dockerignore
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DOCKERFILE_BYTES)
        {
            return Err(format!(
                "the ignore file is larger than {MAX_DOCKERFILE_BYTES} bytes"
            ));
        }
        if !self.secrets.is_empty() && !in_process {
            return Err(
                "secrets stay on the client's machine: a cluster build cannot use --secret".into(),
            );
        }
        check_file_name(&self.dockerfile_name)?;
        check_name("tenant", &self.tenant)?;
        if let Some((k, _)) = self.options.build_args.iter().find(|(k, _)| k.is_empty()) {
            return Err(format!("a build argument has an empty name ({k:?})"));
        }
        Ok(())
    }
}

/// A platform as it arrives from another node must be in the normal form parsing gives it.
pub fn check_platform(p: &Platform) -> Result<(), String> {
    match p.to_string().parse::<Platform>() {
        Ok(q) if &q == p => Ok(()),
        _ => Err(format!("platform {p} is not in its normal form")),
    }
}

fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(format!("Dockerfile name {name:?} is not a file name"));
    }
    Ok(())
}

/// Whether `s` is a blake3 key as the store names it: 64 lower-case hex digits.
pub fn is_blake3_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be 1 to 128 letters, digits, '-', '_', '.' or '/'"
        ))
    }
}

/// The image built for one target platform: the output of its target stage.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct TargetImage {
    pub platform: Platform,
    pub output: StageOutput,
}

/// The result of a stage job: what a later stage, or the exporter, builds on.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct StageOutput {
    /// The image config after the stage's last instruction (history included).
    pub config: ImageConfig,
    /// The layers, bottom first; every one is in the store.
    pub layers: Vec<BlobMeta>,
    /// The cache key of the stage's filesystem state.
    pub key: String,
    /// The environment the stage's commands ran with at its end (ENV and ARG values).
    pub env: Vec<(String, String)>,
    /// Build arguments declared by the stage and the stages it is built on.
    pub declared: Vec<(String, Option<String>)>,
}

/// Where a job's build context is.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum JobContext {
    /// The build reads no context.
    #[default]
    None,
    /// In the cluster's store under this manifest key: the worker materialises it.
    Store(String),
    /// A directory on the worker's machine (the embedded worker, or a context the worker has
    /// materialised). A coordinator never sends this to a remote worker.
    Local(String),
}

/// One stage to build for one platform.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct StageJob {
    /// Identifies the job in progress events.
    pub id: usize,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The Dockerfile's file name, as errors name it.
    pub dockerfile_name: String,
    pub options: BuildOptions,
    pub build_platform: Platform,
    /// The platform the build targets (the value of `TARGETPLATFORM`).
    pub target_platform: Platform,
    /// Index of the stage in the Dockerfile.
    pub stage: usize,
    /// Outputs of the stages this one uses, by stage index.
    pub inputs: BTreeMap<usize, StageOutput>,
    /// The build context.
    pub context: JobContext,
    /// Prefix progress labels with the platform (multi-platform builds).
    pub show_platform: bool,
    pub no_cache: bool,
    /// `--secret id=..,src=..`: secret id to the file holding it, on the worker's machine
    /// (embedded builds only: secrets never travel to a cluster).
    pub secrets: BTreeMap<String, String>,
    /// The ignore file named after the Dockerfile, when there is one; otherwise the context's
    /// `.dockerignore` applies.
    pub dockerignore: Option<String>,
    /// `--allow network.host`.
    pub allow_host_network: bool,
    pub compression: Compression,
}

impl StageJob {
    /// Checks a job as it arrives from a coordinator: platforms in normal form, a context in
    /// the store (never a path on this machine), and no secrets (they never leave the machine
    /// of an embedded build).
    pub fn validate_remote(&self) -> Result<(), String> {
        check_platform(&self.build_platform)?;
        check_platform(&self.target_platform)?;
        match &self.context {
            JobContext::Store(id) if is_blake3_hex(id) => {}
            JobContext::None => {}
            JobContext::Store(id) => {
                return Err(format!("context {id:?} is not a blake3 key"));
            }
            JobContext::Local(dir) => {
                return Err(format!(
                    "a remote job may not name a directory of this machine ({dir})"
                ));
            }
        }
        if !self.secrets.is_empty() {
            return Err("a remote job may not carry secrets".into());
        }
        if self.dockerfile.len() > MAX_DOCKERFILE_BYTES {
            return Err("the job's Dockerfile is too large".into());
        }
        check_file_name(&self.dockerfile_name)
    }

    /// The directory holding the job's build context, once it is on this machine.
    pub fn context_dir(&self) -> Result<PathBuf, BuildError> {
        match &self.context {
            JobContext::Local(dir) => Ok(PathBuf::from(dir)),
            JobContext::None => Err(BuildError::Other(
                "the build has no context: nothing can be copied from it".into(),
            )),
            JobContext::Store(id) => Err(BuildError::Other(format!(
                "the build context {id} was not materialised on this worker"
            ))),
        }
    }
}

/// A failed build step, saying where and what.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An error about a Dockerfile line (the CLI shows the line).
    #[error("{}", .0.message)]
    Dockerfile(FrontendError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

impl BuildError {
    pub fn at(range: Range, message: impl Into<String>) -> Self {
        BuildError::Dockerfile(FrontendError::at(range, message))
    }

    /// The Dockerfile lines the error is about, if any.
    pub fn range(&self) -> Option<Range> {
        match self {
            BuildError::Dockerfile(e) => e.range,
            _ => None,
        }
    }
}

impl From<FrontendError> for BuildError {
    fn from(e: FrontendError) -> Self {
        BuildError::Dockerfile(e)
    }
}

/// How a layer blob is compressed.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip, the media type every registry and runtime accepts.
    #[default]
    Gzip,
    /// zstd, with a content checksum in the frame.
    Zstd,
    /// A plain tar.
    Uncompressed,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => MEDIA_OCI_LAYER_GZIP,
            Compression::Zstd => MEDIA_OCI_LAYER_ZSTD,
            Compression::Uncompressed => MEDIA_OCI_LAYER_TAR,
        }
    }

    /// The file-name extension given to blobs compressed this way (`tar.gz`, `tar.zst`, `tar`).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip => "tar.gz",
            Compression::Zstd => "tar.zst",
            Compression::Uncompressed => "tar",
        }
    }
}
