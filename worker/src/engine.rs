//! The engine: runs one stage job — one stage of a Dockerfile for one platform — from its base
//! to its final image config and layers.
//!
//! A [`StageJob`] carries everything a worker needs: the Dockerfile, the build options, the
//! stage, the platform, and the [`StageOutput`]s of the stages it uses. The coordinator (or the
//! embedded one in `strata build`) sends jobs in dependency order; the same jobs will travel to
//! remote workers.
//!
//! For each instruction the engine expands the words in scope (BuildKit's rules, see
//! `strata_shared::dockerfile::stages`), applies metadata to the image config, and for RUN,
//! COPY, ADD and WORKDIR computes the step's cache key. A key the store already has is served
//! from the cache; otherwise the step runs in a fresh snapshot of the stage's layers, and the
//! snapshot's changes become a layer stored under its blake3 key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use strata_shared::cachekey::{KeyBuilder, image_key, scratch_key};
use strata_shared::dockerfile::Dockerfile;
use strata_shared::dockerfile::instructions::{
    Command, CommandLine, Instruction, MountType, Network, Run, SourcesAndDest, Stage,
    parse_command,
};
use strata_shared::dockerfile::parser;
use strata_shared::dockerfile::stages::{EnvList, Resolution, Scope, Source, resolve};
use strata_shared::oci::{DEFAULT_PATH, ImageConfig};
use strata_shared::platform::Platform;
use strata_shared::reference::ImageRef;
use strata_shared::store::{BlobMeta, BlobStore, CacheEntry, RECORD_VERSION};
use tokio::sync::Mutex;

use crate::copy::{
    CopySpec, DockerIgnore, Owner, copy_into, fetch_urls, source_digest, source_digest_cached,
};
use crate::executor::{self, MountSource, NetworkMode, ProcessSpec, RunRequest, Runc};
use crate::hashcache::HashCache;
use crate::layer::LayerBlob;
use crate::metadata::{self, StageFlags};
use crate::registry::RegistryClient;
use crate::snapshot::{ActiveSnapshot, SnapshotKind, Snapshotter};
pub use strata_shared::job::{BuildError, Compression, StageJob, StageOutput};
use strata_shared::progress::{Event, Progress};

/// How long a base image's resolution (tag to manifest) is reused: a build's stages share
/// it, a later build resolves the tag again.
const PULL_MEMO_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The exit code reported for a container that was never started because its step had been
/// cancelled (128 + SIGKILL, as for a container killed while it ran). Nobody reads it: the job
/// it belongs to is gone.
const CANCELLED_EXIT: i32 = 137;

/// The latest resolution of one base image for one platform, and when it was made.
type PullSlot = Arc<Mutex<Option<(Instant, Pulled)>>>;

/// A base image pulled into the store.
#[derive(Debug, Clone)]
struct Pulled {
    manifest_digest: String,
    config: ImageConfig,
    layers: Vec<BlobMeta>,
    /// Whether any layer had to be downloaded (else the step is reported as cached).
    downloaded: bool,
}

/// Directories of the engine's state.
#[derive(Debug, Clone)]
struct Dirs {
    blobs: PathBuf,
    tmp: PathBuf,
    cache_mounts: PathBuf,
}

/// The build engine of one worker.
pub struct Engine {
    store: BlobStore,
    snapshots: Arc<Snapshotter>,
    runc: Arc<Runc>,
    registry: RegistryClient,
    dirs: Dirs,
    /// Recent resolutions of base images; one at a time per image and platform, so that the
    /// stages of a build that share a base resolve it once.
    pulled: Mutex<HashMap<(String, Platform), PullSlot>>,
    cache_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    run_counter: std::sync::atomic::AtomicU64,
    /// Content hashes of build-context files, by file metadata.
    hashes: Arc<HashCache>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn io(context: impl std::fmt::Display, e: std::io::Error) -> BuildError {
    BuildError::Other(format!("{context}: {e}"))
}

impl Engine {
    /// Opens the engine's state under `state_dir` with `store` as the blob store; snapshots use
    /// overlayfs where it works, else copies.
    pub fn open(state_dir: &Path, store: BlobStore) -> Result<Self, BuildError> {
        Self::open_with(state_dir, store, None)
    }

    /// The same, with the snapshot kind forced (`None` detects it).
    pub fn open_with(
        state_dir: &Path,
        store: BlobStore,
        snapshots: Option<SnapshotKind>,
    ) -> Result<Self, BuildError> {
        let dirs = Dirs {
            blobs: state_dir.join("blobs"),
            tmp: state_dir.join("tmp"),
            cache_mounts: state_dir.join("cache-mounts"),
        };
        for d in [&dirs.blobs, &dirs.tmp, &dirs.cache_mounts] {
            std::fs::create_dir_all(d).map_err(|e| io(d.display(), e))?;
        }
        let snapshots = Snapshotter::open(&state_dir.join("snapshots"), snapshots)
            .map_err(|e| BuildError::Other(format!("snapshots: {e}")))?;
        let runc = Runc::new(None, &state_dir.join("runc"))
            .map_err(|e| BuildError::Other(format!("runc: {e}")))?;
        let registry = RegistryClient::new()
            .map_err(|e| BuildError::Other(format!("registry client: {e}")))?;
        Ok(Engine {
            store,
            snapshots: Arc::new(snapshots),
            runc: Arc::new(runc),
            registry,
            dirs,
            pulled: Mutex::new(HashMap::new()),
            cache_locks: Mutex::new(HashMap::new()),
            run_counter: std::sync::atomic::AtomicU64::new(0),
            hashes: Arc::new(HashCache::load(&state_dir.join("file-hashes"))),
        })
    }

    /// The blob store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// A unique name for temporary files and containers.
    fn unique(&self, what: &str) -> String {
        let n = self
            .run_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("strata-{what}-{}-{n}", std::process::id())
    }

    /// Builds one stage.
    pub async fn run_stage(
        &self,
        job: &StageJob,
        progress: &Progress,
    ) -> Result<StageOutput, BuildError> {
        let df = Dockerfile::parse(&job.dockerfile)?;
        let res = resolve(&df, &job.options, &job.build_platform, &job.target_platform)?;
        let rs = res.stages.get(job.stage).ok_or_else(|| {
            BuildError::Other(format!("no stage {} in the Dockerfile", job.stage))
        })?;
        let def = &df.parsed.stages[job.stage];
        let platform = rs.platform.clone();
        let label = if job.show_platform {
            format!("{platform} {}", rs.display_name())
        } else {
            rs.display_name()
        };
        let mut ctx = StageCtx {
            engine: self,
            job,
            res: &res,
            progress,
            label,
            platform: platform.clone(),
            n: 0,
            m: rs.steps,
        };

        // The base.
        let (mut config, mut layers, mut key, mut scope) = match &rs.base {
            Source::Image(image) => {
                ctx.n += 1;
                let started = Instant::now();
                ctx.started(format!("FROM {image}"));
                let pulled = self.pull(image, &platform).await.map_err(|e| {
                    let msg = e.to_string();
                    ctx.failed(&msg);
                    BuildError::at(def.range, msg)
                })?;
                if pulled.downloaded {
                    ctx.done(started);
                } else {
                    ctx.progress.send(Event::Cached {
                        job: job.id,
                        n: ctx.n,
                    });
                }
                let env = EnvList::from_strings(&pulled.config.config.env);
                let scope = Scope::new(&res, &job.options, df.ast.escape, &env);
                let key = image_key(&pulled.manifest_digest, &platform);
                let mut config = pulled.config.clone();
                config.created = None;
                (config, pulled.layers.clone(), key, scope)
            }
            Source::Scratch => {
                let config = ImageConfig::empty(&platform);
                let env = EnvList::from_strings(&config.config.env);
                (
                    config,
                    Vec::new(),
                    scratch_key(&platform),
                    Scope::new(&res, &job.options, df.ast.escape, &env),
                )
            }
            Source::Stage(i) => {
                let parent = job.inputs.get(i).ok_or_else(|| {
                    BuildError::at(
                        def.range,
                        format!("the output of stage {i} was not provided"),
                    )
                })?;
                let image_env = EnvList::from_strings(&parent.config.config.env);
                let mut env = EnvList::default();
                for (k, v) in &parent.env {
                    env.set(k, v);
                }
                let scope = Scope::inherit(
                    &res,
                    &job.options,
                    df.ast.escape,
                    &image_env,
                    env,
                    parent.declared.clone(),
                );
                (
                    parent.config.clone(),
                    parent.layers.clone(),
                    parent.key.clone(),
                    scope,
                )
            }
        };
        // Make sure PATH is always set, as BuildKit does.
        if !config.config.env.iter().any(|e| e.starts_with("PATH=")) {
            config.config.env.push(format!("PATH={DEFAULT_PATH}"));
            scope.env.set("PATH", DEFAULT_PATH);
        }
        // The base's ONBUILD triggers run first; the new image does not keep them.
        let triggers = parse_triggers(&std::mem::take(&mut config.config.on_build), def)?;
        ctx.m += triggers
            .iter()
            .filter(|t| {
                matches!(
                    t.command,
                    Command::Run(_) | Command::Copy(_) | Command::Add(_) | Command::Workdir(_)
                )
            })
            .count();

        let mut flags = StageFlags::default();
        for ins in triggers.iter().chain(def.commands.iter()) {
            let cmd = scope.apply(ins).map_err(|m| BuildError::at(ins.range, m))?;
            if metadata::apply_metadata(&mut config, &mut flags, &cmd, &scope.declared)
                .map_err(|m| BuildError::at(ins.range, m))?
            {
                continue;
            }
            ctx.n += 1;
            let mut state = FsState {
                config: &mut config,
                layers: &mut layers,
                key: &mut key,
                scope: &scope,
            };
            match &cmd {
                Command::Run(run) => ctx.run_step(ins, run, &mut state).await?,
                Command::Copy(c) => {
                    let spec = CopySpec {
                        sources: c.paths.sources.clone(),
                        inline: inline_files(&c.paths),
                        dest: c.paths.dest.clone(),
                        workdir: workdir_of(state.config),
                        chown: None,
                        keep_owners: false,
                        chmod: c.chmod.clone(),
                        exclude: c.exclude.clone(),
                        parents: c.parents,
                        is_add: false,
                        checksum: None,
                    };
                    let from = c.from.as_deref().map(|f| copy_source(&res, job.stage, f));
                    let history = copy_history(
                        "COPY",
                        &c.paths,
                        c.parents,
                        c.chown.as_deref(),
                        c.chmod.as_deref(),
                    );
                    ctx.copy_step(ins, spec, c.chown.as_deref(), from, history, &mut state)
                        .await?;
                }
                Command::Add(a) => {
                    let spec = CopySpec {
                        sources: a.paths.sources.clone(),
                        inline: inline_files(&a.paths),
                        dest: a.paths.dest.clone(),
                        workdir: workdir_of(state.config),
                        chown: None,
                        keep_owners: false,
                        chmod: a.chmod.clone(),
                        exclude: a.exclude.clone(),
                        parents: false,
                        is_add: true,
                        checksum: a.checksum.clone(),
                    };
                    let history = copy_history(
                        "ADD",
                        &a.paths,
                        false,
                        a.chown.as_deref(),
                        a.chmod.as_deref(),
                    );
                    ctx.copy_step(ins, spec, a.chown.as_deref(), None, history, &mut state)
                        .await?;
                }
                Command::Workdir(p) => ctx.workdir_step(ins, p, &mut state).await?,
                _ => {}
            }
        }
        Ok(StageOutput {
            config,
            layers,
            key,
            env: scope.env.pairs().to_vec(),
            declared: scope.declared.clone(),
        })
    }

    /// Resolves a base image for a platform and makes sure its config and layers are in the
    /// store (layers the store already has by digest are not downloaded again).
    async fn pull(&self, image: &ImageRef, platform: &Platform) -> Result<Pulled, BuildError> {
        let memo_key = (image.to_string(), platform.clone());
        let slot = self
            .pulled
            .lock()
            .await
            .entry(memo_key)
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some((at, p)) = slot.as_ref()
            && at.elapsed() < PULL_MEMO_TTL
        {
            return Ok(Pulled {
                downloaded: false,
                ..p.clone()
            });
        }
        let resolved = self
            .registry
            .resolve(image, platform)
            .await
            .map_err(|e| BuildError::Other(format!("pulling {image} for {platform}: {e}")))?;
        let config: ImageConfig = serde_json::from_slice(&resolved.config_bytes)
            .map_err(|e| BuildError::Other(format!("image {image}: invalid config: {e}")))?;
        if config.rootfs.diff_ids.len() != resolved.layers.len() {
            return Err(BuildError::Other(format!(
                "image {image}: the config lists {} layers but the manifest {}",
                config.rootfs.diff_ids.len(),
                resolved.layers.len()
            )));
        }
        let mut layers = Vec::new();
        let mut downloaded = false;
        for (desc, diff_id) in resolved.layers.iter().zip(&config.rootfs.diff_ids) {
            if let Some(meta) = self.store.by_digest(&desc.digest).await? {
                layers.push(meta);
                continue;
            }
            downloaded = true;
            let tmp = self.dirs.tmp.join(self.unique("pull"));
            self.registry
                .fetch_blob(image, &desc.digest, &tmp)
                .await
                .map_err(|e| {
                    BuildError::Other(format!("pulling {image} layer {}: {e}", desc.digest))
                })?;
            let b3 = hash_file(&tmp).await?;
            let meta = BlobMeta {
                version: RECORD_VERSION,
                blake3: b3.clone(),
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
                size: desc.size,
                diff_id: Some(diff_id.clone()),
            };
            self.store.put_file(&tmp, &meta).await?;
            let local = self.dirs.blobs.join(&b3);
            tokio::fs::rename(&tmp, &local)
                .await
                .map_err(|e| io(local.display(), e))?;
            layers.push(meta);
        }
        let pulled = Pulled {
            manifest_digest: resolved.manifest_digest.clone(),
            config,
            layers,
            downloaded,
        };
        *slot = Some((Instant::now(), pulled.clone()));
        Ok(pulled)
    }

    /// A local file with the blob's bytes (fetched from the store once).
    async fn local_blob(&self, meta: &BlobMeta) -> Result<PathBuf, BuildError> {
        let path = self.dirs.blobs.join(&meta.blake3);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        self.store.get_to_file(&meta.blake3, &path).await?;
        Ok(path)
    }

    /// A writable root filesystem with these layers. Layers already unpacked are used as they
    /// are; the others are fetched from the store and unpacked first.
    async fn prepare(&self, layers: &[BlobMeta]) -> Result<ActiveSnapshot, BuildError> {
        let mut diff_ids = Vec::with_capacity(layers.len());
        let mut missing = Vec::new();
        for meta in layers {
            let diff_id = meta.diff_id.clone().ok_or_else(|| {
                BuildError::Other(format!("layer {} has no diff-id in the store", meta.digest))
            })?;
            if !self.snapshots.has_layer(&diff_id) {
                let blob = self.local_blob(meta).await?;
                missing.push((blob, diff_id.clone(), meta.digest.clone()));
            }
            diff_ids.push(diff_id);
        }
        let snapshots = self.snapshots.clone();
        tokio::task::spawn_blocking(move || {
            for (blob, diff_id, digest) in &missing {
                snapshots
                    .ensure_layer(blob, diff_id)
                    .map_err(|e| BuildError::Other(format!("unpacking layer {digest}: {e}")))?;
            }
            snapshots
                .prepare(&diff_ids)
                .map_err(|e| BuildError::Other(format!("preparing a snapshot: {e}")))
        })
        .await
        .map_err(|e| BuildError::Other(format!("preparing a snapshot: {e}")))?
    }

    /// Stores a new layer and returns its metadata.
    async fn store_layer(&self, blob: LayerBlob) -> Result<BlobMeta, BuildError> {
        let meta = BlobMeta {
            version: RECORD_VERSION,
            blake3: blob.blake3.clone(),
            digest: blob.digest.clone(),
            media_type: blob.media_type.clone(),
            size: blob.size,
            diff_id: Some(blob.diff_id.clone()),
        };
        self.store.put_file(&blob.path, &meta).await?;
        let local = self.dirs.blobs.join(&meta.blake3);
        if tokio::fs::rename(&blob.path, &local).await.is_err() {
            let _ = tokio::fs::remove_file(&blob.path).await;
        }
        Ok(meta)
    }

    /// The lock serialising users of a `sharing=locked` cache mount.
    async fn cache_lock(&self, id: &str) -> Arc<Mutex<()>> {
        self.cache_locks
            .lock()
            .await
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone()
    }
}

/// Blake3 of a file, hex.
async fn hash_file(path: &Path) -> Result<String, BuildError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p)?;
        let mut h = blake3::Hasher::new();
        std::io::copy(&mut f, &mut h)?;
        Ok::<_, std::io::Error>(h.finalize().to_hex().to_string())
    })
    .await
    .map_err(|e| BuildError::Other(format!("hashing {}: {e}", path.display())))?
    .map_err(|e| io(path.display(), e))
}

/// The base image's ONBUILD triggers as instructions located at the stage's FROM line.
fn parse_triggers(triggers: &[String], stage: &Stage) -> Result<Vec<Instruction>, BuildError> {
    let mut out = Vec::new();
    for t in triggers {
        let ast = parser::parse(t).map_err(|e| {
            BuildError::at(stage.range, format!("ONBUILD trigger {t:?}: {}", e.message))
        })?;
        let [node] = ast.children.as_slice() else {
            return Err(BuildError::at(
                stage.range,
                format!("ONBUILD trigger {t:?} should be a single expression"),
            ));
        };
        let command = parse_command(node)
            .map_err(|m| BuildError::at(stage.range, format!("ONBUILD trigger {t:?}: {m}")))?;
        out.push(Instruction {
            command,
            keyword: node.keyword.clone(),
            original: t.clone(),
            range: stage.range,
        });
    }
    Ok(out)
}

fn inline_files(paths: &SourcesAndDest) -> Vec<(String, Vec<u8>)> {
    paths
        .contents
        .iter()
        .map(|c| (c.path.clone(), c.data.clone().into_bytes()))
        .collect()
}

fn workdir_of(config: &ImageConfig) -> String {
    if config.config.working_dir.is_empty() {
        "/".into()
    } else {
        config.config.working_dir.clone()
    }
}

/// `COPY --chown=.. src.. dest # buildkit`.
fn copy_history(
    verb: &str,
    paths: &SourcesAndDest,
    parents: bool,
    chown: Option<&str>,
    chmod: Option<&str>,
) -> String {
    let mut s = verb.to_string();
    if parents {
        s.push_str(" --parents");
    }
    if let Some(c) = chown {
        s.push_str(&format!(" --chown={c}"));
    }
    if let Some(c) = chmod {
        s.push_str(&format!(" --chmod={c}"));
    }
    for src in &paths.sources {
        s.push(' ');
        s.push_str(src);
    }
    for c in &paths.contents {
        s.push_str(&format!(" <<{}", c.path));
    }
    s.push(' ');
    s.push_str(&paths.dest);
    s.push_str(" # buildkit");
    s
}

/// Where a `COPY --from` value points for stage `current`.
fn copy_source(res: &Resolution, current: usize, from: &str) -> Source {
    res.stages[current]
        .uses
        .iter()
        .find(|d| match (&d.source, from.parse::<usize>()) {
            (Source::Stage(i), Ok(n)) => *i == n,
            (Source::Stage(i), Err(_)) => {
                res.stages[*i].name.as_deref() == Some(from.to_lowercase().as_str())
            }
            (Source::Image(r), _) => ImageRef::parse(from).is_ok_and(|f| &f == r),
            (Source::Scratch, _) => from == "scratch",
        })
        .map_or(Source::Scratch, |d| d.source.clone())
}

/// Where a bind, cache or tmpfs mount goes, as BuildKit places it: an empty or relative target
/// is joined to the working directory; a target that ends up as `/` is refused.
fn mount_target(target: Option<&str>, workdir: &str) -> Result<String, String> {
    let joined = join_workdir(workdir, target.unwrap_or(""));
    if joined == "/" {
        return Err(format!(
            "invalid mount target {:?}: a mount cannot replace the root filesystem",
            target.unwrap_or("")
        ));
    }
    Ok(joined)
}

/// The normalised working directory after `WORKDIR path`.
fn join_workdir(current: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", if current.is_empty() { "/" } else { current })
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The filesystem-side state a step updates.
struct FsState<'a> {
    config: &'a mut ImageConfig,
    layers: &'a mut Vec<BlobMeta>,
    key: &'a mut String,
    scope: &'a Scope,
}

/// One stage job in progress.
struct StageCtx<'a> {
    engine: &'a Engine,
    job: &'a StageJob,
    res: &'a Resolution,
    progress: &'a Progress,
    label: String,
    platform: Platform,
    n: usize,
    m: usize,
}

/// Mounts prepared for a RUN, and what must live as long as the container.
#[derive(Default)]
struct RunMounts {
    mounts: Vec<executor::Mount>,
    env: Vec<String>,
    keep: Vec<ActiveSnapshot>,
    temp_files: Vec<PathBuf>,
    locks: Vec<tokio::sync::OwnedMutexGuard<()>>,
    key_parts: Vec<String>,
}

impl Drop for RunMounts {
    fn drop(&mut self) {
        for f in &self.temp_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl StageCtx<'_> {
    fn started(&self, text: String) {
        self.progress.send(Event::Started {
            job: self.job.id,
            label: self.label.clone(),
            n: self.n,
            m: self.m,
            text,
        });
    }

    fn done(&self, started: Instant) {
        self.progress.send(Event::Done {
            job: self.job.id,
            n: self.n,
            elapsed: started.elapsed(),
        });
    }

    fn failed(&self, message: &str) {
        self.progress.send(Event::Failed {
            job: self.job.id,
            n: self.n,
            message: message.to_string(),
        });
    }

    /// Looks a key up in the cache; `Some` when the step is served from it.
    async fn cached(&self, key: &str) -> Result<Option<CacheEntry>, BuildError> {
        if self.job.no_cache {
            return Ok(None);
        }
        Ok(self.engine.store.cache_get(key).await?)
    }

    fn apply_cached(
        &self,
        entry: CacheEntry,
        state: &mut FsState<'_>,
        key: String,
        history: String,
    ) {
        let has_layer = entry.layer.is_some();
        if let Some(layer) = entry.layer {
            state.layers.push(layer);
        }
        *state.key = key;
        metadata::record_step(state.config, history, has_layer);
        self.progress.send(Event::Cached {
            job: self.job.id,
            n: self.n,
        });
    }

    /// Diffs a snapshot, stores the layer and the cache entry, and records the step.
    async fn commit(
        &self,
        snap: ActiveSnapshot,
        state: &mut FsState<'_>,
        key: String,
        history: String,
    ) -> Result<(), BuildError> {
        let out_dir = self.engine.dirs.tmp.clone();
        let compression = self.job.compression;
        let diffing = Instant::now();
        let blob = tokio::task::spawn_blocking(move || {
            let blob = snap.diff(&out_dir, compression)?;
            tracing::debug!(elapsed = ?diffing.elapsed(), "changes written as a layer");
            // The changes stay unpacked as the new layer: the next step mounts them as they are.
            if let Some(b) = &blob
                && let Err(e) = snap.into_layer(&b.diff_id)
            {
                tracing::warn!(error = %e, "keeping the step's changes unpacked failed; the layer will be unpacked from its blob");
            }
            Ok::<_, crate::snapshot::SnapshotError>(blob)
        })
        .await
        .map_err(|e| BuildError::Other(format!("diffing: {e}")))?;
        let blob = blob.map_err(|e| {
            BuildError::Other(format!("turning the step's changes into a layer: {e}"))
        })?;
        let storing = Instant::now();
        let layer = match blob {
            Some(b) => Some(self.engine.store_layer(b).await?),
            None => None,
        };
        tracing::debug!(elapsed = ?storing.elapsed(), "layer stored");
        self.engine
            .store
            .cache_put(
                &key,
                &CacheEntry {
                    version: RECORD_VERSION,
                    layer: layer.clone(),
                },
            )
            .await?;
        let has_layer = layer.is_some();
        if let Some(l) = layer {
            state.layers.push(l);
        }
        *state.key = key;
        metadata::record_step(state.config, history, has_layer);
        Ok(())
    }

    async fn run_step(
        &self,
        ins: &Instruction,
        run: &Run,
        state: &mut FsState<'_>,
    ) -> Result<(), BuildError> {
        let text = format!("RUN {}", display_run(&run.command));
        self.started(text.clone());
        let started = Instant::now();
        let fail = |m: String| {
            self.failed(&m);
            BuildError::at(ins.range, m)
        };
        let network = match run.network {
            Network::Host if !self.job.allow_host_network => {
                return Err(fail(
                    "RUN --network=host needs the build to allow it: pass --allow network.host"
                        .into(),
                ));
            }
            Network::Host => NetworkMode::Host,
            Network::Default | Network::None => NetworkMode::None,
        };
        if run.insecure {
            return Err(fail(
                "RUN --security=insecure is not supported by this builder".into(),
            ));
        }
        let (args, script) = run_args(state.config, run).map_err(&fail)?;
        let env = state.scope.env.to_strings();
        let workdir = workdir_of(state.config);
        let user = state.config.config.user.clone();
        let history = metadata::run_history(&args, &state.scope.declared, &|k| {
            state
                .scope
                .env
                .pairs()
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        });

        let mut mounts = self.prepare_mounts(ins, run, &workdir).await?;
        if let Some((path, data)) = &script {
            let file = self.engine.dirs.tmp.join(self.engine.unique("script"));
            std::fs::write(&file, data).map_err(|e| io(file.display(), e))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| io(file.display(), e))?;
            mounts.mounts.push(executor::Mount {
                destination: path.clone(),
                source: MountSource::Bind {
                    source: file.clone(),
                    readonly: true,
                },
            });
            mounts.temp_files.push(file);
            mounts.key_parts.push(format!(
                "script:{path}:{}",
                blake3::hash(data.as_bytes()).to_hex()
            ));
        }
        // `BUILDKIT_SANDBOX_HOSTNAME` names the step's host, as in BuildKit.
        let hostname = self
            .job
            .options
            .build_args
            .get("BUILDKIT_SANDBOX_HOSTNAME")
            .filter(|h| !h.is_empty())
            .cloned();
        if let Some(h) = &hostname
            && !valid_hostname(h)
        {
            return Err(fail(format!(
                "BUILDKIT_SANDBOX_HOSTNAME={h:?} is not a valid host name"
            )));
        }
        let mut kb = KeyBuilder::new("run", state.key, &self.platform);
        kb.list("args", &args)
            .list("env", &env)
            .field("user", &user)
            .field("cwd", &workdir)
            .field("network", &format!("{network:?}"))
            .list("mounts", &mounts.key_parts);
        if let Some(h) = &hostname {
            kb.field("hostname", h);
        }
        let key = kb.finish();
        if let Some(entry) = self.cached(&key).await? {
            self.apply_cached(entry, state, key, history);
            return Ok(());
        }

        let preparing = Instant::now();
        let snap = self
            .engine
            .prepare(state.layers)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tracing::debug!(elapsed = ?preparing.elapsed(), layers = state.layers.len(), "snapshot prepared");
        let mut process_env = env;
        process_env.append(&mut mounts.env);
        // Proxy settings given as build arguments reach every RUN without being declared, and
        // stay out of the cache key, the config and the history (BuildKit's `WithProxy`).
        for name in PROXY_ARGS {
            if let Some(value) = self.job.options.build_args.get(name)
                && !process_env
                    .iter()
                    .any(|e| e.split_once('=').is_some_and(|(k, _)| k == name))
            {
                process_env.push(format!("{name}={value}"));
            }
        }
        let req = RunRequest {
            rootfs: snap.rootfs().to_path_buf(),
            process: ProcessSpec {
                args: args.clone(),
                env: process_env,
                cwd: workdir,
                user,
                hostname: hostname.unwrap_or_else(|| "buildkitsandbox".into()),
            },
            mounts: std::mem::take(&mut mounts.mounts),
            network,
            id: self.engine.unique("run"),
        };
        let runc = self.engine.runc.clone();
        let progress = self.progress.clone();
        let (job, n) = (self.job.id, self.n);
        // A cancelled job drops this future: the guard then stops the container.
        let stop = executor::StopOnDrop::new(runc.clone(), &req.id);
        let gate = stop.gate();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut tail = OutputTail::default();
            if gate.cancelled() {
                gate.done();
                return (Ok(CANCELLED_EXIT), tail);
            }
            let running = Instant::now();
            let r = runc.run(&req, &mut |bytes: &[u8]| {
                tail.push(bytes);
                progress.send(Event::Output {
                    job,
                    n,
                    data: String::from_utf8_lossy(bytes).into_owned(),
                });
            });
            gate.done();
            tracing::debug!(elapsed = ?running.elapsed(), "container ran");
            (r, tail)
        })
        .await
        .map_err(|e| fail(format!("running the container: {e}")))?;
        stop.disarm();
        drop(mounts);
        let (result, tail) = outcome;
        let code = result.map_err(|e| fail(format!("{text}: {e}")))?;
        if code != 0 {
            let mut msg = format!("{text}: exit code {code}");
            let last = tail.last_lines(10);
            if !last.is_empty() {
                msg.push_str("\n--- last lines of output ---\n");
                msg.push_str(&last);
            }
            return Err(fail(msg));
        }
        self.commit(snap, state, key, history)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.done(started);
        Ok(())
    }

    /// Sets up RUN's `--mount`s; returns them with the parts of the cache key they contribute.
    async fn prepare_mounts(
        &self,
        ins: &Instruction,
        run: &Run,
        workdir: &str,
    ) -> Result<RunMounts, BuildError> {
        let mut out = RunMounts::default();
        for m in &run.mounts {
            let target = if matches!(m.kind, MountType::Secret | MountType::Ssh) {
                m.target.clone().unwrap_or_default()
            } else {
                mount_target(m.target.as_deref(), workdir)
                    .map_err(|e| BuildError::at(ins.range, e))?
            };
            match m.kind {
                MountType::Cache => {
                    let id = m
                        .id
                        .clone()
                        .unwrap_or_else(|| crate::copy::clean(m.target.as_deref().unwrap_or("")));
                    let dir = self
                        .engine
                        .dirs
                        .cache_mounts
                        .join(blake3::hash(id.as_bytes()).to_hex().as_str());
                    if !dir.exists() {
                        std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
                        use std::os::unix::fs::PermissionsExt;
                        let mode = m.mode.unwrap_or(0o755);
                        let _ =
                            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode));
                        let _ = std::os::unix::fs::chown(&dir, m.uid, m.gid);
                    }
                    match m.sharing {
                        strata_shared::dockerfile::instructions::Sharing::Shared => {}
                        _ => {
                            let lock = self.engine.cache_lock(&id).await;
                            out.locks.push(lock.lock_owned().await);
                        }
                    }
                    out.mounts.push(executor::Mount {
                        destination: target.clone(),
                        source: MountSource::Bind {
                            source: dir,
                            readonly: m.readonly,
                        },
                    });
                    out.key_parts
                        .push(format!("cache:{target}:{id}:{}", m.readonly));
                }
                MountType::Tmpfs => {
                    out.mounts.push(executor::Mount {
                        destination: target.clone(),
                        source: MountSource::Tmpfs { size: m.size },
                    });
                    out.key_parts.push(format!("tmpfs:{target}"));
                }
                MountType::Secret => {
                    let id =
                        m.id.clone()
                            .or_else(|| {
                                m.target
                                    .as_deref()
                                    .and_then(|t| t.rsplit('/').next())
                                    .map(str::to_string)
                            })
                            .unwrap_or_default();
                    let Some(src) = self.job.secrets.get(&id) else {
                        if m.required {
                            return Err(BuildError::at(
                                ins.range,
                                format!(
                                    "secret {id:?} is required but was not given (--secret id={id},src=FILE)"
                                ),
                            ));
                        }
                        continue;
                    };
                    let data = std::fs::read(src)
                        .map_err(|e| io(format!("secret {id:?} from {}", src), e))?;
                    if let Some(var) = &m.env {
                        out.env
                            .push(format!("{var}={}", String::from_utf8_lossy(&data)));
                        out.key_parts.push(format!("secret-env:{id}:{var}"));
                    }
                    if m.target.is_some() || m.env.is_none() {
                        let file = self.engine.dirs.tmp.join(self.engine.unique("secret"));
                        std::fs::write(&file, &data).map_err(|e| io(file.display(), e))?;
                        use std::os::unix::fs::PermissionsExt;
                        let _ = std::fs::set_permissions(
                            &file,
                            std::fs::Permissions::from_mode(m.mode.unwrap_or(0o400)),
                        );
                        let _ = std::os::unix::fs::chown(&file, m.uid, m.gid);
                        let dest = m
                            .target
                            .clone()
                            .unwrap_or_else(|| format!("/run/secrets/{id}"));
                        out.mounts.push(executor::Mount {
                            destination: dest.clone(),
                            source: MountSource::Bind {
                                source: file.clone(),
                                readonly: true,
                            },
                        });
                        out.temp_files.push(file);
                        out.key_parts.push(format!("secret:{id}:{dest}"));
                    }
                }
                MountType::Ssh => {
                    if m.required {
                        return Err(BuildError::at(
                            ins.range,
                            "RUN --mount=type=ssh: SSH agent forwarding is not supported by this builder",
                        ));
                    }
                }
                MountType::Bind => {
                    let source = m.source.clone().unwrap_or_else(|| "/".into());
                    let (root, key_part) = match &m.from {
                        None => {
                            let ignore = read_dockerignore(self.job)?;
                            let spec = CopySpec {
                                sources: vec![source.clone()],
                                dest: "/".into(),
                                workdir: "/".into(),
                                ..Default::default()
                            };
                            let ctx = self.job.context_dir()?;
                            let digest = tokio::task::spawn_blocking(move || {
                                source_digest(&ctx, &spec, ignore.as_ref())
                            })
                            .await
                            .map_err(|e| BuildError::Other(e.to_string()))?
                            .map_err(|e| {
                                BuildError::at(
                                    ins.range,
                                    format!("RUN --mount source {source}: {e}"),
                                )
                            })?;
                            (
                                self.job.context_dir()?,
                                format!("context:{}", digest.to_hex()),
                            )
                        }
                        Some(from) => {
                            let src = copy_source(self.res, self.job.stage, from);
                            let (layers, key) = self.source_layers(ins, &src).await?;
                            let snap = self.engine.prepare(&layers).await?;
                            let root = snap.rootfs().to_path_buf();
                            out.keep.push(snap);
                            (root, format!("stage:{key}"))
                        }
                    };
                    let rel = source.trim_start_matches('/');
                    let path = crate::rootfs::resolve_in_root(&root, rel).map_err(|e| {
                        BuildError::at(ins.range, format!("RUN --mount source {source}: {e}"))
                    })?;
                    out.mounts.push(executor::Mount {
                        destination: target.clone(),
                        source: MountSource::Bind {
                            source: path,
                            readonly: m.readonly || m.from.is_none(),
                        },
                    });
                    out.key_parts
                        .push(format!("bind:{target}:{source}:{key_part}:{}", m.readonly));
                }
            }
        }
        Ok(out)
    }

    /// Layers and key of a stage, image or scratch used as a source.
    async fn source_layers(
        &self,
        ins: &Instruction,
        src: &Source,
    ) -> Result<(Vec<BlobMeta>, String), BuildError> {
        match src {
            Source::Stage(i) => {
                let out = self.job.inputs.get(i).ok_or_else(|| {
                    BuildError::at(
                        ins.range,
                        format!("the output of stage {i} was not provided"),
                    )
                })?;
                Ok((out.layers.clone(), out.key.clone()))
            }
            Source::Image(r) => {
                let pulled = self
                    .engine
                    .pull(r, &self.platform)
                    .await
                    .map_err(|e| BuildError::at(ins.range, e.to_string()))?;
                Ok((
                    pulled.layers,
                    image_key(&pulled.manifest_digest, &self.platform),
                ))
            }
            Source::Scratch => Ok((Vec::new(), scratch_key(&self.platform))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_step(
        &self,
        ins: &Instruction,
        mut spec: CopySpec,
        chown: Option<&str>,
        from: Option<Source>,
        history: String,
        state: &mut FsState<'_>,
    ) -> Result<(), BuildError> {
        let verb = if spec.is_add { "ADD" } else { "COPY" };
        // From a stage or an image, files keep their owners unless --chown says otherwise.
        spec.keep_owners = from.is_some();
        let text = ins.original.trim().to_string();
        self.started(text.clone());
        let started = Instant::now();
        let fail = |m: String| {
            self.failed(&m);
            BuildError::at(ins.range, m)
        };
        // Where the files come from: the context (and, for a mixed ADD, a download directory),
        // or a stage or image, mounted only when its content must be read.
        let mut _download_dir = None;
        let mut parts: Vec<CopyPart> = Vec::new();
        let mut source: Option<(Vec<BlobMeta>, ActiveSnapshot)> = None;
        let mut source_layers = Vec::new();
        let source_key = match &from {
            None => {
                let ignore = read_dockerignore(self.job)?;
                if spec.is_add && spec.has_urls() {
                    let dir = self.engine.dirs.tmp.join(self.engine.unique("add"));
                    std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
                    _download_dir = Some(TempDir(dir.clone()));
                    let fetched = fetch_urls(&spec, &dir)
                        .await
                        .map_err(|e| fail(format!("{verb}: {e}")))?;
                    let local = spec.without_urls();
                    if !local.sources.is_empty() || !local.inline.is_empty() {
                        parts.push(CopyPart {
                            root: self.job.context_dir()?,
                            spec: local,
                            ignore,
                            context: true,
                        });
                    }
                    parts.push(CopyPart {
                        root: dir,
                        spec: CopySpec {
                            inline: Vec::new(),
                            ..fetched
                        },
                        ignore: None,
                        context: false,
                    });
                    "context+download".to_string()
                } else {
                    parts.push(CopyPart {
                        root: self.job.context_dir()?,
                        spec: spec.clone(),
                        ignore,
                        context: true,
                    });
                    "context".to_string()
                }
            }
            Some(src) => {
                let (layers, key) = self.source_layers(ins, src).await?;
                source_layers = layers;
                key
            }
        };

        // --chown names resolve against the destination's /etc/passwd and /etc/group, which
        // the destination's cache key determines.
        let mut dest: Option<ActiveSnapshot> = None;
        if let Some(c) = chown {
            let memo = KeyBuilder::new("chown", state.key, &self.platform)
                .field("user", c)
                .finish();
            let owner = match self
                .engine
                .store
                .memo_get(&memo)
                .await?
                .and_then(|v| parse_owner(&v))
            {
                Some(o) => o,
                None => {
                    let snap = self
                        .engine
                        .prepare(state.layers)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    let (uid, gid, _) = executor::resolve_user(snap.rootfs(), c)
                        .map_err(|e| fail(format!("{verb} --chown={c}: {e}")))?;
                    dest = Some(snap);
                    self.engine
                        .store
                        .memo_put(&memo, &format!("{uid}:{gid}"))
                        .await?;
                    Owner { uid, gid }
                }
            };
            spec.chown = Some(owner);
            for part in &mut parts {
                part.spec.chown = spec.chown;
            }
        }

        let hashing = Instant::now();
        let digest = if from.is_some() {
            // A stage's files are fixed by its cache key: their digest is computed once.
            let memo = KeyBuilder::new("copy-source", &source_key, &self.platform)
                .field("spec", &format!("{spec:?}"))
                .finish();
            match self.engine.store.memo_get(&memo).await? {
                Some(hex) => hex,
                None => {
                    let snap = self
                        .engine
                        .prepare(&source_layers)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                    let (root, part_spec) = (snap.rootfs().to_path_buf(), spec.clone());
                    let digest =
                        tokio::task::spawn_blocking(move || source_digest(&root, &part_spec, None))
                            .await
                            .map_err(|e| fail(e.to_string()))?
                            .map_err(|e| fail(format!("{verb}: {e}")))?;
                    source = Some((source_layers.clone(), snap));
                    let hex = digest.to_hex().to_string();
                    self.engine.store.memo_put(&memo, &hex).await?;
                    hex
                }
            }
        } else {
            let mut content = blake3::Hasher::new();
            for part in &parts {
                let part = part.clone();
                let hashes = self.engine.hashes.clone();
                let digest = tokio::task::spawn_blocking(move || {
                    let cache = part.context.then_some(&*hashes);
                    source_digest_cached(&part.root, &part.spec, part.ignore.as_ref(), cache)
                })
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(format!("{verb}: {e}")))?;
                content.update(digest.as_bytes());
            }
            let hashes = self.engine.hashes.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || hashes.save())
                .await
                .unwrap_or(Ok(()))
            {
                tracing::warn!(error = %e, "saving the file hash cache failed");
            }
            content.finalize().to_hex().to_string()
        };
        tracing::debug!(elapsed = ?hashing.elapsed(), "{verb}: sources hashed");
        let mut kb = KeyBuilder::new(
            if spec.is_add { "add" } else { "copy" },
            state.key,
            &self.platform,
        );
        kb.field("source", &source_key)
            .field("content", &digest)
            .field("dest", &spec.dest)
            .field("workdir", &spec.workdir)
            .field("chown", &format!("{:?}", spec.chown))
            .field("chmod", spec.chmod.as_deref().unwrap_or(""))
            .list("exclude", &spec.exclude)
            .field("parents", &spec.parents.to_string());
        let key = kb.finish();
        if let Some(entry) = self.cached(&key).await? {
            self.apply_cached(entry, state, key, history);
            return Ok(());
        }
        if from.is_some() {
            let snap = match source.take() {
                Some((_, snap)) => snap,
                None => self
                    .engine
                    .prepare(&source_layers)
                    .await
                    .map_err(|e| fail(e.to_string()))?,
            };
            parts.push(CopyPart {
                root: snap.rootfs().to_path_buf(),
                spec: spec.clone(),
                ignore: None,
                context: false,
            });
            source = Some((Vec::new(), snap));
        }
        let snap = match dest.take() {
            Some(snap) => snap,
            None => self
                .engine
                .prepare(state.layers)
                .await
                .map_err(|e| fail(e.to_string()))?,
        };
        let copying = Instant::now();
        let dst_root = snap.rootfs().to_path_buf();
        for part in parts {
            let dst_root = dst_root.clone();
            tokio::task::spawn_blocking(move || {
                copy_into(&part.root, &dst_root, &part.spec, part.ignore.as_ref())
            })
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("{verb}: {e}")))?;
        }
        tracing::debug!(elapsed = ?copying.elapsed(), "{verb}: files copied");
        drop(source);
        self.commit(snap, state, key, history)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.done(started);
        Ok(())
    }

    async fn workdir_step(
        &self,
        ins: &Instruction,
        path: &str,
        state: &mut FsState<'_>,
    ) -> Result<(), BuildError> {
        let wd = join_workdir(&state.config.config.working_dir, path);
        state.config.config.working_dir = wd.clone();
        let history = format!("WORKDIR {wd}");
        self.started(format!("WORKDIR {path}"));
        let started = Instant::now();
        if wd == "/" {
            metadata::record_step(state.config, history, false);
            self.done(started);
            return Ok(());
        }
        let user = state.config.config.user.clone();
        let key = KeyBuilder::new("mkdir", state.key, &self.platform)
            .field("path", &wd)
            .field("user", &user)
            .finish();
        if let Some(entry) = self.cached(&key).await? {
            self.apply_cached(entry, state, key, history);
            return Ok(());
        }
        let fail = |m: String| {
            self.failed(&m);
            BuildError::at(ins.range, m)
        };
        let snap = self
            .engine
            .prepare(state.layers)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let owner = if user.is_empty() {
            None
        } else {
            Some(
                executor::resolve_user(snap.rootfs(), &user)
                    .map_err(|e| fail(format!("WORKDIR: {e}")))?,
            )
        };
        let root = snap.rootfs().to_path_buf();
        crate::rootfs::mkdir_all(&root, &wd, 0o755, owner.map(|(u, g, _)| (u, g)))
            .map_err(|e| fail(format!("WORKDIR {wd}: {e}")))?;
        self.commit(snap, state, key, history)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.done(started);
        Ok(())
    }
}

/// One source root of a COPY or ADD and what to copy from it.
#[derive(Clone)]
struct CopyPart {
    root: PathBuf,
    spec: CopySpec,
    ignore: Option<DockerIgnore>,
    /// The build context (its file hashes are cached by metadata).
    context: bool,
}

/// `uid:gid` as remembered for a `--chown`.
fn parse_owner(v: &str) -> Option<Owner> {
    let (u, g) = v.split_once(':')?;
    Some(Owner {
        uid: u.parse().ok()?,
        gid: g.parse().ok()?,
    })
}

/// Removes a directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The context's `.dockerignore`, if it has one.
/// The ignore rules of a job: the ignore file named after its Dockerfile when the client sent
/// one, else the context's `.dockerignore`.
fn read_dockerignore(job: &StageJob) -> Result<Option<DockerIgnore>, BuildError> {
    if let Some(text) = &job.dockerignore {
        return DockerIgnore::parse(text)
            .map(Some)
            .map_err(|e| BuildError::Other(format!("{}.dockerignore: {e}", job.dockerfile_name)));
    }
    let path = job.context_dir()?.join(".dockerignore");
    match std::fs::read_to_string(&path) {
        Ok(text) => DockerIgnore::parse(&text)
            .map(Some)
            .map_err(|e| BuildError::Other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path.display(), e)),
    }
}

/// The build arguments every RUN gets without declaring them: proxy settings.
const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// An RFC 1123 host name: dot-separated labels of letters, digits and `-`, 1 to 63 bytes each,
/// not starting or ending with `-`, 253 bytes in all at most.
fn valid_hostname(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The text of a RUN for progress lines.
fn display_run(line: &CommandLine) -> String {
    if line.prepend_shell {
        line.args.join(" ")
    } else {
        format!(
            "[{}]",
            line.args
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The process arguments of a RUN, heredocs handled as BuildKit does: a single heredoc that is
/// the whole command runs its body through the shell; several, or one inside a larger command,
/// are handed to the shell with their bodies.
/// Returns the arguments and, for a script with a shebang, the file to mount (path, content).
/// A script file to mount into the container: (path, content).
type Script = (String, String);

fn run_args(config: &ImageConfig, run: &Run) -> Result<(Vec<String>, Option<Script>), String> {
    let mut line = run.command.clone();
    let mut script = None;
    if !run.files.is_empty() {
        if line.args.len() != 1 || !line.prepend_shell {
            return Err(format!(
                "parsing produced an invalid run command: {:?}",
                line.args
            ));
        }
        let first = &run.files[0];
        if parser::parse_heredoc(&line.args[0])
            .ok()
            .flatten()
            .is_some()
        {
            let data = if first.chomp {
                parser::chomp_heredoc(&first.data)
            } else {
                first.data.clone()
            };
            if data.starts_with("#!") {
                // A script with a shebang runs as a file, mounted at /dev/pipes/<name>.
                let path = format!("/dev/pipes/{}", first.name);
                line.args = vec![path.clone()];
                script = Some((path, data));
            } else {
                line.args = vec![data];
            }
        } else {
            let mut full = line.args[0].clone();
            for f in &run.files {
                full.push('\n');
                full.push_str(&f.data);
                full.push_str(&f.name);
            }
            line.args = vec![full];
        }
    }
    Ok((metadata::with_shell(config, &line), script))
}

/// The last lines of a command's output, for error messages.
#[derive(Default)]
struct OutputTail {
    buf: Vec<u8>,
}

impl OutputTail {
    const MAX: usize = 16 * 1024;

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > Self::MAX {
            let cut = self.buf.len() - Self::MAX;
            self.buf.drain(..cut);
        }
    }

    fn last_lines(&self, n: usize) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_targets_join_the_working_directory() {
        assert_eq!(mount_target(Some("/cache/"), "/src").unwrap(), "/cache");
        assert_eq!(mount_target(Some("out"), "/src").unwrap(), "/src/out");
        assert_eq!(mount_target(None, "/usr/src/app").unwrap(), "/usr/src/app");
        assert_eq!(mount_target(Some("../x"), "/a/b").unwrap(), "/a/x");
        assert!(
            mount_target(None, "/")
                .unwrap_err()
                .contains("invalid mount target")
        );
        assert!(mount_target(Some("/.."), "/src").is_err());
    }

    #[test]
    fn workdir_joins_like_buildkit() {
        assert_eq!(join_workdir("", "app"), "/app");
        assert_eq!(join_workdir("/app", "src/../lib"), "/app/lib");
        assert_eq!(join_workdir("/app", "/x/"), "/x");
        assert_eq!(join_workdir("/", ".."), "/");
    }

    #[test]
    fn copy_history_format() {
        let p = SourcesAndDest {
            sources: vec!["a".into(), "b".into()],
            contents: vec![],
            dest: "/dst/".into(),
        };
        assert_eq!(
            copy_history("COPY", &p, false, Some("1:2"), None),
            "COPY --chown=1:2 a b /dst/ # buildkit"
        );
    }

    #[test]
    fn output_tail_keeps_last_lines() {
        let mut t = OutputTail::default();
        for i in 0..100 {
            t.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(t.last_lines(2), "line 98\nline 99");
    }
}
