//! Final image assembly and export: each platform's config and manifest, an OCI index when
//! there are several platforms, written as an OCI image layout tarball or a `docker load`
//! tarball. Every blob comes from the blob store, verified on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use strata_shared::job::StageOutput;
use strata_shared::oci::{
    Descriptor, DescriptorPlatform, History, ImageConfig, Index, MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST, Manifest, sha256_digest,
};
use strata_shared::platform::Platform;
use strata_shared::reference::ImageRef;
use strata_shared::registry::{PushParts, PushReport, RegistryClient};
use strata_shared::store::{BlobMeta, BlobStore, StoreError};

/// Export failures, naming the file or blob.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One platform's image: config and manifest bytes, and its layers.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub platform: Platform,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub layers: Vec<BlobMeta>,
}

/// The assembled image: one manifest per platform, and the index over them.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub images: Vec<PlatformImage>,
    /// The index blob for a multi-platform image.
    pub index: Option<Vec<u8>>,
}

impl Assembled {
    /// The descriptor that names the whole image: the index, or the single manifest.
    pub fn root(&self) -> Descriptor {
        match &self.index {
            Some(bytes) => Descriptor {
                media_type: MEDIA_OCI_INDEX.into(),
                digest: sha256_digest(bytes),
                size: bytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
            },
            None => {
                let img = &self.images[0];
                Descriptor {
                    media_type: MEDIA_OCI_MANIFEST.into(),
                    digest: img.manifest_digest.clone(),
                    size: img.manifest.len() as u64,
                    platform: Some(DescriptorPlatform::from(&img.platform)),
                    annotations: BTreeMap::new(),
                }
            }
        }
    }
}

/// The creation time written into configs: `SOURCE_DATE_EPOCH` when set (reproducible
/// builds), else now. RFC 3339 in UTC.
pub fn creation_time() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok());
    let (secs, nanos) = match secs {
        Some(s) => (s, 0),
        None => {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (i64::try_from(d.as_secs()).unwrap_or(0), d.subsec_nanos())
        }
    };
    rfc3339(secs, nanos)
}

/// `2024-01-02T03:04:05.123456789Z` (fraction left out when zero), as Go's RFC3339Nano.
fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let frac = if nanos == 0 {
        String::new()
    } else {
        let f = format!(".{nanos:09}");
        f.trim_end_matches('0').to_string()
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes each platform's final config and manifest, and the index when there are several.
pub fn assemble(
    images: &[(Platform, StageOutput)],
    created: &str,
) -> Result<Assembled, ExportError> {
    if images.is_empty() {
        return Err(ExportError::Invalid("nothing to export".into()));
    }
    let mut out = Vec::new();
    for (platform, stage) in images {
        let config = final_config(&stage.config, &stage.layers, created)?;
        let config_bytes = serde_json::to_vec(&config)
            .map_err(|e| ExportError::Invalid(format!("image config for {platform}: {e}")))?;
        let config_digest = sha256_digest(&config_bytes);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: MEDIA_OCI_CONFIG.into(),
                digest: config_digest.clone(),
                size: config_bytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
            },
            layers: stage
                .layers
                .iter()
                .map(|l| Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size,
                    platform: None,
                    annotations: BTreeMap::new(),
                })
                .collect(),
            annotations: BTreeMap::new(),
        };
        let manifest_bytes = serde_json::to_vec(&manifest)
            .map_err(|e| ExportError::Invalid(format!("manifest for {platform}: {e}")))?;
        out.push(PlatformImage {
            platform: platform.clone(),
            manifest_digest: sha256_digest(&manifest_bytes),
            manifest: manifest_bytes,
            config: config_bytes,
            config_digest,
            layers: stage.layers.clone(),
        });
    }
    let index = if out.len() > 1 {
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_INDEX.into()),
            manifests: out
                .iter()
                .map(|img| Descriptor {
                    media_type: MEDIA_OCI_MANIFEST.into(),
                    digest: img.manifest_digest.clone(),
                    size: img.manifest.len() as u64,
                    platform: Some(DescriptorPlatform::from(&img.platform)),
                    annotations: BTreeMap::new(),
                })
                .collect(),
            annotations: BTreeMap::new(),
        };
        Some(serde_json::to_vec(&index).map_err(|e| ExportError::Invalid(format!("index: {e}")))?)
    } else {
        None
    };
    Ok(Assembled { images: out, index })
}

/// The config as exported: creation time, the layers' diff-ids, history times.
fn final_config(
    config: &ImageConfig,
    layers: &[BlobMeta],
    created: &str,
) -> Result<ImageConfig, ExportError> {
    let mut c = config.clone();
    c.created = Some(created.to_string());
    c.rootfs.diff_ids = layers
        .iter()
        .map(|l| {
            l.diff_id
                .clone()
                .ok_or_else(|| ExportError::Invalid(format!("layer {} has no diff-id", l.digest)))
        })
        .collect::<Result<_, _>>()?;
    normalize_history(&mut c.history, layers.len());
    for h in &mut c.history {
        if h.created.is_none() {
            h.created = Some(created.to_string());
        }
    }
    Ok(c)
}

/// Makes the history account for exactly `layers` layers, as BuildKit's exporter does for
/// images whose base had no (or too little) history: entries with a layer past the layers
/// become empty, counting from the bottom, and missing ones are added at the end.
fn normalize_history(history: &mut Vec<History>, layers: usize) {
    let mut with_layer = 0;
    for h in history.iter_mut() {
        if with_layer >= layers {
            h.empty_layer = true;
        }
        if !h.empty_layer {
            with_layer += 1;
        }
    }
    history.extend((with_layer..layers).map(|_| History {
        comment: "buildkit.exporter.image.v0".into(),
        ..History::default()
    }));
}

/// A tarball being written: blobs under `blobs/sha256/`, each once.
struct TarOut {
    tar: tar::Builder<BufWriter<File>>,
    path: PathBuf,
    written: BTreeSet<String>,
}

impl TarOut {
    fn create(path: &Path) -> Result<Self, ExportError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let file = File::create(path).map_err(io_err(path))?;
        let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(TarOut {
            tar,
            path: path.to_path_buf(),
            written: BTreeSet::new(),
        })
    }

    fn header(size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h
    }

    fn bytes(&mut self, name: &str, data: &[u8]) -> Result<(), ExportError> {
        let mut h = Self::header(data.len() as u64);
        self.tar
            .append_data(&mut h, name, data)
            .map_err(io_err(&self.path))
    }

    fn dir(&mut self, name: &str) -> Result<(), ExportError> {
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Directory);
        self.tar
            .append_data(&mut h, name, std::io::empty())
            .map_err(io_err(&self.path))
    }

    fn blob_name(digest: &str) -> String {
        format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
    }

    fn blob_bytes(&mut self, data: &[u8]) -> Result<(), ExportError> {
        let digest = sha256_digest(data);
        if self.written.insert(digest.clone()) {
            self.bytes(&Self::blob_name(&digest), data)?;
        }
        Ok(())
    }

    /// Copies a layer from the store (through a scratch file, verified by the store).
    async fn blob_from_store(
        &mut self,
        store: &BlobStore,
        meta: &BlobMeta,
        scratch: &Path,
    ) -> Result<(), ExportError> {
        if !self.written.insert(meta.digest.clone()) {
            return Ok(());
        }
        let tmp = scratch.join(format!("export-{}", meta.blake3));
        store.get_to_file(&meta.blake3, &tmp).await?;
        let result = (|| {
            let mut f = File::open(&tmp).map_err(io_err(&tmp))?;
            let size = f.metadata().map_err(io_err(&tmp))?.len();
            if size != meta.size {
                return Err(ExportError::Invalid(format!(
                    "layer {} is {size} bytes in the store, {} expected",
                    meta.digest, meta.size
                )));
            }
            let mut h = Self::header(size);
            self.tar
                .append_data(&mut h, Self::blob_name(&meta.digest), &mut f)
                .map_err(io_err(&self.path))
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    fn finish(self) -> Result<(), ExportError> {
        let path = self.path.clone();
        let mut w = self.tar.into_inner().map_err(io_err(&path))?;
        w.flush().map_err(io_err(&path))?;
        w.get_ref().sync_all().map_err(io_err(&path))
    }
}

/// Writes the blobs every exporter shares: layers, configs, manifests, the index.
async fn write_blobs(
    out: &mut TarOut,
    store: &BlobStore,
    image: &Assembled,
    scratch: &Path,
) -> Result<(), ExportError> {
    out.dir("blobs/")?;
    out.dir("blobs/sha256/")?;
    for img in &image.images {
        for layer in &img.layers {
            out.blob_from_store(store, layer, scratch).await?;
        }
        out.blob_bytes(&img.config)?;
        out.blob_bytes(&img.manifest)?;
    }
    if let Some(index) = &image.index {
        out.blob_bytes(index)?;
    }
    Ok(())
}

/// The `index.json` of an OCI layout, naming the image by its tags as BuildKit does.
fn layout_index(image: &Assembled, tags: &[ImageRef]) -> Result<Vec<u8>, ExportError> {
    let root = image.root();
    let mut manifests = Vec::new();
    if tags.is_empty() {
        manifests.push(root.clone());
    }
    for tag in tags {
        let mut d = root.clone();
        d.annotations
            .insert("io.containerd.image.name".into(), tag.to_string());
        d.annotations.insert(
            "org.opencontainers.image.ref.name".into(),
            tag.tag.clone().unwrap_or_else(|| "latest".into()),
        );
        manifests.push(d);
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(MEDIA_OCI_INDEX.into()),
        manifests,
        annotations: BTreeMap::new(),
    };
    serde_json::to_vec(&index).map_err(|e| ExportError::Invalid(format!("index.json: {e}")))
}

/// `--output type=oci,dest=FILE`: an OCI image layout as a tarball.
pub async fn write_oci_tar(
    store: &BlobStore,
    image: &Assembled,
    tags: &[ImageRef],
    dest: &Path,
    scratch: &Path,
) -> Result<(), ExportError> {
    let mut out = TarOut::create(dest)?;
    out.bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write_blobs(&mut out, store, image, scratch).await?;
    let index = layout_index(image, tags)?;
    out.bytes("index.json", &index)?;
    out.finish()
}

/// `--output type=docker,dest=FILE`: a tarball `docker load` reads (an OCI layout plus
/// `manifest.json`), for one platform.
pub async fn write_docker_tar(
    store: &BlobStore,
    image: &Assembled,
    tags: &[ImageRef],
    dest: &Path,
    scratch: &Path,
) -> Result<(), ExportError> {
    let [img] = image.images.as_slice() else {
        return Err(ExportError::Invalid(format!(
            "type=docker holds one platform but the build made {}: use type=oci for a multi-platform image",
            image.images.len()
        )));
    };
    let mut out = TarOut::create(dest)?;
    out.bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write_blobs(&mut out, store, image, scratch).await?;
    out.bytes("index.json", &layout_index(image, tags)?)?;
    let repo_tags: Vec<String> = tags.iter().map(docker_tag).collect();
    let manifest = serde_json::json!([{
        "Config": TarOut::blob_name(&img.config_digest),
        "RepoTags": repo_tags,
        "Layers": img.layers.iter().map(|l| TarOut::blob_name(&l.digest)).collect::<Vec<_>>(),
    }]);
    out.bytes("manifest.json", manifest.to_string().as_bytes())?;
    out.finish()
}

/// The parts [`RegistryClient::push_image`] sends: every layer, the configs, the platform
/// manifests (for an index), and the root under the tag.
pub fn push_parts(image: &Assembled) -> PushParts {
    let mut parts = PushParts::default();
    for img in &image.images {
        for layer in &img.layers {
            if !parts.layers.iter().any(|l| l.digest == layer.digest) {
                parts.layers.push(layer.clone());
            }
        }
        parts
            .blobs
            .push((img.config_digest.clone(), img.config.clone()));
    }
    match &image.index {
        Some(index) => {
            for img in &image.images {
                parts.manifests.push((
                    img.manifest_digest.clone(),
                    MEDIA_OCI_MANIFEST.into(),
                    img.manifest.clone(),
                ));
            }
            parts.root = (MEDIA_OCI_INDEX.into(), index.clone());
        }
        None => parts.root = (MEDIA_OCI_MANIFEST.into(), image.images[0].manifest.clone()),
    }
    parts
}

/// `--output type=image,name=REF,push=true`: pushes the image to each name.
pub async fn push(
    client: &RegistryClient,
    store: &BlobStore,
    image: &Assembled,
    names: &[ImageRef],
) -> Result<Vec<PushReport>, ExportError> {
    let parts = push_parts(image);
    let mut reports = Vec::new();
    for name in names {
        let report = client
            .push_image(name, store, &parts)
            .await
            .map_err(|e| ExportError::Invalid(format!("pushing {name}: {e}")))?;
        reports.push(report);
    }
    Ok(reports)
}

/// A tag as `docker images` shows it: Docker Hub names short (`busybox:latest`, `me/app:1`).
fn docker_tag(r: &ImageRef) -> String {
    let repo = if r.registry == "docker.io" {
        r.repository
            .strip_prefix("library/")
            .unwrap_or(&r.repository)
            .to_string()
    } else {
        format!("{}/{}", r.registry, r.repository)
    };
    format!(
        "{repo}:{}",
        r.tag.clone().unwrap_or_else(|| "latest".into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BuildKit's `testHistoryWithoutBaseHistory`-style images: a base without history gets
    /// entries for its layers; too many entries with a layer are made empty.
    #[test]
    fn history_is_normalized_to_the_layers() {
        let step = |created_by: &str, empty_layer: bool| History {
            created_by: created_by.into(),
            empty_layer,
            ..History::default()
        };
        // A base of 2 layers without history, then one RUN.
        let mut h = vec![step("RUN make", false)];
        normalize_history(&mut h, 3);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].created_by, "RUN make");
        assert!(
            h[1..]
                .iter()
                .all(|e| !e.empty_layer && e.comment == "buildkit.exporter.image.v0")
        );
        // More entries with a layer than layers: the extra ones become empty.
        let mut h = vec![step("a", false), step("ENV x=1", true), step("b", false)];
        normalize_history(&mut h, 1);
        assert_eq!(
            h.iter().map(|e| e.empty_layer).collect::<Vec<_>>(),
            [false, true, true]
        );
        // Already right: unchanged.
        let mut h = vec![step("a", false), step("ENV x=1", true)];
        let before = h.clone();
        normalize_history(&mut h, 1);
        assert_eq!(h, before);
    }

    #[test]
    fn rfc3339_matches_go() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_700_000_000, 120_000_000),
            "2023-11-14T22:13:20.12Z"
        );
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn docker_tags_are_short_for_docker_hub() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(docker_tag(&r), "busybox:latest");
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(docker_tag(&r), "127.0.0.1:5000/team/app:v1");
    }

    #[test]
    fn the_exported_history_agrees_with_the_layers() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let mut config = ImageConfig::empty(&p);
        config.history.push(History {
            created_by: "RUN x".into(),
            ..Default::default()
        });
        let out = StageOutput {
            config,
            layers: Vec::new(),
            key: String::new(),
            env: Vec::new(),
            declared: Vec::new(),
        };
        let image = assemble(&[(p, out)], "1970-01-01T00:00:00Z").unwrap();
        let config: ImageConfig = serde_json::from_slice(&image.images[0].config).unwrap();
        assert!(config.history[0].empty_layer, "{config:?}");
    }
}
