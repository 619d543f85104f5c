//! The content-addressed blob store shared by every worker: layer and config blobs keyed by
//! the blake3 hash of their bytes, on any `object_store` backend (a local directory by default,
//! S3 in a cluster).
//!
//! Layout:
//! - `blobs/b3/<hex>`: the bytes; verified against the key whenever they are read;
//! - `meta/b3/<hex>`: [`BlobMeta`] as JSON: the blob's sha256 digest, media type, size and, for
//!   layers, the diff-id;
//! - `index/sha256/<hex>`: the blake3 key of the blob with that sha256 digest (OCI speaks sha256);
//! - `cache/<key>`: [`CacheEntry`] as JSON: what a build step produced, by its cache key;
//! - `memo/<key>`: a value computed from immutable inputs, as JSON;
//! - `ctx/<hex>`: a build-context manifest (JSON) by the blake3 of its bytes; the files it lists
//!   are blobs without metadata.
//!
//! Every JSON record carries a `version`; readers refuse versions they do not know.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Version of the records this code writes.
pub const RECORD_VERSION: u32 = 1;

/// What the store knows about a blob.
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
pub struct BlobMeta {
    pub version: u32,
    /// Hex blake3 of the bytes: the key.
    pub blake3: String,
    /// `sha256:<hex>` of the bytes: the OCI digest.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed tar, for layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
}

/// What a cached build step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub version: u32,
    /// The layer the step added, or `None` when it changed nothing.
    pub layer: Option<BlobMeta>,
}

/// A memoised value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Memo {
    version: u32,
    value: String,
}

/// Store failures, each naming the object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store {op} {path}: {source}")]
    Backend {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {key} is corrupt in the store: its bytes hash to {actual}")]
    Corrupt { key: String, actual: String },
    #[error("record {path} is unreadable: {reason}")]
    BadRecord { path: String, reason: String },
    #[error("not in the store: {0}")]
    NotFound(String),
}

/// The blob store.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStore({})", self.inner)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn backend(op: &'static str, path: &StorePath, source: object_store::Error) -> StoreError {
    StoreError::Backend {
        op,
        path: path.to_string(),
        source,
    }
}

fn blob_path(b3: &str) -> StorePath {
    StorePath::from(format!("blobs/b3/{b3}"))
}

fn meta_path(b3: &str) -> StorePath {
    StorePath::from(format!("meta/b3/{b3}"))
}

fn index_path(digest: &str) -> StorePath {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    StorePath::from(format!("index/sha256/{hex}"))
}

fn memo_path(key: &str) -> StorePath {
    StorePath::from(format!("memo/{key}"))
}

fn cache_path(key: &str) -> StorePath {
    StorePath::from(format!("cache/{key}"))
}

impl BlobStore {
    /// A store in a local directory (created if missing).
    pub fn local(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|e| io_err(root, e))?;
        let fs = LocalFileSystem::new_with_prefix(root).map_err(|e| StoreError::Backend {
            op: "open",
            path: root.display().to_string(),
            source: e,
        })?;
        Ok(BlobStore {
            inner: Arc::new(fs),
        })
    }

    /// A store over any backend.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        BlobStore { inner }
    }

    /// Whether the blob with this blake3 key is stored.
    pub async fn has(&self, b3: &str) -> Result<bool, StoreError> {
        let p = meta_path(b3);
        match self.inner.head(&p).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(backend("head", &p, e)),
        }
    }

    /// The metadata of a blob, if stored.
    pub async fn meta(&self, b3: &str) -> Result<Option<BlobMeta>, StoreError> {
        self.get_record(&meta_path(b3)).await
    }

    /// The blob with this sha256 digest, if stored.
    pub async fn by_digest(&self, digest: &str) -> Result<Option<BlobMeta>, StoreError> {
        let p = index_path(digest);
        let b3 = match self.inner.get(&p).await {
            Ok(r) => r.bytes().await.map_err(|e| backend("get", &p, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(backend("get", &p, e)),
        };
        let b3 = String::from_utf8_lossy(&b3).trim().to_string();
        self.meta(&b3).await
    }

    /// Stores a file's bytes under `meta.blake3` (the caller computed the hashes while writing
    /// the file; they are checked again here as the bytes stream in). Storing a blob that is
    /// already there does nothing.
    pub async fn put_file(&self, file: &Path, meta: &BlobMeta) -> Result<(), StoreError> {
        if self.has(&meta.blake3).await? {
            return Ok(());
        }
        self.put_content(file, &meta.blake3).await?;
        self.put_meta(meta).await
    }

    pub async fn put_bytes(&self, bytes: &[u8], media_type: &str) -> Result<BlobMeta, StoreError> {
        let meta = BlobMeta {
            version: RECORD_VERSION,
            blake3: blake3::hash(bytes).to_hex().to_string(),
            digest: crate::oci::sha256_digest(bytes),
            media_type: media_type.to_string(),
            size: bytes.len() as u64,
            diff_id: None,
        };
        if !self.has(&meta.blake3).await? {
            let p = blob_path(&meta.blake3);
            self.inner
                .put(&p, PutPayload::from(Bytes::copy_from_slice(bytes)))
                .await
                .map_err(|e| backend("put", &p, e))?;
            self.put_meta(&meta).await?;
        }
        Ok(meta)
    }

    async fn put_meta(&self, meta: &BlobMeta) -> Result<(), StoreError> {
        self.put_record(&meta_path(&meta.blake3), meta).await?;
        let ip = index_path(&meta.digest);
        self.inner
            .put(&ip, PutPayload::from(Bytes::from(meta.blake3.clone())))
            .await
            .map_err(|e| backend("put", &ip, e))?;
        Ok(())
    }

    /// The bytes of a small blob, verified.
    pub async fn get_bytes(&self, b3: &str) -> Result<Bytes, StoreError> {
        self.get_verified(&blob_path(b3), b3, "blob").await
    }

    /// The object at `p`, whose blake3 must be `b3`; `what` names it when it is missing.
    async fn get_verified(&self, p: &StorePath, b3: &str, what: &str) -> Result<Bytes, StoreError> {
        let bytes = match self.inner.get(p).await {
            Ok(r) => r.bytes().await.map_err(|e| backend("get", p, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(format!("{what} {b3}")));
            }
            Err(e) => return Err(backend("get", p, e)),
        };
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != b3 {
            return Err(StoreError::Corrupt {
                key: b3.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Streams a blob into a file, verifying its hash; on a mismatch the file is removed.
    pub async fn get_to_file(&self, b3: &str, dest: &Path) -> Result<u64, StoreError> {
        let p = blob_path(b3);
        let result = match self.inner.get(&p).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(format!("blob {b3}")));
            }
            Err(e) => return Err(backend("get", &p, e)),
        };
        let tmp = dest.with_extension("partial");
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err(&tmp, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(backend("get", &p, e));
                }
            };
            hasher.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(|e| io_err(&tmp, e))?;
        }
        out.flush().await.map_err(|e| io_err(&tmp, e))?;
        drop(out);
        let actual = hasher.finalize().to_hex().to_string();
        if actual != b3 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StoreError::Corrupt {
                key: b3.to_string(),
                actual,
            });
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| io_err(dest, e))?;
        Ok(size)
    }

    /// The result of a build step, by cache key.
    pub async fn cache_get(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let entry: Option<CacheEntry> = self.get_record(&cache_path(key)).await?;
        // An entry whose layer has gone missing is a miss.
        if let Some(CacheEntry {
            layer: Some(layer), ..
        }) = &entry
            && !self.has(&layer.blake3).await?
        {
            return Ok(None);
        }
        Ok(entry)
    }

    /// Records the result of a build step.
    pub async fn cache_put(&self, key: &str, entry: &CacheEntry) -> Result<(), StoreError> {
        self.put_record(&cache_path(key), entry).await
    }

    /// Whether the store holds bytes under this key (with or without [`BlobMeta`]).
    pub async fn has_content(&self, b3: &str) -> Result<bool, StoreError> {
        let p = blob_path(b3);
        match self.inner.head(&p).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(backend("head", &p, e)),
        }
    }

    /// Stores a file's bytes under their blake3 key without OCI metadata (build-context files);
    /// the key is checked against the bytes as they are written.
    pub async fn put_content(&self, file: &Path, b3: &str) -> Result<(), StoreError> {
        let p = blob_path(b3);
        let upload = self
            .inner
            .put_multipart(&p)
            .await
            .map_err(|e| backend("put", &p, e))?;
        let mut writer = WriteMultipart::new(upload);
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| io_err(file, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await.map_err(|e| io_err(file, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.write(&buf[..n]);
        }
        let actual = hasher.finalize().to_hex().to_string();
        if actual != b3 {
            writer.abort().await.map_err(|e| backend("abort", &p, e))?;
            return Err(StoreError::Corrupt {
                key: b3.to_string(),
                actual,
            });
        }
        writer.finish().await.map_err(|e| backend("put", &p, e))?;
        Ok(())
    }

    /// Stores a build-context manifest at `ctx/<blake3>`; returns the key.
    pub async fn put_context_manifest(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let b3 = blake3::hash(bytes).to_hex().to_string();
        let p = StorePath::from(format!("ctx/{b3}"));
        self.inner
            .put(&p, PutPayload::from(Bytes::copy_from_slice(bytes)))
            .await
            .map_err(|e| backend("put", &p, e))?;
        Ok(b3)
    }

    /// A build-context manifest, verified against its key.
    pub async fn get_context_manifest(&self, b3: &str) -> Result<Bytes, StoreError> {
        let p = StorePath::from(format!("ctx/{b3}"));
        self.get_verified(&p, b3, "context manifest").await
    }

    /// A remembered value computed from immutable inputs (`memo/<key>`), such as the content
    /// digest of files taken from a stage whose cache key is part of `key`.
    pub async fn memo_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let memo: Option<Memo> = self.get_record(&memo_path(key)).await?;
        Ok(memo.map(|m| m.value))
    }

    pub async fn memo_put(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let memo = Memo {
            version: RECORD_VERSION,
            value: value.to_string(),
        };
        self.put_record(&memo_path(key), &memo).await
    }

    async fn put_record<T: Serialize>(&self, p: &StorePath, record: &T) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::BadRecord {
            path: p.to_string(),
            reason: e.to_string(),
        })?;
        self.inner
            .put(p, PutPayload::from(Bytes::from(json)))
            .await
            .map_err(|e| backend("put", p, e))?;
        Ok(())
    }

    async fn get_record<T: for<'de> Deserialize<'de>>(
        &self,
        p: &StorePath,
    ) -> Result<Option<T>, StoreError> {
        let bytes = match self.inner.get(p).await {
            Ok(r) => r.bytes().await.map_err(|e| backend("get", p, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(backend("get", p, e)),
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::BadRecord {
                path: p.to_string(),
                reason: e.to_string(),
            })?;
        let version = value.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(RECORD_VERSION)) {
            return Err(StoreError::BadRecord {
                path: p.to_string(),
                reason: format!(
                    "unknown record version {version:?} (this build reads {RECORD_VERSION})"
                ),
            });
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| StoreError::BadRecord {
                path: p.to_string(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(bytes: &[u8]) -> BlobMeta {
        BlobMeta {
            version: RECORD_VERSION,
            blake3: blake3::hash(bytes).to_hex().to_string(),
            digest: crate::oci::sha256_digest(bytes),
            media_type: "application/octet-stream".into(),
            size: bytes.len() as u64,
            diff_id: None,
        }
    }

    #[tokio::test]
    async fn file_round_trip_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(&dir.path().join("store")).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let src = dir.path().join("blob");
        std::fs::write(&src, &data).unwrap();
        let meta = meta_of(&data);
        store.put_file(&src, &meta).await.unwrap();
        assert!(store.has(&meta.blake3).await.unwrap());
        assert_eq!(
            store.by_digest(&meta.digest).await.unwrap(),
            Some(meta.clone())
        );
        let out = dir.path().join("out");
        assert_eq!(
            store.get_to_file(&meta.blake3, &out).await.unwrap(),
            data.len() as u64
        );
        assert_eq!(std::fs::read(&out).unwrap(), data);
        // Storing again is a no-op.
        store.put_file(&src, &meta).await.unwrap();
    }

    #[tokio::test]
    async fn wrong_hash_is_refused_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = BlobStore::local(&root).unwrap();
        let src = dir.path().join("blob");
        std::fs::write(&src, b"hello").unwrap();
        let mut meta = meta_of(b"hello");
        meta.blake3 = blake3::hash(b"other").to_hex().to_string();
        assert!(matches!(
            store.put_file(&src, &meta).await,
            Err(StoreError::Corrupt { .. })
        ));
        assert!(!store.has(&meta.blake3).await.unwrap());

        let meta = store
            .put_bytes(b"config", "application/json")
            .await
            .unwrap();
        std::fs::write(root.join("blobs/b3").join(&meta.blake3), b"tampered").unwrap();
        assert!(matches!(
            store.get_bytes(&meta.blake3).await,
            Err(StoreError::Corrupt { .. })
        ));
        let out = dir.path().join("out");
        assert!(store.get_to_file(&meta.blake3, &out).await.is_err());
        assert!(!out.exists());
    }

    #[tokio::test]
    async fn cache_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        assert_eq!(store.cache_get("k").await.unwrap(), None);
        let layer = store.put_bytes(b"layer", "x").await.unwrap();
        let e = CacheEntry {
            version: RECORD_VERSION,
            layer: Some(layer),
        };
        store.cache_put("k", &e).await.unwrap();
        assert_eq!(store.cache_get("k").await.unwrap(), Some(e));
        std::fs::write(dir.path().join("cache/v"), br#"{"version": 99}"#).unwrap();
        assert!(matches!(
            store.cache_get("v").await,
            Err(StoreError::BadRecord { .. })
        ));
    }
}
