//! Build contexts in the blob store, for builds that run on other machines: the client
//! uploads the files `.dockerignore` lets through (only the blobs the store lacks) and a
//! manifest of the tree; a worker materialises the tree from the manifest once and reuses it.
//!
//! The manifest keeps what COPY and ADD read: paths, file types, modes, owners, modification
//! times, symlink targets, and each file's content key (blake3). Extended attributes are not
//! carried. `.dockerignore` itself is always kept, so that the worker applies the same rules.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_shared::store::{BlobStore, StoreError};

use crate::copy::DockerIgnore;
use crate::hashcache::HashCache;

const MANIFEST_VERSION: u32 = 1;

/// A build context as a tree of entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextManifest {
    pub version: u32,
    /// Sorted by path; parents before children.
    pub entries: Vec<ContextEntry>,
}

/// One file, directory or symlink of a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextEntry {
    /// Relative to the context root, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: i64,
    #[serde(default)]
    pub size: u64,
    /// blake3 of a file's bytes (the store key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// The longest path a manifest entry may have.
const MAX_PATH: usize = 4096;

impl ContextManifest {
    /// Reads a manifest as stored, trusting nothing in it: the version is this code's; every
    /// path is relative and made of plain names; each path appears once; an entry's parent,
    /// when it has one, is a directory listed before it (so nothing is ever written through a
    /// symlink or below a file); files name a blake3 key, symlinks a target; modes and times
    /// are in range.
    pub fn decode(bytes: &[u8]) -> Result<ContextManifest, String> {
        let manifest: ContextManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if manifest.version != MANIFEST_VERSION {
            return Err(format!("unknown version {}", manifest.version));
        }
        let mut seen: std::collections::HashMap<&str, EntryKind> = Default::default();
        for e in &manifest.entries {
            let bad = |why: &str| Err(format!("entry {:?}: {why}", e.path));
            if e.path.is_empty() || e.path.len() > MAX_PATH || e.path.contains('\0') {
                return bad("not a path");
            }
            if e.path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            {
                return bad("the path leaves the context or is not plain");
            }
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                match seen.get(parent) {
                    Some(EntryKind::Dir) => {}
                    Some(_) => return bad("its parent is not a directory"),
                    None => return bad("its parent is not listed before it"),
                }
            }
            if seen.insert(&e.path, e.kind).is_some() {
                return bad("listed twice");
            }
            if e.mode > 0o7777 || !(0..1_000_000_000).contains(&e.mtime_nsec) {
                return bad("mode or time out of range");
            }
            let key_ok =
                |k: &Option<String>| k.as_deref().is_some_and(strata_shared::job::is_blake3_hex);
            match e.kind {
                EntryKind::File if !key_ok(&e.blake3) => {
                    return bad("a file without a content key");
                }
                EntryKind::Symlink
                    if e.target
                        .as_deref()
                        .is_none_or(|t| t.is_empty() || t.contains('\0')) =>
                {
                    return bad("a symlink without a target");
                }
                _ => {}
            }
        }
        Ok(manifest)
    }
}

/// What an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// The manifest's key: what a build request names.
    pub id: String,
    pub files: usize,
    /// Files whose bytes the store did not have.
    pub uploaded: usize,
    pub bytes_uploaded: u64,
}

/// Context failures, naming the path or key.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("context manifest {id}: {reason}")]
    BadManifest { id: String, reason: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ContextError + 'a {
    move |source| ContextError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Walks a context directory, skipping what `.dockerignore` excludes (sockets, fifos and
/// devices are skipped too), hashing files with the cache.
pub fn scan(
    root: &Path,
    ignore: Option<&DockerIgnore>,
    hashes: &HashCache,
) -> Result<ContextManifest, ContextError> {
    let mut entries = Vec::new();
    walk(root, "", ignore, hashes, &mut entries)?;
    Ok(ContextManifest {
        version: MANIFEST_VERSION,
        entries,
    })
}

fn walk(
    dir: &Path,
    rel: &str,
    ignore: Option<&DockerIgnore>,
    hashes: &HashCache,
    out: &mut Vec<ContextEntry>,
) -> Result<(), ContextError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io("read directory", dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io("read directory", dir))?;
    names.sort();
    for name in names {
        let Some(name) = name.to_str().map(str::to_string) else {
            return Err(ContextError::Io {
                op: "read",
                path: dir.join(&name),
                source: std::io::Error::other("file name is not UTF-8"),
            });
        };
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let abs = dir.join(&name);
        let keep_always = path == ".dockerignore";
        if !keep_always && ignore.is_some_and(|i| i.is_excluded(&path)) {
            // An excluded directory may still hold re-included files (`!` patterns).
            let meta = fs::symlink_metadata(&abs).map_err(io("stat", &abs))?;
            if !(meta.is_dir() && ignore.is_some_and(DockerIgnore::has_exceptions)) {
                continue;
            }
        }
        let meta = fs::symlink_metadata(&abs).map_err(io("stat", &abs))?;
        let ft = meta.file_type();
        let mut entry = ContextEntry {
            path: path.clone(),
            kind: EntryKind::Dir,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: 0,
            blake3: None,
            target: None,
        };
        if ft.is_dir() {
            out.push(entry);
            walk(&abs, &path, ignore, hashes, out)?;
        } else if ft.is_file() {
            let hash = match hashes.get(&meta) {
                Some(h) => h,
                None => {
                    let mut f = fs::File::open(&abs).map_err(io("open", &abs))?;
                    let mut h = blake3::Hasher::new();
                    std::io::copy(&mut f, &mut h).map_err(io("read", &abs))?;
                    let h = h.finalize();
                    hashes.put(&meta, h);
                    h
                }
            };
            entry.kind = EntryKind::File;
            entry.size = meta.len();
            entry.blake3 = Some(hash.to_hex().to_string());
            out.push(entry);
        } else if ft.is_symlink() {
            let target = fs::read_link(&abs).map_err(io("read link", &abs))?;
            entry.kind = EntryKind::Symlink;
            entry.target = Some(target.to_string_lossy().into_owned());
            out.push(entry);
        }
    }
    Ok(())
}

/// Uploads a context: every file the store lacks, then the manifest.
pub async fn upload(
    store: &BlobStore,
    root: &Path,
    ignore: Option<DockerIgnore>,
    hashes: std::sync::Arc<HashCache>,
) -> Result<Uploaded, ContextError> {
    let scan_root = root.to_path_buf();
    let h = hashes.clone();
    let manifest = tokio::task::spawn_blocking(move || scan(&scan_root, ignore.as_ref(), &h))
        .await
        .map_err(|e| ContextError::Io {
            op: "scan",
            path: root.to_path_buf(),
            source: std::io::Error::other(e),
        })??;
    let _ = tokio::task::spawn_blocking(move || hashes.save()).await;
    let mut seen = BTreeSet::new();
    let (mut uploaded, mut bytes_uploaded, mut files) = (0, 0, 0);
    for e in &manifest.entries {
        let Some(b3) = &e.blake3 else { continue };
        files += 1;
        if !seen.insert(b3.clone()) || store.has_content(b3).await? {
            continue;
        }
        store.put_content(&root.join(&e.path), b3).await?;
        uploaded += 1;
        bytes_uploaded += e.size;
    }
    let bytes = serde_json::to_vec(&manifest).map_err(|e| ContextError::BadManifest {
        id: String::new(),
        reason: e.to_string(),
    })?;
    let id = store.put_context_manifest(&bytes).await?;
    Ok(Uploaded {
        id,
        files,
        uploaded,
        bytes_uploaded,
    })
}

/// The context `id` as a directory under `cache_dir` (made once, then reused).
pub async fn materialize(
    store: &BlobStore,
    id: &str,
    cache_dir: &Path,
) -> Result<PathBuf, ContextError> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ContextError::BadManifest {
            id: id.to_string(),
            reason: "not a blake3 key".into(),
        });
    }
    let dest = cache_dir.join(id);
    if dest.is_dir() {
        return Ok(dest);
    }
    let bytes = store.get_context_manifest(id).await?;
    let manifest = ContextManifest::decode(&bytes).map_err(|reason| ContextError::BadManifest {
        id: id.to_string(),
        reason,
    })?;
    fs::create_dir_all(cache_dir).map_err(io("create directory", cache_dir))?;
    let tmp = cache_dir.join(format!(".tmp-{id}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io("create directory", &tmp))?;
    let result = fill(store, id, &manifest, &tmp).await;
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        Err(_) if dest.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => Err(io("rename", &dest)(e)),
    }
}

async fn fill(
    store: &BlobStore,
    id: &str,
    manifest: &ContextManifest,
    root: &Path,
) -> Result<(), ContextError> {
    // `manifest` was decoded: every path is plain and below a directory listed before it.
    for e in &manifest.entries {
        let path = root.join(&e.path);
        match e.kind {
            EntryKind::Dir => fs::create_dir(&path).map_err(io("create directory", &path))?,
            EntryKind::File => {
                let b3 = e
                    .blake3
                    .as_deref()
                    .ok_or_else(|| ContextError::BadManifest {
                        id: id.to_string(),
                        reason: format!("file {:?} has no content key", e.path),
                    })?;
                store.get_to_file(b3, &path).await?;
            }
            EntryKind::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(target, &path).map_err(io("create symlink", &path))?;
            }
        }
        let _ = std::os::unix::fs::lchown(&path, Some(e.uid), Some(e.gid));
        if e.kind != EntryKind::Symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(e.mode))
                .map_err(io("chmod", &path))?;
        }
    }
    // Times last, deepest first, so that creating children does not change them.
    for e in manifest.entries.iter().rev() {
        let path = root.join(&e.path);
        let t =
            filetime::FileTime::from_unix_time(e.mtime, u32::try_from(e.mtime_nsec).unwrap_or(0));
        filetime::set_symlink_file_times(&path, t, t).map_err(io("set times of", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{CopySpec, source_digest};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_context_round_trips_through_the_store_and_digests_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path().join("ctx");
        fs::create_dir_all(ctx.join("src/deep")).unwrap();
        fs::write(ctx.join("src/main.c"), b"int main() {}\n").unwrap();
        fs::write(ctx.join("src/deep/same.c"), b"int main() {}\n").unwrap();
        fs::write(ctx.join("run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(ctx.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("src/main.c", ctx.join("link")).unwrap();
        fs::write(ctx.join("secret.env"), b"TOKEN=1\n").unwrap();
        fs::write(ctx.join(".dockerignore"), b"*.env\n").unwrap();
        let store = BlobStore::local(&tmp.path().join("store")).unwrap();
        let ignore = DockerIgnore::parse("*.env\n").unwrap();
        let hashes = Arc::new(HashCache::in_memory());

        let up = upload(&store, &ctx, Some(ignore.clone()), hashes.clone())
            .await
            .unwrap();
        assert_eq!(up.files, 4, "secret.env is ignored, .dockerignore kept");
        assert_eq!(up.uploaded, 3, "two files with the same bytes are one blob");
        let again = upload(&store, &ctx, Some(ignore.clone()), hashes)
            .await
            .unwrap();
        assert_eq!((again.id.clone(), again.uploaded), (up.id.clone(), 0));

        let local = materialize(&store, &up.id, &tmp.path().join("cache"))
            .await
            .unwrap();
        assert!(!local.join("secret.env").exists());
        assert_eq!(
            fs::read_link(local.join("link")).unwrap(),
            PathBuf::from("src/main.c")
        );
        assert_eq!(
            fs::metadata(local.join("run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        // COPY sees the same content either side.
        let spec = CopySpec {
            sources: vec![".".into()],
            dest: "/app/".into(),
            workdir: "/".into(),
            ..Default::default()
        };
        assert_eq!(
            source_digest(&ctx, &spec, Some(&ignore)).unwrap(),
            source_digest(&local, &spec, Some(&ignore)).unwrap()
        );
    }

    /// A manifest from a hostile client: each way of writing outside the context, through a
    /// symlink, or without content is refused before anything is written.
    #[test]
    fn hostile_manifests_are_refused_when_decoded() {
        let entry = |path: &str, kind: &str, extra: &str| {
            format!(
                r#"{{"path":"{path}","kind":"{kind}","mode":420,"uid":0,"gid":0,"mtime":0,"mtime_nsec":0{extra}}}"#
            )
        };
        let key = format!(r#","blake3":"{}""#, "a".repeat(64));
        let manifest =
            |entries: &[String]| format!(r#"{{"version":1,"entries":[{}]}}"#, entries.join(","));
        let ok = manifest(&[
            entry("d", "dir", ""),
            entry("d/f", "file", &key),
            entry("l", "symlink", r#","target":"/etc""#),
        ]);
        assert!(ContextManifest::decode(ok.as_bytes()).is_ok(), "{ok}");
        for (bad, why) in [
            (
                manifest(&[
                    entry("a", "symlink", r#","target":"/some/dir""#),
                    entry("a/x", "file", &key),
                ]),
                "its parent is not a directory",
            ),
            (
                manifest(&[entry("../x", "file", &key)]),
                "leaves the context",
            ),
            (
                manifest(&[entry("/etc/x", "file", &key)]),
                "leaves the context",
            ),
            (
                manifest(&[entry("a/./x", "file", &key)]),
                "leaves the context",
            ),
            (
                manifest(&[entry("x/y", "file", &key)]),
                "not listed before it",
            ),
            (manifest(&[entry("f", "file", "")]), "without a content key"),
            (
                manifest(&[entry("f", "file", r#","blake3":"../../x""#)]),
                "without a content key",
            ),
            (
                manifest(&[entry("f", "file", &key), entry("f", "dir", "")]),
                "listed twice",
            ),
            (manifest(&[entry("s", "symlink", "")]), "without a target"),
            (
                r#"{"version":2,"entries":[]}"#.to_string(),
                "unknown version",
            ),
        ] {
            let err = ContextManifest::decode(bad.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_tampered_manifest_or_blob_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::local(&tmp.path().join("store")).unwrap();
        let evil = ContextManifest {
            version: MANIFEST_VERSION,
            entries: vec![ContextEntry {
                path: "../escape".into(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                size: 0,
                blake3: None,
                target: None,
            }],
        };
        let id = store
            .put_context_manifest(&serde_json::to_vec(&evil).unwrap())
            .await
            .unwrap();
        let err = materialize(&store, &id, &tmp.path().join("cache"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("leaves the context"), "{err}");
        let err = materialize(&store, &"0".repeat(64), &tmp.path().join("cache"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not in the store"), "{err}");
    }
}
