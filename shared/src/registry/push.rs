//! Pushing images through the OCI distribution API.
//!
//! - [`RegistryClient::blob_exists`]: `HEAD /v2/<repository>/blobs/<digest>`.
//! - [`RegistryClient::push_blob`]: one blob, unless the registry has it: a `HEAD` first, then
//!   a cross-repository mount when a source repository is named (`POST
//!   /v2/<repository>/blobs/uploads/?mount=<digest>&from=<source>`; `201` is done, `202` means
//!   the registry refused the mount and opened an upload session instead), else a chunked upload:
//!   `POST` opens a session, each chunk goes in a `PATCH` with its `Content-Range`, following the
//!   `Location` the registry answers each time (relative or absolute), and `PUT ?digest=` closes
//!   it. The bytes are hashed as they are sent: a source whose size or sha256 is not the one
//!   declared is never committed (the session is cancelled), and the registry's own check of the
//!   digest is reported with its error codes.
//! - [`RegistryClient::push_manifest`]: `PUT /v2/<repository>/manifests/<reference>` with the
//!   manifest's media type, checking the digest the registry reports.
//! - [`RegistryClient::push_image`]: a whole image from the blob store: the blobs, at most
//!   [`PUSH_CONCURRENCY`] at a time, then the platform manifests by digest, then the root (the
//!   index or the single manifest) by tag.
//!
//! Every request of a push asks for `repository:NAME:pull,push` ([`Access::Push`]); a mount
//! also asks for `pull` on the source repository. A session `Location` on another origin than
//! the registry (an upload service elsewhere) is sent no credentials. Errors name the registry
//! and repository, the digest or reference, the HTTP status and the registry's error codes; an
//! answer without a `Location`, with a `Range` that disagrees with what was sent or with another
//! digest than the content's is [`RegistryError::InvalidResponse`].

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use super::{
    Access, DOCKER_CONTENT_DIGEST, MAX_MANIFEST_BYTES, RegistryClient, RegistryError, check_digest,
    check_repository, check_tag, hex, read_api_errors, registry_endpoint, sha256_digest,
};
use crate::reference::ImageRef;
use crate::store::{BlobMeta, BlobStore};

/// Default largest `PATCH` of a chunked upload (8 MiB); see
/// [`RegistryClient::with_chunk_size`].
pub const DEFAULT_CHUNK_SIZE: usize = 8 << 20;
/// How many blobs [`RegistryClient::push_image`] uploads at once.
pub const PUSH_CONCURRENCY: usize = 4;

const OCTET_STREAM: &str = "application/octet-stream";

/// Where a blob's bytes come from when it must be uploaded.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A file, read chunk by chunk as it is sent.
    File(PathBuf),
}

/// What [`RegistryClient::push_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The registry had the blob already.
    Skipped,
    /// The registry linked the blob from the source repository.
    Mounted,
    /// The bytes were uploaded, in `chunks` `PATCH` requests.
    Uploaded { bytes: u64, chunks: u32 },
}

/// An image to push with [`RegistryClient::push_image`].
#[derive(Debug, Clone, Default)]
pub struct PushParts {
    /// Layer blobs, read from the blob store (by `blake3`) only when they must be uploaded.
    pub layers: Vec<BlobMeta>,
    /// Other blobs in memory, such as image configs: `(sha256 digest, bytes)`.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// Platform manifests, pushed by digest after every blob: `(digest, media type, bytes)`.
    /// Empty for a single-platform image whose manifest is the root.
    pub manifests: Vec<(String, String, Vec<u8>)>,
    /// The index, or the single manifest, pushed last under the target's tag (or digest):
    /// `(media type, bytes)`.
    pub root: (String, Vec<u8>),
    /// A repository of the same registry that may hold some of the blobs (the base image's):
    /// the registry is asked to mount each missing blob from it before it is uploaded.
    pub mount_from: Option<String>,
}

/// What [`RegistryClient::push_image`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs the registry had already.
    pub skipped: usize,
    /// Blobs mounted from [`PushParts::mount_from`].
    pub mounted: usize,
    /// Bytes of the uploaded blobs.
    pub bytes_uploaded: u64,
    /// Digest of the root (index or manifest), as pushed.
    pub digest: String,
}

/// A blob to push whose bytes are fetched only if it must be uploaded.
enum Pending<'a> {
    Ready(BlobSource),
    Store {
        store: &'a BlobStore,
        meta: &'a BlobMeta,
    },
}

/// A temporary file removed on drop (a layer copied out of the blob store).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("partial"));
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Reads a [`BlobSource`] in chunks.
enum ChunkReader {
    Bytes { bytes: Bytes, at: usize },
    File(tokio::fs::File),
}

impl ChunkReader {
    async fn open(source: &BlobSource) -> std::io::Result<Self> {
        Ok(match source {
            BlobSource::Bytes(bytes) => ChunkReader::Bytes {
                bytes: bytes.clone(),
                at: 0,
            },
            BlobSource::File(path) => ChunkReader::File(tokio::fs::File::open(path).await?),
        })
    }

    /// The next chunk of at most `max` bytes (`max` unless the end is reached), or `None` at
    /// the end.
    async fn next(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        match self {
            ChunkReader::Bytes { bytes, at } => {
                if *at >= bytes.len() {
                    return Ok(None);
                }
                let end = at.saturating_add(max).min(bytes.len());
                let chunk = bytes.slice(*at..end);
                *at = end;
                Ok(Some(chunk))
            }
            ChunkReader::File(file) => {
                let mut buf = Vec::with_capacity(max);
                (&mut *file).take(max as u64).read_to_end(&mut buf).await?;
                Ok((!buf.is_empty()).then(|| Bytes::from(buf)))
            }
        }
    }
}

/// What a mount request came to.
enum Mount {
    Mounted,
    /// Refused, with the upload session the registry opened instead.
    Session(Url),
    /// Refused without a session.
    Refused,
}

impl RegistryClient {
    /// `HEAD /v2/<repository>/blobs/<digest>`: whether the registry has the blob (asked with
    /// push access, the scope the rest of a push uses).
    pub async fn blob_exists(&self, image: &ImageRef, digest: &str) -> Result<bool, RegistryError> {
        check_repository(image)?;
        check_digest(image, digest)?;
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            registry_endpoint(&image.registry),
            image.repository
        );
        let response = self
            .send(&image.registry, &image.repository, Access::Push, |http| {
                http.head(&url)
            })
            .await?;
        let status = response.status();
        if status.is_success() {
            Ok(true)
        } else if status == StatusCode::NOT_FOUND {
            Ok(false)
        } else {
            Err(RegistryError::Status {
                image: image.name(),
                what: "blob check",
                reference: digest.to_string(),
                status: status.as_u16(),
                errors: Vec::new(),
                body: String::new(),
            })
        }
    }

    /// Uploads blob `digest` of `size` bytes to `image`'s repository unless the registry has
    /// it: `HEAD` first; then, when `mount_from` names another repository of the same
    /// registry, a cross-repository mount (the registry may refuse it, then the upload goes
    /// on in the session it opened); else a chunked upload (`POST`, one `PATCH` per chunk of
    /// at most the client's chunk size, `PUT ?digest=`).
    ///
    /// The bytes are hashed as they are read: a source that is not `size` bytes or does not
    /// hash to `digest` is refused ([`RegistryError::SizeMismatch`],
    /// [`RegistryError::DigestMismatch`], `what` = `"blob to push"`) before the upload is
    /// committed, and the session is cancelled.
    pub async fn push_blob(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        source: BlobSource,
        mount_from: Option<&str>,
    ) -> Result<PushOutcome, RegistryError> {
        self.push_pending(image, digest, size, mount_from, Pending::Ready(source))
            .await
    }

    /// `PUT /v2/<repository>/manifests/<reference>` (a tag, or the manifest's digest) with
    /// `media_type` as `Content-Type`; returns the manifest's digest after checking that the
    /// one the registry reports (`Docker-Content-Digest`), if any, is the sha256 of `bytes`.
    /// A digest `reference` must be that of `bytes`. The blobs and manifests it references
    /// must be in the repository already (the registry checks).
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String, RegistryError> {
        check_repository(image)?;
        let actual = sha256_digest(bytes);
        if reference.contains(':') {
            check_digest(image, reference)?;
            if reference != actual {
                return Err(RegistryError::DigestMismatch {
                    image: image.name(),
                    what: "manifest to push",
                    reference: reference.to_string(),
                    expected: reference.to_string(),
                    actual,
                });
            }
        } else {
            check_tag(image, reference)?;
        }
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                image: image.name(),
                what: "manifest to push",
                reference: reference.to_string(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            registry_endpoint(&image.registry),
            image.repository
        );
        let body = Bytes::copy_from_slice(bytes);
        let response = self
            .send(&image.registry, &image.repository, Access::Push, |http| {
                http.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        let status = response.status();
        if !status.is_success() {
            let (errors, body) = read_api_errors(response).await;
            return Err(RegistryError::Status {
                image: image.name(),
                what: "manifest push",
                reference: reference.to_string(),
                status: status.as_u16(),
                errors,
                body,
            });
        }
        if let Some(reported) = reported_digest(&response)
            && reported != actual
        {
            return Err(RegistryError::InvalidResponse {
                image: image.name(),
                what: "manifest push",
                reference: reference.to_string(),
                reason: format!(
                    "it reports digest {reported} for a manifest whose bytes hash to {actual}"
                ),
            });
        }
        tracing::debug!(image = %image.name(), reference, digest = %actual, "pushed manifest");
        Ok(actual)
    }

    /// Pushes a whole image to `target`: every blob of `parts` (layers read from `store` only
    /// when the registry lacks them and cannot mount them; a layer larger than one chunk is
    /// copied to a temporary file first), at most [`PUSH_CONCURRENCY`] at a time; then the
    /// platform manifests by digest; then the root under `target`'s tag (`latest` when it has
    /// none), or its digest when it names one. A blob listed twice is pushed once. Every digest
    /// in `parts` is checked against its bytes before anything is sent.
    pub async fn push_image(
        &self,
        target: &ImageRef,
        store: &BlobStore,
        parts: &PushParts,
    ) -> Result<PushReport, RegistryError> {
        check_repository(target)?;
        let reference = match (&target.digest, &target.tag) {
            (Some(digest), _) => digest.clone(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_string(),
        };
        for (digest, bytes) in &parts.blobs {
            check_content(target, "blob to push", digest, bytes)?;
        }
        for (digest, _, bytes) in &parts.manifests {
            check_content(target, "manifest to push", digest, bytes)?;
        }
        for layer in &parts.layers {
            check_digest(target, &layer.digest)?;
        }
        let mut seen = HashSet::new();
        let mut jobs: Vec<(&str, u64, Pending<'_>)> = Vec::new();
        for meta in &parts.layers {
            if seen.insert(meta.digest.as_str()) {
                jobs.push((&meta.digest, meta.size, Pending::Store { store, meta }));
            }
        }
        for (digest, bytes) in &parts.blobs {
            if seen.insert(digest.as_str()) {
                let source = BlobSource::Bytes(Bytes::copy_from_slice(bytes));
                jobs.push((digest, bytes.len() as u64, Pending::Ready(source)));
            }
        }
        let mount_from = parts.mount_from.as_deref();
        // The futures are made first (they do nothing until polled): a closure inside the stream
        // would make the whole future lose `Send` to a higher-ranked lifetime error.
        let pushes: Vec<_> = jobs
            .into_iter()
            .map(|(digest, size, pending)| {
                self.push_pending(target, digest, size, mount_from, pending)
            })
            .collect();
        let outcomes: Vec<PushOutcome> = futures::stream::iter(pushes)
            .buffer_unordered(PUSH_CONCURRENCY)
            .try_collect()
            .await?;
        let mut report = PushReport::default();
        for outcome in outcomes {
            match outcome {
                PushOutcome::Skipped => report.skipped += 1,
                PushOutcome::Mounted => report.mounted += 1,
                PushOutcome::Uploaded { bytes, .. } => {
                    report.uploaded += 1;
                    report.bytes_uploaded += bytes;
                }
            }
        }
        for (digest, media_type, bytes) in &parts.manifests {
            self.push_manifest(target, digest, media_type, bytes)
                .await?;
        }
        let (media_type, bytes) = &parts.root;
        report.digest = self
            .push_manifest(target, &reference, media_type, bytes)
            .await?;
        tracing::info!(
            image = %target,
            digest = %report.digest,
            uploaded = report.uploaded,
            mounted = report.mounted,
            skipped = report.skipped,
            bytes = report.bytes_uploaded,
            "pushed image"
        );
        Ok(report)
    }

    async fn push_pending(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        mount_from: Option<&str>,
        pending: Pending<'_>,
    ) -> Result<PushOutcome, RegistryError> {
        check_repository(image)?;
        check_digest(image, digest)?;
        if let Some(from) = mount_from {
            check_repository(&ImageRef {
                registry: image.registry.clone(),
                repository: from.to_string(),
                tag: None,
                digest: None,
            })?;
        }
        if self.blob_exists(image, digest).await? {
            tracing::debug!(image = %image.name(), digest, "blob already there");
            return Ok(PushOutcome::Skipped);
        }
        let mut session = None;
        if let Some(from) = mount_from.filter(|from| *from != image.repository) {
            match self.mount(image, digest, from).await? {
                Mount::Mounted => {
                    tracing::debug!(image = %image.name(), digest, from, "blob mounted");
                    return Ok(PushOutcome::Mounted);
                }
                Mount::Session(url) => session = Some(url),
                Mount::Refused => {}
            }
        }
        let (source, _temp) = match self.materialize(image, digest, pending).await {
            Ok(ready) => ready,
            Err(e) => {
                if let Some(url) = &session {
                    self.cancel_upload(image, url).await;
                }
                return Err(e);
            }
        };
        let session = match session {
            Some(url) => url,
            None => self.open_upload(image, digest).await?,
        };
        let (bytes, chunks) = self.upload(image, digest, size, session, &source).await?;
        tracing::debug!(image = %image.name(), digest, bytes, chunks, "blob uploaded");
        Ok(PushOutcome::Uploaded { bytes, chunks })
    }

    /// The bytes of a pending blob; a layer from the store larger than one chunk goes to a
    /// temporary file, removed when the returned guard is dropped.
    async fn materialize(
        &self,
        image: &ImageRef,
        digest: &str,
        pending: Pending<'_>,
    ) -> Result<(BlobSource, Option<TempFile>), RegistryError> {
        let (store, meta) = match pending {
            Pending::Ready(source) => return Ok((source, None)),
            Pending::Store { store, meta } => (store, meta),
        };
        let store_error = |source| RegistryError::Store {
            image: image.name(),
            digest: digest.to_string(),
            source: Box::new(source),
        };
        if meta.size <= self.chunk_size as u64 {
            let bytes = store.get_bytes(&meta.blake3).await.map_err(store_error)?;
            return Ok((BlobSource::Bytes(bytes), None));
        }
        let path = std::env::temp_dir().join(format!(
            ".strata-push-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let temp = TempFile(path.clone());
        store
            .get_to_file(&meta.blake3, &path)
            .await
            .map_err(store_error)?;
        Ok((BlobSource::File(path), Some(temp)))
    }

    /// `POST /v2/<repository>/blobs/uploads/?mount=<digest>&from=<from>`.
    async fn mount(
        &self,
        image: &ImageRef,
        digest: &str,
        from: &str,
    ) -> Result<Mount, RegistryError> {
        let url = uploads_url(image);
        let scopes = [
            Access::Push.scope(&image.repository),
            Access::Pull.scope(from),
        ];
        let response = match self
            .send_scoped(&image.registry, &image.repository, &scopes, |http| {
                http.post(&url)
                    .query(&[("mount", digest), ("from", from)])
                    .body(Bytes::new())
            })
            .await
        {
            Ok(response) => response,
            // No access to the source (or no token for both scopes): upload instead.
            Err(e @ (RegistryError::Unauthorized { .. } | RegistryError::Token { .. })) => {
                tracing::debug!(image = %image.name(), digest, from, error = %e, "mount refused");
                return Ok(Mount::Refused);
            }
            Err(e) => return Err(e),
        };
        let status = response.status();
        if status == StatusCode::CREATED {
            if let Some(reported) = reported_digest(&response)
                && reported != digest
            {
                return Err(RegistryError::InvalidResponse {
                    image: image.name(),
                    what: "blob mount",
                    reference: digest.to_string(),
                    reason: format!("it reports having mounted {reported}"),
                });
            }
            return Ok(Mount::Mounted);
        }
        if status == StatusCode::ACCEPTED {
            let base = response.url().clone();
            return next_location(image, digest, "blob mount", &base, &response)
                .map(Mount::Session);
        }
        let (errors, body) = read_api_errors(response).await;
        tracing::debug!(
            image = %image.name(),
            digest,
            from,
            status = status.as_u16(),
            errors = %super::describe_api_errors(&errors, &body),
            "mount refused"
        );
        Ok(Mount::Refused)
    }

    /// `POST /v2/<repository>/blobs/uploads/`: opens an upload session, returns its URL.
    async fn open_upload(&self, image: &ImageRef, digest: &str) -> Result<Url, RegistryError> {
        let url = uploads_url(image);
        let response = self
            .send(&image.registry, &image.repository, Access::Push, |http| {
                http.post(&url).body(Bytes::new())
            })
            .await?;
        let status = response.status();
        if status != StatusCode::ACCEPTED {
            return Err(status_error(image, "blob upload", digest, response).await);
        }
        let base = response.url().clone();
        next_location(image, digest, "blob upload", &base, &response)
    }

    /// Sends `source` in chunks to the session at `location` and closes it with `digest`;
    /// returns the bytes and chunks sent. On any error the session is cancelled.
    async fn upload(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        mut location: Url,
        source: &BlobSource,
    ) -> Result<(u64, u32), RegistryError> {
        let result = self
            .upload_in(image, digest, size, &mut location, source)
            .await;
        if result.is_err() {
            self.cancel_upload(image, &location).await;
        }
        result
    }

    async fn upload_in(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        location: &mut Url,
        source: &BlobSource,
    ) -> Result<(u64, u32), RegistryError> {
        let path = match source {
            BlobSource::File(path) => path.clone(),
            BlobSource::Bytes(_) => PathBuf::from("(memory)"),
        };
        let read_error = |source| RegistryError::ReadSource {
            image: image.name(),
            digest: digest.to_string(),
            path: path.clone(),
            source,
        };
        let size_error = |actual| RegistryError::SizeMismatch {
            image: image.name(),
            what: "blob to push",
            reference: digest.to_string(),
            expected: size,
            actual,
        };
        let mut reader = ChunkReader::open(source).await.map_err(read_error)?;
        let mut hasher = Sha256::new();
        let mut offset: u64 = 0;
        let mut chunks: u32 = 0;
        while let Some(chunk) = reader.next(self.chunk_size).await.map_err(read_error)? {
            let end = offset + chunk.len() as u64;
            if end > size {
                return Err(size_error(end));
            }
            hasher.update(&chunk);
            *location = self
                .patch_chunk(image, digest, location, offset, chunk)
                .await?;
            offset = end;
            chunks += 1;
        }
        if offset != size {
            return Err(size_error(offset));
        }
        let actual = format!("sha256:{}", hex(&hasher.finalize()));
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                image: image.name(),
                what: "blob to push",
                reference: digest.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        self.close_upload(image, digest, location).await?;
        Ok((offset, chunks))
    }

    /// `PATCH` one chunk starting at `offset`; returns the session's next URL.
    async fn patch_chunk(
        &self,
        image: &ImageRef,
        digest: &str,
        location: &Url,
        offset: u64,
        chunk: Bytes,
    ) -> Result<Url, RegistryError> {
        let last = offset + chunk.len() as u64 - 1;
        let range = format!("{offset}-{last}");
        let response = self
            .send_upload(image, location, |http| {
                http.patch(location.clone())
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .header(CONTENT_RANGE, &range)
                    .body(chunk.clone())
            })
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error(image, "blob upload", digest, response).await);
        }
        if let Some(value) = response.headers().get(RANGE) {
            let text = value.to_str().unwrap_or_default().trim();
            let bounds = text.strip_prefix("bytes=").unwrap_or(text).split_once('-');
            let held = bounds
                .filter(|(first, _)| *first == "0")
                .and_then(|(_, end)| end.parse::<u64>().ok());
            if held != Some(last) {
                return Err(RegistryError::InvalidResponse {
                    image: image.name(),
                    what: "blob upload",
                    reference: digest.to_string(),
                    reason: format!(
                        "after bytes {range} it reports holding Range {text:?}, not \"0-{last}\""
                    ),
                });
            }
        }
        let base = response.url().clone();
        next_location(image, digest, "blob upload", &base, &response)
    }

    /// `PUT <location>&digest=<digest>`: commits the upload.
    async fn close_upload(
        &self,
        image: &ImageRef,
        digest: &str,
        location: &Url,
    ) -> Result<(), RegistryError> {
        let mut url = location.clone();
        url.query_pairs_mut().append_pair("digest", digest);
        let response = self
            .send_upload(image, &url, |http| {
                http.put(url.clone())
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .body(Bytes::new())
            })
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error(image, "blob upload", digest, response).await);
        }
        if let Some(reported) = reported_digest(&response)
            && reported != digest
        {
            return Err(RegistryError::InvalidResponse {
                image: image.name(),
                what: "blob upload",
                reference: digest.to_string(),
                reason: format!("it reports having stored {reported}"),
            });
        }
        Ok(())
    }

    /// `DELETE <location>`, best effort: the registry drops the session's data.
    async fn cancel_upload(&self, image: &ImageRef, location: &Url) {
        let result = self
            .send_upload(image, location, |http| http.delete(location.clone()))
            .await;
        if let Err(e) = result {
            tracing::debug!(image = %image.name(), error = %e, "cancelling an upload failed");
        }
    }

    /// Sends a request to an upload session URL: authenticated like any request to the
    /// registry when the URL is on the registry's origin, with no credentials otherwise.
    async fn send_upload<F>(
        &self,
        image: &ImageRef,
        url: &Url,
        make: F,
    ) -> Result<reqwest::Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let same_origin = Url::parse(&registry_endpoint(&image.registry))
            .is_ok_and(|endpoint| endpoint.origin() == url.origin());
        if same_origin {
            self.send(&image.registry, &image.repository, Access::Push, make)
                .await
        } else {
            self.execute(&make, None).await
        }
    }
}

fn uploads_url(image: &ImageRef) -> String {
    format!(
        "{}/v2/{}/blobs/uploads/",
        registry_endpoint(&image.registry),
        image.repository
    )
}

/// The `Docker-Content-Digest` of an answer, if any.
fn reported_digest(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(DOCKER_CONTENT_DIGEST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
}

/// The session URL in an answer's `Location`, resolved against the request's URL.
fn next_location(
    image: &ImageRef,
    digest: &str,
    what: &'static str,
    base: &Url,
    response: &reqwest::Response,
) -> Result<Url, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidResponse {
        image: image.name(),
        what,
        reference: digest.to_string(),
        reason,
    };
    let status = response.status().as_u16();
    let value = response
        .headers()
        .get(LOCATION)
        .ok_or_else(|| invalid(format!("HTTP {status} without a Location header")))?;
    let text = value
        .to_str()
        .map_err(|_| invalid("the Location header is not text".to_string()))?
        .trim();
    let url = base
        .join(text)
        .map_err(|e| invalid(format!("invalid Location {text:?}: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid(format!("Location {text:?} is not an http(s) URL")));
    }
    Ok(url)
}

/// [`RegistryError::Status`] for an unexpected answer, with the registry's error codes.
async fn status_error(
    image: &ImageRef,
    what: &'static str,
    digest: &str,
    response: reqwest::Response,
) -> RegistryError {
    let status = response.status().as_u16();
    let (errors, body) = read_api_errors(response).await;
    RegistryError::Status {
        image: image.name(),
        what,
        reference: digest.to_string(),
        status,
        errors,
        body,
    }
}

/// Checks that `bytes` hash to `digest`, a valid sha256 digest.
fn check_content(
    image: &ImageRef,
    what: &'static str,
    digest: &str,
    bytes: &[u8],
) -> Result<(), RegistryError> {
    check_digest(image, digest)?;
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(RegistryError::DigestMismatch {
            image: image.name(),
            what,
            reference: digest.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;
    use std::sync::{Arc, OnceLock};
    use std::time::Instant;

    use crate::registry::tests::{anonymous, chain, image};
    use crate::registry::{Credentials, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};
    use crate::store::RECORD_VERSION;
    use base64::Engine as _;
    use serde_json::{Value, json};
    use strata_testkit::stub::{StubRequest, StubResponse, StubServer};
    use strata_testkit::{Registry, busybox_layout, read_layout_blob};

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// Runs skopeo and returns its standard output; panics with its output on failure.
    fn skopeo(args: &[&str]) -> Vec<u8> {
        let out = Command::new("skopeo")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run skopeo (apt-get install -y skopeo): {e}"));
        assert!(
            out.status.success(),
            "skopeo {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The busybox fixture (amd64 + arm64 index) as [`PushParts`], its layers put in `store`
    /// as a build would have left them; and the index digest.
    async fn busybox_parts(store: &BlobStore) -> (PushParts, String) {
        let layout = busybox_layout();
        let top = json_of(&std::fs::read(layout.join("index.json")).unwrap());
        let index_digest = top["manifests"][0]["digest"].as_str().unwrap().to_string();
        let index_bytes = read_layout_blob(&layout, &index_digest);
        let mut parts = PushParts {
            root: (MEDIA_OCI_INDEX.to_string(), index_bytes.clone()),
            ..PushParts::default()
        };
        for entry in json_of(&index_bytes)["manifests"].as_array().unwrap() {
            let digest = entry["digest"].as_str().unwrap();
            let bytes = read_layout_blob(&layout, digest);
            let manifest = json_of(&bytes);
            let config = manifest["config"]["digest"].as_str().unwrap();
            parts
                .blobs
                .push((config.to_string(), read_layout_blob(&layout, config)));
            for layer in manifest["layers"].as_array().unwrap() {
                let layer_digest = layer["digest"].as_str().unwrap();
                let meta = store
                    .put_bytes(
                        &read_layout_blob(&layout, layer_digest),
                        layer["mediaType"].as_str().unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(meta.digest, layer_digest);
                parts.layers.push(meta);
            }
            parts.manifests.push((
                digest.to_string(),
                entry["mediaType"].as_str().unwrap().to_string(),
                bytes,
            ));
        }
        (parts, index_digest)
    }

    fn total_blob_bytes(parts: &PushParts) -> u64 {
        parts.layers.iter().map(|l| l.size).sum::<u64>()
            + parts.blobs.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// What `skopeo inspect --raw` reads back for `reference`, with its digest.
    fn inspect_raw(reference: &str, creds: Option<&str>) -> (Vec<u8>, String) {
        let target = format!("docker://{reference}");
        let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
        if let Some(creds) = creds {
            args.extend(["--creds", creds]);
        }
        args.push(&target);
        let raw = skopeo(&args);
        let digest = sha256_digest(&raw);
        (raw, digest)
    }

    // --- against Debian's docker-registry ---------------------------------------------------

    /// The busybox index (two platforms, layers from the blob store, uploaded in 256 KiB
    /// chunks so each ~1 MB layer takes several PATCHes and goes through a temporary file)
    /// is pushed to a fresh registry; skopeo reads back the same index, and copies every
    /// platform into an OCI layout whose blobs are the fixture's, byte for byte. Pushing it
    /// again uploads nothing.
    #[tokio::test]
    async fn pushes_busybox_and_skopeo_reads_it_back() {
        let registry = Registry::start();
        let addr = registry.addr();
        let store_dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(store_dir.path()).unwrap();
        let (parts, index_digest) = busybox_parts(&store).await;
        let client = anonymous().with_chunk_size(256 << 10);
        let target = image(&addr, "team/busybox:v1");

        let report = client
            .push_image(&target, &store, &parts)
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(
            report,
            PushReport {
                uploaded: 4,
                skipped: 0,
                mounted: 0,
                bytes_uploaded: total_blob_bytes(&parts),
                digest: index_digest.clone(),
            }
        );

        let (raw, digest) = inspect_raw(&format!("{addr}/team/busybox:v1"), None);
        assert_eq!(digest, index_digest);
        assert_eq!(raw, parts.root.1);

        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("oci");
        skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{addr}/team/busybox:v1"),
            &format!("oci:{}", dest.display()),
        ]);
        let copied = json_of(&std::fs::read(dest.join("index.json")).unwrap());
        assert_eq!(copied["manifests"][0]["digest"], index_digest.as_str());
        let layout = busybox_layout();
        let mut blobs = 0;
        for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            let copy = std::fs::read(dest.join("blobs/sha256").join(&name))
                .unwrap_or_else(|e| panic!("{digest} missing from skopeo's copy: {e}"));
            assert_eq!(copy, read_layout_blob(&layout, &digest), "{digest}");
            blobs += 1;
        }
        assert_eq!(
            blobs,
            1 + 2 + 2 + 2,
            "index, 2 manifests, 2 configs, 2 layers"
        );

        // Our own pull sees both platforms.
        for (wanted, entry) in [("linux/amd64", 0), ("linux/arm64", 1)] {
            let resolved = client
                .resolve(&target, &wanted.parse().unwrap())
                .await
                .unwrap();
            assert_eq!(
                resolved.index_digest.as_deref(),
                Some(index_digest.as_str())
            );
            assert_eq!(resolved.manifest_digest, parts.manifests[entry].0);
        }

        let again = client.push_image(&target, &store, &parts).await.unwrap();
        assert_eq!(
            again,
            PushReport {
                uploaded: 0,
                skipped: 4,
                mounted: 0,
                bytes_uploaded: 0,
                digest: index_digest,
            }
        );
    }

    /// A second repository of the same registry gets every blob by a cross-repository mount;
    /// a mount from a repository that lacks the blob falls back to an upload in the session
    /// the registry opened instead.
    #[tokio::test]
    async fn second_repository_mounts_the_blobs() {
        let registry = Registry::start();
        let addr = registry.addr();
        let store_dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(store_dir.path()).unwrap();
        let (mut parts, index_digest) = busybox_parts(&store).await;
        let client = anonymous();
        client
            .push_image(&image(&addr, "team/busybox:v1"), &store, &parts)
            .await
            .unwrap();

        parts.mount_from = Some("team/busybox".to_string());
        let report = client
            .push_image(&image(&addr, "other/app:1.0"), &store, &parts)
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(
            report,
            PushReport {
                uploaded: 0,
                skipped: 0,
                mounted: 4,
                bytes_uploaded: 0,
                digest: index_digest.clone(),
            }
        );
        let (_, digest) = inspect_raw(&format!("{addr}/other/app:1.0"), None);
        assert_eq!(digest, index_digest);
        let dir = tempfile::tempdir().unwrap();
        let layer = &parts.layers[0];
        client
            .fetch_blob(
                &image(&addr, "other/app:1.0"),
                &layer.digest,
                &dir.path().join("l"),
            )
            .await
            .unwrap();

        let fresh = b"a blob only this test has".to_vec();
        let fresh_digest = sha256_digest(&fresh);
        let other = image(&addr, "other/app:1.0");
        let outcome = client
            .push_blob(
                &other,
                &fresh_digest,
                fresh.len() as u64,
                BlobSource::Bytes(Bytes::from(fresh.clone())),
                Some("team/busybox"),
            )
            .await
            .unwrap();
        assert_eq!(
            outcome,
            PushOutcome::Uploaded {
                bytes: fresh.len() as u64,
                chunks: 1
            }
        );
        assert!(client.blob_exists(&other, &fresh_digest).await.unwrap());
        assert!(
            !client
                .blob_exists(&image(&addr, "team/busybox:v1"), &fresh_digest)
                .await
                .unwrap()
        );
    }

    /// A 20 MiB blob of pseudo-random bytes spans three 8 MiB PATCHes from memory, and seven
    /// 3 MiB ones from a file; both come back intact through `fetch_blob`.
    #[tokio::test]
    async fn multi_chunk_upload_arrives_intact() {
        let registry = Registry::start();
        let addr = registry.addr();
        let data = pseudo_random(20 << 20, 0x5eed_1234_abcd_0042);
        let digest = sha256_digest(&data);
        let size = data.len() as u64;
        let dir = tempfile::tempdir().unwrap();

        let client = anonymous();
        let repo = image(&addr, "big/blob:1");
        let started = Instant::now();
        let outcome = client
            .push_blob(
                &repo,
                &digest,
                size,
                BlobSource::Bytes(Bytes::from(data.clone())),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        let elapsed = started.elapsed();
        eprintln!("pushed 20 MiB in 3 chunks of <= 8 MiB in {elapsed:?}");
        assert_eq!(
            outcome,
            PushOutcome::Uploaded {
                bytes: size,
                chunks: 3
            }
        );
        let back = dir.path().join("back");
        assert_eq!(
            client.fetch_blob(&repo, &digest, &back).await.unwrap(),
            size
        );
        assert_eq!(std::fs::read(&back).unwrap(), data);
        assert_eq!(
            client
                .push_blob(
                    &repo,
                    &digest,
                    size,
                    BlobSource::Bytes(Bytes::from(data.clone())),
                    None
                )
                .await
                .unwrap(),
            PushOutcome::Skipped
        );

        let file = dir.path().join("source");
        std::fs::write(&file, &data).unwrap();
        let small_chunks = anonymous().with_chunk_size(3 << 20);
        let repo2 = image(&addr, "big/file:1");
        let started = Instant::now();
        let outcome = small_chunks
            .push_blob(&repo2, &digest, size, BlobSource::File(file), None)
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        eprintln!(
            "pushed 20 MiB from a file in 7 chunks of <= 3 MiB in {:?}",
            started.elapsed()
        );
        assert_eq!(
            outcome,
            PushOutcome::Uploaded {
                bytes: size,
                chunks: 7
            }
        );
        let back2 = dir.path().join("back2");
        small_chunks
            .fetch_blob(&repo2, &digest, &back2)
            .await
            .unwrap();
        assert_eq!(sha256_digest(&std::fs::read(&back2).unwrap()), digest);
    }

    /// Against a registry with htpasswd basic auth, credentials from a Docker config file
    /// push the image (and skopeo reads it back with them); without credentials, or with
    /// wrong ones, the push is refused with an error that says so.
    #[tokio::test]
    async fn basic_auth_push_with_credentials_from_a_docker_config() {
        let registry = Registry::start_with_basic_auth("strata", "s3cret");
        let addr = registry.addr();
        let store_dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(store_dir.path()).unwrap();
        let (parts, index_digest) = busybox_parts(&store).await;
        let target = image(&addr, "team/private:v1");

        let config_dir = tempfile::tempdir().unwrap();
        let config_path = config_dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("strata:s3cret");
        std::fs::write(
            &config_path,
            serde_json::to_vec(&json!({ "auths": { format!("http://{addr}"): { "auth": auth } } }))
                .unwrap(),
        )
        .unwrap();

        let err = anonymous()
            .push_image(&target, &store, &parts)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&format!(
                "{addr}: access to team/private denied: the registry asks for basic auth and \
                 the Docker config has no credentials for {addr}"
            )),
            "{err}"
        );
        let mut wrong = Credentials::none();
        wrong.insert(&addr, "strata", "wrong");
        let err = RegistryClient::with_credentials(wrong)
            .unwrap()
            .push_image(&target, &store, &parts)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the credentials of \"strata\" were refused: HTTP 401"),
            "{err}"
        );

        let client =
            RegistryClient::with_credentials(Credentials::from_file(&config_path).unwrap())
                .unwrap();
        let report = client
            .push_image(&target, &store, &parts)
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(report.uploaded, 4);
        assert_eq!(report.digest, index_digest);
        let (_, digest) = inspect_raw(&format!("{addr}/team/private:v1"), Some("strata:s3cret"));
        assert_eq!(digest, index_digest);
    }

    /// Bytes that do not hash to the declared digest (or are not the declared size) are never
    /// committed, and the error names the digest; the registry's own refusal of a wrong
    /// digest at commit, and of a manifest whose blobs it lacks, come with its error codes.
    #[tokio::test]
    async fn wrong_digest_is_refused() {
        let registry = Registry::start();
        let addr = registry.addr();
        let client = anonymous();
        let repo = image(&addr, "team/app:1");
        let declared = sha256_digest(b"the bytes that were meant");
        let sent = b"other bytes entirely".to_vec();

        let err = client
            .push_blob(
                &repo,
                &declared,
                sent.len() as u64,
                BlobSource::Bytes(Bytes::from(sent.clone())),
                None,
            )
            .await
            .unwrap_err();
        match &err {
            RegistryError::DigestMismatch {
                what,
                reference,
                expected,
                actual,
                ..
            } => {
                assert_eq!(*what, "blob to push");
                assert_eq!(reference, &declared);
                assert_eq!(expected, &declared);
                assert_eq!(actual, &sha256_digest(&sent));
            }
            other => panic!("{}", chain(other)),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "{addr}/team/app: blob to push {declared}: the content has digest {}, \
                 expected {declared}",
                sha256_digest(&sent)
            )
        );
        assert!(!client.blob_exists(&repo, &declared).await.unwrap());
        assert!(
            !client
                .blob_exists(&repo, &sha256_digest(&sent))
                .await
                .unwrap()
        );

        let right = sha256_digest(&sent);
        let err = client
            .push_blob(
                &repo,
                &right,
                5,
                BlobSource::Bytes(Bytes::from(sent.clone())),
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::SizeMismatch { expected: 5, reference, .. }
                if *reference == right),
            "{}",
            chain(&err)
        );
        let missing = Path::new("/nonexistent/strata-blob");
        let err = client
            .push_blob(
                &repo,
                &right,
                sent.len() as u64,
                BlobSource::File(missing.to_path_buf()),
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::ReadSource { .. })
                && chain(&err).contains("/nonexistent/strata-blob"),
            "{}",
            chain(&err)
        );

        // The registry's check at commit, reached by skipping ours.
        let session = client.open_upload(&repo, &declared).await.unwrap();
        let next = client
            .patch_chunk(&repo, &declared, &session, 0, Bytes::from(sent.clone()))
            .await
            .unwrap();
        let err = client
            .close_upload(&repo, &declared, &next)
            .await
            .unwrap_err();
        match &err {
            RegistryError::Status { status, errors, .. } => {
                assert_eq!(*status, 400);
                assert_eq!(errors[0].code, "DIGEST_INVALID");
            }
            other => panic!("{}", chain(other)),
        }
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "{addr}/team/app: blob upload {declared}: HTTP 400: DIGEST_INVALID"
            )),
            "{message}"
        );

        // A manifest whose blobs the repository lacks.
        let layout = busybox_layout();
        let top = json_of(&std::fs::read(layout.join("index.json")).unwrap());
        let index = json_of(&read_layout_blob(
            &layout,
            top["manifests"][0]["digest"].as_str().unwrap(),
        ));
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest = read_layout_blob(&layout, manifest_digest);
        let err = client
            .push_manifest(&repo, "v1", MEDIA_OCI_MANIFEST, &manifest)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::Status { what: "manifest push", status: 400, errors, .. }
                if errors.iter().any(|e| e.code == "MANIFEST_BLOB_UNKNOWN")),
            "{}",
            chain(&err)
        );
        // A digest reference must be the bytes' digest: refused before sending.
        let err = client
            .push_manifest(&repo, &declared, MEDIA_OCI_MANIFEST, &manifest)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::DigestMismatch { what: "manifest to push", actual, .. }
                if actual == manifest_digest),
            "{}",
            chain(&err)
        );
    }

    // --- against scripted servers: answers a real registry does not give on demand ---------

    /// A scripted upload service. Repository `team/<mode>`: `POST` opens `/upload/<mode>/1`
    /// (no `Location` when mode is `nolocation`); each `PATCH /upload/<mode>/<n>` answers the
    /// next session URL, absolute after odd `n` and relative after even ones, and the `Range`
    /// it holds (a wrong one when mode is `badrange`); `PUT` commits, echoing the digest (a
    /// wrong one when mode is `liar`, for blobs and manifests).
    fn upload_stub() -> StubServer {
        let own_addr: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
        let addr_cell = Arc::clone(&own_addr);
        let stub = StubServer::start(move |req: &StubRequest| {
            let addr = addr_cell.get().cloned().unwrap_or_default();
            let segments: Vec<&str> = req.path().split('/').collect();
            let area = segments.get(1).copied().unwrap_or_default();
            let mode = match area {
                "v2" => segments.get(3).copied().unwrap_or_default(),
                _ => segments.get(2).copied().unwrap_or_default(),
            };
            let wrong = format!("sha256:{}", "0".repeat(64));
            match (req.method.as_str(), area) {
                ("HEAD", "v2") => StubResponse::new(404),
                ("POST", "v2") if mode == "nolocation" => StubResponse::new(202),
                ("POST", "v2") => StubResponse::new(202)
                    .header("Location", &format!("/upload/{mode}/1?_state=s1")),
                ("PATCH", "upload") => {
                    let n: u32 = segments.get(3).and_then(|n| n.parse().ok()).unwrap_or(0);
                    let end = req
                        .header("content-range")
                        .and_then(|r| r.split_once('-'))
                        .map(|(_, end)| end.to_string())
                        .unwrap_or_default();
                    let held = if mode == "badrange" {
                        "0-3".to_string()
                    } else {
                        format!("0-{end}")
                    };
                    let next = n + 1;
                    let location = if n % 2 == 1 {
                        format!("http://{addr}/upload/{mode}/{next}?_state=s{next}")
                    } else {
                        format!("/upload/{mode}/{next}?_state=s{next}")
                    };
                    StubResponse::new(202)
                        .header("Location", &location)
                        .header("Range", &held)
                }
                ("PUT", "upload") => {
                    let digest = req.query("digest").first().cloned().unwrap_or_default();
                    let echo = if mode == "liar" { wrong } else { digest };
                    StubResponse::new(201).header("Docker-Content-Digest", &echo)
                }
                ("PUT", "v2") => {
                    let echo = if mode == "liar" {
                        wrong
                    } else {
                        sha256_digest(&req.body)
                    };
                    StubResponse::new(201).header("Docker-Content-Digest", &echo)
                }
                ("DELETE", "upload") => StubResponse::new(204),
                _ => StubResponse::new(404),
            }
        });
        own_addr.set(stub.addr()).unwrap();
        stub
    }

    /// The client's side of a chunked upload, checked against a scripted server (not a real
    /// registry): each chunk's `Content-Range`, `Content-Type` and bytes, session URLs
    /// followed whether relative or absolute (their query kept), and the commit's `digest`.
    #[tokio::test]
    async fn chunked_upload_follows_relative_and_absolute_locations() {
        let stub = upload_stub();
        let client = anonymous().with_chunk_size(10);
        let data = b"0123456789abcdefghijklmno".to_vec();
        let digest = sha256_digest(&data);
        let outcome = client
            .push_blob(
                &image(&stub.addr(), "team/app:1"),
                &digest,
                data.len() as u64,
                BlobSource::Bytes(Bytes::from(data.clone())),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(
            outcome,
            PushOutcome::Uploaded {
                bytes: 25,
                chunks: 3
            }
        );
        let requests = stub.requests();
        let summary: Vec<(String, String)> = requests
            .iter()
            .map(|r| (r.method.clone(), r.path().to_string()))
            .collect();
        let expect = |m: &str, p: &str| (m.to_string(), p.to_string());
        assert_eq!(
            summary,
            [
                expect("HEAD", &format!("/v2/team/app/blobs/{digest}")),
                expect("POST", "/v2/team/app/blobs/uploads/"),
                expect("PATCH", "/upload/app/1"),
                expect("PATCH", "/upload/app/2"),
                expect("PATCH", "/upload/app/3"),
                expect("PUT", "/upload/app/4"),
            ]
        );
        for (i, (range, body)) in [
            ("0-9", &data[..10]),
            ("10-19", &data[10..20]),
            ("20-24", &data[20..]),
        ]
        .into_iter()
        .enumerate()
        {
            let patch = &requests[2 + i];
            assert_eq!(patch.header("content-range"), Some(range));
            assert_eq!(patch.header("content-type"), Some(OCTET_STREAM));
            assert_eq!(patch.body, body);
            assert_eq!(patch.query("_state"), [format!("s{}", i + 1)]);
        }
        let put = &requests[5];
        assert_eq!(put.query("digest"), std::slice::from_ref(&digest));
        assert_eq!(put.query("_state"), ["s4"]);
        assert!(put.body.is_empty());

        let manifest = br#"{"schemaVersion":2}"#;
        let pushed = client
            .push_manifest(
                &image(&stub.addr(), "team/app:1"),
                "1",
                MEDIA_OCI_MANIFEST,
                manifest,
            )
            .await
            .unwrap();
        assert_eq!(pushed, sha256_digest(manifest));
        let last = stub.requests().pop().unwrap();
        assert_eq!(last.path(), "/v2/team/app/manifests/1");
        assert_eq!(last.header("content-type"), Some(MEDIA_OCI_MANIFEST));
        assert_eq!(last.body, manifest);
    }

    /// Malformed answers are errors naming the digest, never panics: an upload session
    /// without a `Location`, a `Range` that disagrees with what was sent (the session is then
    /// cancelled), and a blob or manifest digest echo other than the content's.
    #[tokio::test]
    async fn malformed_registry_answers_are_errors() {
        let stub = upload_stub();
        let client = anonymous().with_chunk_size(10);
        let data = b"0123456789abcdefghijklmno".to_vec();
        let digest = sha256_digest(&data);
        let push = |repo: &'static str| {
            let client = client.clone();
            let data = data.clone();
            let digest = digest.clone();
            let target = image(&stub.addr(), &format!("team/{repo}:1"));
            async move {
                client
                    .push_blob(
                        &target,
                        &digest,
                        data.len() as u64,
                        BlobSource::Bytes(Bytes::from(data)),
                        None,
                    )
                    .await
                    .unwrap_err()
            }
        };

        let err = push("nolocation").await;
        assert!(
            matches!(&err, RegistryError::InvalidResponse { what: "blob upload", reference, .. }
                if *reference == digest),
            "{}",
            chain(&err)
        );
        assert!(
            err.to_string()
                .ends_with("the registry's answer is invalid: HTTP 202 without a Location header"),
            "{err}"
        );

        let err = push("badrange").await;
        assert!(
            matches!(&err, RegistryError::InvalidResponse { .. })
                && err.to_string().contains(&digest)
                && err
                    .to_string()
                    .contains("after bytes 0-9 it reports holding Range \"0-3\""),
            "{}",
            chain(&err)
        );
        assert!(
            stub.requests()
                .iter()
                .any(|r| r.method == "DELETE" && r.path() == "/upload/badrange/1"),
            "the session was not cancelled"
        );

        let err = push("liar").await;
        assert!(
            err.to_string().ends_with(&format!(
                "blob upload {digest}: the registry's answer is invalid: it reports having \
                 stored sha256:{}",
                "0".repeat(64)
            )),
            "{}",
            chain(&err)
        );

        let manifest = br#"{"schemaVersion":2}"#;
        let err = client
            .push_manifest(
                &image(&stub.addr(), "team/liar:1"),
                "1",
                MEDIA_OCI_MANIFEST,
                manifest,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                RegistryError::InvalidResponse {
                    what: "manifest push",
                    ..
                }
            ) && err.to_string().contains(&sha256_digest(manifest)),
            "{}",
            chain(&err)
        );
    }

    /// Credentials go only to the registry's own origin: an upload session `Location` on
    /// another server gets the chunks and the commit without an `Authorization` header.
    /// (Scripted servers: the first asks for basic auth and hands out a session on the second.)
    #[tokio::test]
    async fn no_credentials_to_an_upload_session_on_another_origin() {
        let elsewhere = StubServer::start(|req: &StubRequest| match req.method.as_str() {
            "PATCH" => StubResponse::new(202).header("Location", "/session/2"),
            "PUT" => StubResponse::new(201),
            _ => StubResponse::new(404),
        });
        let elsewhere_addr = elsewhere.addr();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p")
        );
        let registry = StubServer::start(move |req: &StubRequest| {
            if req.header("authorization") != Some(expected.as_str()) {
                return StubResponse::new(401).header("WWW-Authenticate", "Basic realm=\"stub\"");
            }
            match req.method.as_str() {
                "HEAD" => StubResponse::new(404),
                "POST" => StubResponse::new(202)
                    .header("Location", &format!("http://{elsewhere_addr}/session/1")),
                _ => StubResponse::new(404),
            }
        });
        let mut credentials = Credentials::none();
        credentials.insert(&registry.addr(), "u", "p");
        let client = RegistryClient::with_credentials(credentials).unwrap();
        let data = b"blob bytes".to_vec();
        let digest = sha256_digest(&data);
        let outcome = client
            .push_blob(
                &image(&registry.addr(), "team/app:1"),
                &digest,
                data.len() as u64,
                BlobSource::Bytes(Bytes::from(data)),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert!(matches!(outcome, PushOutcome::Uploaded { chunks: 1, .. }));
        let away = elsewhere.requests();
        assert_eq!(away.len(), 2, "{away:#?}");
        assert!(
            away.iter().all(|r| r.header("authorization").is_none()),
            "{away:#?}"
        );
        assert_eq!(away[1].path(), "/session/2");
        assert_eq!(away[1].query("digest"), [digest]);
    }

    /// `push_image` can run in a spawned task, and refuses parts whose digests do not match
    /// their bytes before sending anything.
    #[tokio::test]
    async fn push_image_is_send_and_checks_its_parts_first() {
        let stub = upload_stub();
        let store_dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(store_dir.path()).unwrap();
        let declared = sha256_digest(b"x");
        let parts = PushParts {
            layers: vec![BlobMeta {
                version: RECORD_VERSION,
                blake3: blake3::hash(b"layer").to_hex().to_string(),
                digest: sha256_digest(b"layer"),
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                size: 5,
                diff_id: None,
            }],
            blobs: vec![(declared.clone(), b"not x".to_vec())],
            manifests: Vec::new(),
            root: (MEDIA_OCI_MANIFEST.into(), b"{}".to_vec()),
            mount_from: None,
        };
        let target = image(&stub.addr(), "team/app:1");
        let err = tokio::spawn(async move {
            anonymous()
                .push_image(&target, &store, &parts)
                .await
                .unwrap_err()
        })
        .await
        .unwrap();
        assert!(
            matches!(&err, RegistryError::DigestMismatch { what: "blob to push", reference, .. }
                if *reference == declared),
            "{}",
            chain(&err)
        );
        assert!(stub.requests().is_empty(), "{:#?}", stub.requests());
    }
}
