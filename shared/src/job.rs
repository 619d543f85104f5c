//! Stage jobs: the unit of work the coordinator hands to a worker (one stage of a Dockerfile
//! for one platform), what a finished job returns, and how a job fails.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dockerfile::stages::BuildOptions;
use crate::dockerfile::{FrontendError, Range};
use crate::oci::{ImageConfig, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_LAYER_ZSTD};
use crate::platform::Platform;
use crate::store::{BlobMeta, StoreError};

/// The result of a stage job: what a later stage, or the exporter, builds on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// One stage to build for one platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageJob {
    /// Identifies the job in progress events.
    pub id: usize,
    /// The Dockerfile's text.
    pub dockerfile: String,
    pub options: BuildOptions,
    pub build_platform: Platform,
    /// The platform the build targets (the value of `TARGETPLATFORM`).
    pub target_platform: Platform,
    /// Index of the stage in the Dockerfile.
    pub stage: usize,
    /// Outputs of the stages this one uses, by stage index.
    pub inputs: BTreeMap<usize, StageOutput>,
    /// The build context directory.
    pub context: PathBuf,
    /// Prefix progress labels with the platform (multi-platform builds).
    pub show_platform: bool,
    pub no_cache: bool,
    /// `--secret id=..,src=..`: secret id to the file holding it.
    pub secrets: BTreeMap<String, PathBuf>,
    /// `--allow network.host`.
    pub allow_host_network: bool,
    pub compression: Compression,
}

/// A stage job as a coordinator hands it to a remote worker: the JSON of
/// [`crate::wire::JobOffer::job_json`]. The build context travels through the shared blob store:
/// when `context_id` is set, the worker materialises that context (the key of its manifest,
/// written by the client's upload) and runs the job with `job.context` set to that directory;
/// `job.context` as sent is a path on the submitting machine and means nothing to the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterJob {
    pub job: StageJob,
    /// The build context in the shared store (a blake3 key), when the job reads one.
    pub context_id: Option<String>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
