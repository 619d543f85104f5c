//! `strata build`: on a cluster, or with none configured on the embedded cluster in this
//! process (see [`crate::embedded`]); then the image is exported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use strata_coordinator::export;
use strata_coordinator::placement::{WorkerInfo, place_plan};
use strata_shared::dag;
use strata_shared::dockerfile::Dockerfile;
use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::job::{BuildRequest, Compression, JobContext, StageOutput};
use strata_shared::platform::Platform;
use strata_shared::progress::{Event, Progress};
use strata_shared::reference::ImageRef;
use strata_shared::registry::RegistryClient;
use strata_shared::store::BlobStore;
use strata_worker::copy::DockerIgnore;
use strata_worker::engine::Engine;
use strata_worker::hashcache::HashCache;
use strata_worker::snapshot::SnapshotKind;

use crate::plan::{
    DockerfileArgs, dockerignore_for, parse_build_args, parse_platforms, read_dockerfile,
};
use crate::progress;

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    dockerfile: DockerfileArgs,
    /// Name (and tag) of the image, `NAME[:TAG]`; may be repeated.
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Where the image goes: `type=oci,dest=FILE`, `type=docker,dest=FILE`,
    /// `type=local,dest=DIR`, `type=image,name=REF,push=true` (or `type=registry`), with
    /// `compression=gzip|zstd|uncompressed` for new layers; a bare path means
    /// `type=local,dest=PATH`.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    outputs: Vec<String>,
    /// How progress is shown.
    #[arg(long, value_enum, default_value_t = progress::Mode::Auto)]
    progress: progress::Mode,
    /// Run every step even if the cache holds its result.
    #[arg(long)]
    no_cache: bool,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or `id=ID,env=VAR`.
    #[arg(long = "secret", value_name = "id=ID,src=FILE")]
    secrets: Vec<String>,
    /// Extra privileges: `network.host` lets `RUN --network=host` use the host's network.
    #[arg(long = "allow", value_delimiter = ',')]
    allow: Vec<String>,
    /// Build on a cluster: its coordinators' addresses (comma-separated). Without it the build
    /// runs here, on an embedded coordinator and worker.
    #[arg(long, value_delimiter = ',', env = "STRATA_COORDINATOR")]
    coordinator: Vec<std::net::SocketAddr>,
    /// The cluster CA certificate.
    #[arg(long, env = "STRATA_CA")]
    ca: Option<PathBuf>,
    /// A client token for the cluster.
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A client certificate and key for the cluster (instead of a token).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The cluster's blob store (the directory its coordinators and workers share).
    #[arg(long, env = "STRATA_STORE")]
    store: Option<PathBuf>,
    /// The queue the build is fair-shared in on a cluster.
    #[arg(long, default_value = "default")]
    tenant: String,
}

/// One `--output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Oci(PathBuf),
    Docker(PathBuf),
    Local(PathBuf),
    /// Pushed to a registry under these names (none: the `-t` names).
    Push(Vec<String>),
}

/// Parses the `--output` values; all of them must agree on the compression.
pub fn parse_outputs(raw: &[String]) -> Result<(Vec<Output>, Compression)> {
    let mut outputs = Vec::new();
    let mut compression = None;
    for spec in raw {
        if !spec.contains('=') {
            outputs.push(Output::Local(PathBuf::from(spec)));
            continue;
        }
        let mut fields = BTreeMap::new();
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("--output {spec:?}: {part:?} is not KEY=VALUE"))?;
            fields.insert(k.trim().to_string(), v.trim().to_string());
        }
        let kind = fields
            .remove("type")
            .ok_or_else(|| anyhow!("--output {spec:?}: missing type= (oci, docker or local)"))?;
        if let Some(c) = fields.remove("compression") {
            let c = match c.as_str() {
                "gzip" => Compression::Gzip,
                "zstd" => Compression::Zstd,
                "uncompressed" => Compression::Uncompressed,
                other => bail!(
                    "--output {spec:?}: unknown compression {other:?} (gzip, zstd, uncompressed)"
                ),
            };
            if compression.is_some_and(|prev| prev != c) {
                bail!("--output: the outputs ask for different compressions");
            }
            compression = Some(c);
        }
        let dest = fields.remove("dest").map(PathBuf::from);
        let names: Vec<String> = fields
            .remove("name")
            .map(|n| {
                n.split(';')
                    .map(str::to_string)
                    .filter(|n| !n.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let need_dest =
            |d: Option<PathBuf>| d.ok_or_else(|| anyhow!("--output {spec:?}: missing dest="));
        let out = match kind.as_str() {
            "oci" => Output::Oci(need_dest(dest)?),
            "docker" => Output::Docker(need_dest(dest)?),
            "local" => Output::Local(need_dest(dest)?),
            "registry" => Output::Push(names),
            "image" => match fields.remove("push").as_deref() {
                Some("true") => Output::Push(names),
                _ => bail!(
                    "--output {spec:?}: type=image needs push=true (there is no local image store to keep it in)"
                ),
            },
            other => bail!(
                "--output {spec:?}: unknown type {other:?} (oci, docker, local, image, registry)"
            ),
        };
        fields.remove("push");
        if let Some(k) = fields.keys().next() {
            bail!("--output {spec:?}: unknown option {k:?}");
        }
        outputs.push(out);
    }
    Ok((outputs, compression.unwrap_or_default()))
}

/// `--secret id=ID,src=FILE` or `id=ID,env=VAR` (the value is written to a private file).
fn parse_secrets(raw: &[String], scratch: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for spec in raw {
        let mut id = None;
        let mut src = None;
        let mut env = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", "file" | "env")) => {}
                _ => bail!("--secret {spec:?}: expected id=ID,src=FILE or id=ID,env=VAR"),
            }
        }
        let id = id
            .or_else(|| {
                src.as_ref()
                    .and_then(|s| s.file_name())
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .or_else(|| env.clone())
            .ok_or_else(|| anyhow!("--secret {spec:?}: missing id="))?;
        let path = match (src, env) {
            (Some(src), None) => {
                if !src.is_file() {
                    bail!(
                        "--secret {spec:?}: {} is not a readable file",
                        src.display()
                    );
                }
                src
            }
            (None, Some(var)) => {
                let value = std::env::var(&var)
                    .map_err(|_| anyhow!("--secret {spec:?}: ${var} is not set"))?;
                let file = scratch.join(format!("secret-env-{}-{}", std::process::id(), out.len()));
                write_private(&file, value.as_bytes())?;
                file
            }
            _ => bail!("--secret {spec:?}: give exactly one of src= or env="),
        };
        out.insert(id, path);
    }
    Ok(out)
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// Where the embedded cluster keeps its state: `STRATA_STATE_DIR`, else the user's cache
/// directory (`$XDG_CACHE_HOME/strata` or `~/.cache/strata`).
pub fn state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("STRATA_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("strata"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            anyhow!("set STRATA_STATE_DIR (or HOME) to say where strata keeps its state")
        })?;
    Ok(PathBuf::from(home).join(".cache").join("strata"))
}

/// The embedded worker as placement sees it: this machine's platforms.
pub fn local_worker() -> WorkerInfo {
    WorkerInfo {
        name: "local".into(),
        capabilities: strata_worker::platforms::detect(),
    }
}

pub fn run(args: BuildArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(build(args))
}

async fn build(args: BuildArgs) -> Result<()> {
    let (file_name, dockerfile) =
        read_dockerfile(&args.dockerfile.context, args.dockerfile.file.as_deref())?;
    let dockerignore = dockerignore_for(&file_name)?;
    // Errors name the Dockerfile as BuildKit does: by its file name.
    let short_name = Path::new(&file_name)
        .file_name()
        .map_or_else(|| file_name.clone(), |n| n.to_string_lossy().into_owned());
    let context = std::fs::canonicalize(&args.dockerfile.context)
        .with_context(|| format!("build context {}", args.dockerfile.context.display()))?;
    if !context.is_dir() {
        bail!("build context {} is not a directory", context.display());
    }
    let tags = args
        .tags
        .iter()
        .map(|t| ImageRef::parse(t).map_err(|e| anyhow!("-t {t}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let (outputs, compression) = parse_outputs(&args.outputs)?;
    let mut allow_host_network = false;
    for a in &args.allow {
        match a.as_str() {
            "network.host" => allow_host_network = true,
            other => bail!("--allow {other:?}: unknown entitlement (network.host)"),
        }
    }

    let state = state_dir()?;
    let scratch = state.join("tmp");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    if !args.coordinator.is_empty() {
        return build_remote(
            args,
            (short_name, dockerfile, dockerignore),
            context,
            tags,
            outputs,
            compression,
            allow_host_network,
            &state,
        )
        .await;
    }
    let secrets = parse_secrets(&args.secrets, &scratch)?;
    let store = BlobStore::local(&state.join("store")).context("opening the blob store")?;
    let snapshots = match std::env::var("STRATA_SNAPSHOTTER").as_deref() {
        Err(_) | Ok("") | Ok("auto") => None,
        Ok("overlay") => Some(SnapshotKind::Overlay),
        Ok("copy") => Some(SnapshotKind::Copy),
        Ok(other) => bail!("STRATA_SNAPSHOTTER={other:?}: expected overlay, copy or auto"),
    };
    let engine = Engine::open_with(&state.join("worker"), store.clone(), snapshots)
        .map_err(|e| anyhow!("{e}"))?;

    let context = context
        .to_str()
        .ok_or_else(|| anyhow!("build context {}: the path is not UTF-8", context.display()))?
        .to_string();
    let request = BuildRequest {
        dockerfile,
        dockerfile_name: short_name,
        context: JobContext::Local(context),
        secrets: secrets
            .into_iter()
            .map(|(id, path)| (id, path.to_string_lossy().into_owned()))
            .collect(),
        dockerignore,
        options: BuildOptions {
            build_args: parse_build_args(&args.dockerfile.build_args)?,
            target: args.dockerfile.target.clone(),
        },
        platforms: parse_platforms(&args.dockerfile.platforms)?,
        no_cache: args.no_cache,
        allow_host_network,
        compression,
        emulation: args
            .dockerfile
            .emulation
            .parse()
            .map_err(|e: String| anyhow!("--emulation: {e}"))?,
        tenant: args.tenant.clone(),
    };
    // Check the plan before anything runs, so a Dockerfile error is reported at once.
    check_plan(&request)?;

    let (progress, rx) = Progress::channel();
    let printer = tokio::spawn(progress::print(args.progress, rx));
    let work = async {
        let images = crate::embedded::build(&state, engine, request, &progress).await?;
        if outputs.is_empty() {
            progress.send(Event::Note {
                text: "no --output given: the result stays in the build cache".into(),
            });
            return Ok(());
        }
        export_all(&store, &images, &outputs, &tags, &scratch, &progress).await
    };
    // Interrupted, the build stops: its running steps' containers are killed and their
    // snapshots released before the process exits.
    let result = tokio::select! {
        done = work => done,
        signal = strata_shared::signal::stop_requested() => {
            Err(anyhow!("build {signal}: its running steps were stopped"))
        }
    };
    drop(progress);
    let _ = printer.await;
    result
}

/// Plans `request` for this machine's worker, so that a Dockerfile error, an unknown target or
/// a platform this machine cannot build is reported before anything runs.
fn check_plan(request: &BuildRequest) -> Result<()> {
    let render = |e: strata_shared::dockerfile::FrontendError| {
        anyhow!(
            "{}",
            e.render(&request.dockerfile_name, &request.dockerfile)
        )
    };
    let df = Dockerfile::parse(&request.dockerfile).map_err(render)?;
    let worker = local_worker();
    let build_platform = worker
        .capabilities
        .native
        .first()
        .map_or_else(Platform::host, Platform::as_build_platform);
    let mut plan =
        dag::plan(&df, &request.options, &build_platform, &request.platforms).map_err(render)?;
    place_plan(&mut plan, &[worker], request.emulation).map_err(|e| {
        // Name a stage of the platform that cannot be placed, with its FROM line.
        let stage = plan.instances.iter().find(|i| i.platform == e.platform);
        match stage.and_then(|i| df.parsed.stages.get(i.index)) {
            Some(st) => render(strata_shared::dockerfile::FrontendError::at(
                st.range, e.message,
            )),
            None => anyhow!("{}", e.message),
        }
    })?;
    Ok(())
}

/// `strata build --coordinator ...`: the build runs on the cluster; the outputs are written
/// here from the cluster's store.
#[allow(clippy::too_many_arguments)]
async fn build_remote(
    args: BuildArgs,
    (dockerfile_name, dockerfile, dockerignore): (String, String, Option<String>),
    context: PathBuf,
    tags: Vec<ImageRef>,
    outputs: Vec<Output>,
    compression: Compression,
    allow_host_network: bool,
    state: &Path,
) -> Result<()> {
    if !args.secrets.is_empty() {
        bail!("--secret is not carried to a cluster: secrets stay on this machine");
    }
    let ca = args.ca.clone().ok_or_else(|| {
        anyhow!("--coordinator needs --ca (or STRATA_CA): the cluster CA certificate")
    })?;
    let store_dir = args.store.clone().ok_or_else(|| {
        anyhow!("--coordinator needs --store (or STRATA_STORE): the cluster's blob store")
    })?;
    let access = crate::cluster::ClusterAccess {
        coordinators: args.coordinator.clone(),
        ca,
        token: args.token.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        learnt: Default::default(),
    };
    let store = BlobStore::local(&store_dir).context("opening the cluster's blob store")?;
    let scratch = state.join("tmp");
    let request = BuildRequest {
        dockerfile_name,
        dockerfile,
        context: JobContext::None,
        secrets: BTreeMap::new(),
        dockerignore: dockerignore.clone(),
        options: BuildOptions {
            build_args: parse_build_args(&args.dockerfile.build_args)?,
            target: args.dockerfile.target.clone(),
        },
        platforms: parse_platforms(&args.dockerfile.platforms)?,
        no_cache: args.no_cache,
        allow_host_network,
        compression,
        emulation: args
            .dockerfile
            .emulation
            .parse()
            .map_err(|e: String| anyhow!("--emulation: {e}"))?,
        tenant: args.tenant.clone(),
    };
    let ignore_text = match dockerignore {
        Some(text) => Some(text),
        None => std::fs::read_to_string(context.join(".dockerignore")).ok(),
    };
    let ignore = match ignore_text {
        Some(text) => Some(DockerIgnore::parse(&text).map_err(|e| anyhow!(".dockerignore: {e}"))?),
        None => None,
    };
    let hashes = Arc::new(HashCache::load(&state.join("client-file-hashes")));
    let (progress, rx) = Progress::channel();
    let printer = tokio::spawn(progress::print(args.progress, rx));
    let result = async {
        let images = crate::cluster::build_on_cluster(
            &access, &store, &context, ignore, hashes, request, &progress,
        )
        .await?;
        if outputs.is_empty() {
            progress.send(Event::Note {
                text: "no --output given: the result stays in the cluster's cache".into(),
            });
            return Ok(());
        }
        export_all(&store, &images, &outputs, &tags, &scratch, &progress).await
    }
    .await;
    drop(progress);
    let _ = printer.await;
    result
}

/// Writes or pushes the built images to every requested output.
pub async fn export_all(
    store: &BlobStore,
    images: &[(Platform, StageOutput)],
    outputs: &[Output],
    tags: &[ImageRef],
    scratch: &Path,
    progress: &Progress,
) -> Result<()> {
    let image = export::assemble(images, &export::creation_time()).map_err(|e| anyhow!("{e}"))?;
    let root = image.root();
    for out in outputs {
        let started = std::time::Instant::now();
        let what = match out {
            Output::Oci(dest) => {
                export::write_oci_tar(store, &image, tags, dest, scratch).await?;
                format!("exported OCI image {} to {}", root.digest, dest.display())
            }
            Output::Docker(dest) => {
                export::write_docker_tar(store, &image, tags, dest, scratch).await?;
                format!(
                    "exported docker image {} to {}",
                    image.images[0].config_digest,
                    dest.display()
                )
            }
            Output::Local(dest) => {
                crate::local::export(store, images, dest, scratch).await?;
                format!("exported files to {}", dest.display())
            }
            Output::Push(names) => {
                let names = if names.is_empty() {
                    tags.to_vec()
                } else {
                    names
                        .iter()
                        .map(|n| ImageRef::parse(n).map_err(|e| anyhow!("--output name={n}: {e}")))
                        .collect::<Result<Vec<_>>>()?
                };
                if names.is_empty() {
                    bail!("--output type=image: give name=REGISTRY/REPOSITORY:TAG or -t");
                }
                let client = RegistryClient::new().map_err(|e| anyhow!("registry client: {e}"))?;
                let reports = export::push(&client, store, &image, &names).await?;
                let mut what = Vec::new();
                for (name, r) in names.iter().zip(&reports) {
                    what.push(format!(
                        "{name}@{} ({} blobs uploaded, {} already there, {} mounted)",
                        r.digest, r.uploaded, r.skipped, r.mounted
                    ));
                }
                format!("pushed {}", what.join(", "))
            }
        };
        progress.send(Event::Note {
            text: format!("{what} in {:.1}s", started.elapsed().as_secs_f64()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_parse_like_buildx() {
        let (outs, c) = parse_outputs(&[
            "type=oci,dest=out.tar,compression=zstd".into(),
            "dir".into(),
        ])
        .unwrap();
        assert_eq!(
            outs,
            vec![Output::Oci("out.tar".into()), Output::Local("dir".into())]
        );
        assert_eq!(c, Compression::Zstd);
        let err = parse_outputs(&["type=tarball,dest=x".into()]).unwrap_err();
        assert!(
            err.to_string().contains("unknown type \"tarball\""),
            "{err}"
        );
        let err = parse_outputs(&["type=oci".into()]).unwrap_err();
        assert!(err.to_string().contains("missing dest="), "{err}");
    }
}
