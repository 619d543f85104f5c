//! Root filesystems assembled from layers, and the diff of what a step changed in them.
//!
//! A [`Snapshotter`] owns a directory with two parts: committed layers, each unpacked once under
//! its diff_id, and active snapshots, each a writable rootfs built from a stack of committed
//! layers for one step. Where the kernel lets us mount overlayfs (root, a filesystem that can hold
//! an upper dir), a snapshot is an overlay mount of the layer dirs under a fresh upper dir, and
//! its diff is read straight from that upper dir ([`SnapshotKind::Overlay`]). Elsewhere the
//! layers are applied one after the other into a plain directory, whose metadata is recorded at
//! prepare time, and the diff compares the tree against that record ([`SnapshotKind::Copy`]).
//! Both give the same layer for the same change.
//!
//! Layout under the root:
//! - `layers/<diff_id hex>/`: a layer unpacked as an overlay lower dir (overlay kind);
//! - `layers-copy/<diff_id hex>/layer.tar`: the layer's uncompressed tar, verified (copy kind);
//! - `active/<id>/{l,upper,work,rootfs}`: an overlay snapshot (`l/<n>` are short symlinks to the
//!   lower dirs, top first), or `active/<id>/rootfs` for a copy snapshot.
//!
//! Everything here is blocking; async callers use `spawn_blocking`.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::layer::{
    Compression, LayerBlob, LayerError, Manifest, UnpackMode, decompress_layer, prune_copied_up,
    unique_name, unpack_layer, write_layer_from_manifest, write_layer_from_upper,
};

/// Overlay options that keep every change of a step inside the upper dir, so the upper dir
/// alone is the layer: no renamed-directory redirects, no metadata-only copy-ups, no index.
const OVERLAY_OPTIONS: &str = "redirect_dir=off,index=off,metacopy=off";
/// The kernel copies at most one page of mount data, the terminating NUL included.
const MAX_MOUNT_DATA: usize = 4095;
/// File name of a layer's tar in a copy-kind layer dir.
const LAYER_TAR: &str = "layer.tar";

/// How snapshots are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// overlayfs: layers are lower dirs, changes land in an upper dir.
    Overlay,
    /// Plain copies: layers are applied into a directory, changes found by comparison.
    Copy,
}

/// Errors of the snapshotter. Each names the layer, path or mount it is about.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Writing or unpacking a layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A diff_id is not of the form `sha256:<64 lowercase hex digits>`.
    #[error("invalid diff_id {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDiffId(String),
    /// A layer's content does not hash to the diff_id it was given as.
    #[error("layer {}: content has diff_id {actual}, expected {expected}", blob.display())]
    DiffIdMismatch {
        /// The blob (or stored tar) that was read.
        blob: PathBuf,
        /// The diff_id asked for.
        expected: String,
        /// The diff_id of what was read.
        actual: String,
    },
    /// `prepare` was asked for a layer that `ensure_layer` has not unpacked.
    #[error("layer {diff_id} is not unpacked in the snapshot store ({} is missing); call ensure_layer first", path.display())]
    LayerMissing {
        /// The layer's diff_id.
        diff_id: String,
        /// Where it should be.
        path: PathBuf,
    },
    /// Mounting overlayfs failed.
    #[error("mount overlay on {} with {layers} lower dir(s) ({options}): {source}", target.display())]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// Number of lower dirs.
        layers: usize,
        /// The mount data passed to the kernel.
        options: String,
        /// The kernel's error.
        #[source]
        source: Errno,
    },
    /// The overlay mount options do not fit in the page the kernel accepts.
    #[error(
        "overlay mount options for {layers} layers are {len} bytes, over the kernel's limit of {MAX_MOUNT_DATA}"
    )]
    TooManyLayers {
        /// Number of lower dirs.
        layers: usize,
        /// Length of the option string.
        len: usize,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Returns the hex part of a `sha256:<hex>` diff_id.
fn diff_id_hex(diff_id: &str) -> Result<&str, SnapshotError> {
    match diff_id.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(SnapshotError::InvalidDiffId(diff_id.to_string())),
    }
}

/// Where unpacked layers and active snapshots live: root/layers/<diff_id hex>/,
/// root/active/<id>/{upper,work,rootfs}.
///
/// Cheap to clone; clones share the store. Any number of threads and processes may use one
/// store at once: layers are unpacked into temporary dirs and renamed into place, and every
/// snapshot has its own directory.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    root: PathBuf,
    kind: SnapshotKind,
}

impl Snapshotter {
    /// Opens (creates) the store under `root`; detects whether overlay mounts work here by trying
    /// one (root, kernel overlayfs), else falls back to copying. `force` picks a kind (tests use it).
    pub fn open(root: &Path, force: Option<SnapshotKind>) -> Result<Self, SnapshotError> {
        fs::create_dir_all(root).map_err(io_err("create directory", root))?;
        let root = fs::canonicalize(root).map_err(io_err("resolve", root))?;
        for sub in ["layers", "layers-copy", "active"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        let kind = match force {
            Some(kind) => kind,
            None => match probe_overlay(&root) {
                Ok(()) => SnapshotKind::Overlay,
                Err(e) => {
                    tracing::info!(root = %root.display(), error = %e,
                        "overlay mounts do not work here; snapshots will copy layers");
                    SnapshotKind::Copy
                }
            },
        };
        tracing::debug!(root = %root.display(), ?kind, "snapshot store opened");
        Ok(Snapshotter { root, kind })
    }

    /// How this store makes snapshots.
    pub fn kind(&self) -> SnapshotKind {
        self.kind
    }

    /// The store's directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layer_dir(&self, hex: &str) -> PathBuf {
        match self.kind {
            SnapshotKind::Overlay => self.root.join("layers").join(hex),
            SnapshotKind::Copy => self.root.join("layers-copy").join(hex),
        }
    }

    /// Whether the layer with this diff_id is unpacked here already.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        diff_id_hex(diff_id).is_ok_and(|hex| self.layer_dir(hex).is_dir())
    }

    /// Makes sure the layer with this diff_id is unpacked (once; concurrent callers are safe: unpack
    /// to a temp dir then rename) and returns its dir. Verifies the unpacked diff_id equals `diff_id`
    /// (else error naming both digests and removes the partial dir).
    ///
    /// Overlay kind: the dir is the layer unpacked as an overlay lower dir. Copy kind: the dir
    /// holds the layer's verified uncompressed tar (`layer.tar`), applied at each `prepare`.
    pub fn ensure_layer(&self, blob: &Path, diff_id: &str) -> Result<PathBuf, SnapshotError> {
        let hex = diff_id_hex(diff_id)?;
        let final_dir = self.layer_dir(hex);
        if final_dir.is_dir() {
            return Ok(final_dir);
        }
        let parent = final_dir.parent().unwrap_or(&self.root).to_path_buf();
        let tmp = parent.join(unique_name(&format!(".tmp-{hex}-")));
        fs::create_dir(&tmp).map_err(io_err("create directory", &tmp))?;
        let result = match self.kind {
            SnapshotKind::Overlay => unpack_layer(blob, &tmp, UnpackMode::OverlayLower),
            SnapshotKind::Copy => decompress_layer(blob, &tmp.join(LAYER_TAR)),
        };
        let outcome = match result {
            Err(e) => Err(SnapshotError::Layer(e)),
            Ok(actual) if actual != diff_id => Err(SnapshotError::DiffIdMismatch {
                blob: blob.to_path_buf(),
                expected: diff_id.to_string(),
                actual,
            }),
            Ok(_) => match fs::rename(&tmp, &final_dir) {
                Ok(()) => return Ok(final_dir),
                // Another caller finished first: theirs is as good as ours.
                Err(_) if final_dir.is_dir() => Ok(final_dir),
                Err(e) => Err(io_err("rename layer dir to", &final_dir)(e)),
            },
        };
        remove_tree(&tmp);
        outcome
    }

    /// A writable rootfs whose content is the given layers (bottom first, all already ensured).
    ///
    /// Overlay: an overlay mount with the layer dirs as lower dirs (top first), reached through
    /// short symlinks and a directory file descriptor so that hundreds of layers fit in the
    /// one-page mount data. Zero layers (scratch) mount an empty lower dir. Copy: the layers'
    /// tars are applied in order into a directory, then its metadata is recorded for `diff`.
    pub fn prepare(&self, layers: &[String]) -> Result<ActiveSnapshot, SnapshotError> {
        let mut dirs = Vec::with_capacity(layers.len());
        for diff_id in layers {
            let dir = self.layer_dir(diff_id_hex(diff_id)?);
            if !dir.is_dir() {
                return Err(SnapshotError::LayerMissing {
                    diff_id: diff_id.clone(),
                    path: dir,
                });
            }
            dirs.push(dir);
        }
        let dir = self.root.join("active").join(unique_name(""));
        fs::create_dir(&dir).map_err(io_err("create directory", &dir))?;
        let mut snapshot = ActiveSnapshot {
            rootfs: dir.join("rootfs"),
            dir,
            kind: self.kind,
            mounted: false,
            manifest: None,
            lowers: Vec::new(),
            layer_root: self.root.join("layers"),
        };
        fs::create_dir(&snapshot.rootfs).map_err(io_err("create directory", &snapshot.rootfs))?;
        match self.kind {
            SnapshotKind::Overlay => {
                let upper = snapshot.dir.join("upper");
                fs::create_dir(&upper).map_err(io_err("create directory", &upper))?;
                // The overlay root takes its owner and mode from the upper dir.
                fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .map_err(io_err("chmod", &upper))?;
                // A chain may hold one layer several times (two steps that made the same
                // change). overlayfs refuses a lower dir twice (ELOOP); the topmost copy alone
                // gives the same tree, since every path the layer names is decided there.
                let mut seen = std::collections::HashSet::new();
                let mut lowers: Vec<PathBuf> = dirs
                    .iter()
                    .rev()
                    .filter(|d| seen.insert(d.as_path()))
                    .cloned()
                    .collect();
                if lowers.is_empty() {
                    let empty = snapshot.dir.join("empty");
                    fs::create_dir(&empty).map_err(io_err("create directory", &empty))?;
                    lowers.push(empty);
                }
                mount_overlay(&snapshot.dir, &lowers, &snapshot.rootfs)?;
                snapshot.mounted = true;
                snapshot.lowers = lowers;
            }
            SnapshotKind::Copy => {
                for (diff_id, dir) in layers.iter().zip(&dirs) {
                    let tar = dir.join(LAYER_TAR);
                    let actual = unpack_layer(&tar, &snapshot.rootfs, UnpackMode::Apply)?;
                    if &actual != diff_id {
                        return Err(SnapshotError::DiffIdMismatch {
                            blob: tar,
                            expected: diff_id.clone(),
                            actual,
                        });
                    }
                }
                snapshot.manifest = Some(Manifest::of_tree(&snapshot.rootfs)?);
            }
        }
        Ok(snapshot)
    }
}

/// Mounts overlayfs on `target` with `lowers` (top first), `dir/upper` and `dir/work`.
/// The lower dirs are reached through symlinks `dir/l/<n>`, and `dir` through
/// `/proc/self/fd/<fd>`, which keeps each lower dir's option to about 20 bytes whatever the
/// store's path (and keeps `,` and `:` in that path out of the option parser).
fn mount_overlay(dir: &Path, lowers: &[PathBuf], target: &Path) -> Result<(), SnapshotError> {
    let links = dir.join("l");
    fs::create_dir(&links).map_err(io_err("create directory", &links))?;
    for (i, lower) in lowers.iter().enumerate() {
        let link = links.join(i.to_string());
        std::os::unix::fs::symlink(lower, &link).map_err(io_err("create symlink", &link))?;
    }
    let work = dir.join("work");
    fs::create_dir_all(&work).map_err(io_err("create directory", &work))?;
    let dir_fd = File::open(dir).map_err(io_err("open", dir))?;
    let base = format!("/proc/self/fd/{}", dir_fd.as_raw_fd());
    let lowerdir = (0..lowers.len())
        .map(|i| format!("{base}/l/{i}"))
        .collect::<Vec<_>>()
        .join(":");
    let options =
        format!("lowerdir={lowerdir},upperdir={base}/upper,workdir={base}/work,{OVERLAY_OPTIONS}");
    if options.len() > MAX_MOUNT_DATA {
        return Err(SnapshotError::TooManyLayers {
            layers: lowers.len(),
            len: options.len(),
        });
    }
    let result = mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    );
    drop(dir_fd);
    result.map_err(|source| SnapshotError::Mount {
        target: target.to_path_buf(),
        layers: lowers.len(),
        options,
        source,
    })
}

/// Tries one overlay mount in a scratch dir of the store.
fn probe_overlay(root: &Path) -> Result<(), SnapshotError> {
    let dir = root.join("active").join(unique_name("probe-"));
    let result = (|| {
        let lower = dir.join("lower");
        let upper = dir.join("upper");
        let merged = dir.join("merged");
        for d in [&lower, &upper, &merged] {
            fs::create_dir_all(d).map_err(io_err("create directory", d))?;
        }
        mount_overlay(&dir, std::slice::from_ref(&lower), &merged)?;
        if let Err(e) = umount2(&merged, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %merged.display(), error = %e, "could not unmount the overlay probe");
        }
        Ok(())
    })();
    remove_tree(&dir);
    result
}

/// Removes a directory tree, logging (not returning) failures: for cleanup paths.
fn remove_tree(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %dir.display(), error = %e, "could not remove directory");
    }
}

/// A writable rootfs prepared from layers for one step. Dropping it unmounts it and removes its
/// directories.
pub struct ActiveSnapshot {
    dir: PathBuf,
    rootfs: PathBuf,
    kind: SnapshotKind,
    mounted: bool,
    /// The rootfs as prepared (copy kind).
    manifest: Option<Manifest>,
    /// The overlay's lower dirs, top first (overlay kind).
    lowers: Vec<PathBuf>,
    /// Where unpacked layers live (`layers/` of the store).
    layer_root: PathBuf,
}

impl std::fmt::Debug for ActiveSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveSnapshot")
            .field("rootfs", &self.rootfs)
            .field("kind", &self.kind)
            .field("mounted", &self.mounted)
            .field(
                "manifest_entries",
                &self.manifest.as_ref().map(Manifest::len),
            )
            .finish()
    }
}

impl ActiveSnapshot {
    /// The root filesystem to run the step in.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// How this snapshot was made.
    pub fn kind(&self) -> SnapshotKind {
        self.kind
    }

    /// The changes made in rootfs since prepare, as a layer (None if nothing changed). The
    /// snapshot stays usable, and a later call again gives all changes since prepare.
    pub fn diff(
        &self,
        out_dir: &Path,
        compression: Compression,
    ) -> Result<Option<LayerBlob>, SnapshotError> {
        let blob = match (&self.kind, &self.manifest) {
            (SnapshotKind::Copy, Some(manifest)) => {
                write_layer_from_manifest(manifest, &self.rootfs, out_dir, compression)?
            }
            _ => {
                write_layer_from_upper(&self.dir.join("upper"), &self.lowers, out_dir, compression)?
            }
        };
        Ok(blob)
    }
}

impl ActiveSnapshot {
    /// Ends the snapshot, keeping its changes as the unpacked layer `diff_id` (the layer
    /// [`ActiveSnapshot::diff`] just wrote), so that preparing a snapshot on top of it needs
    /// no unpacking. An overlay upper dir already has the form of a lower dir (whiteouts as
    /// 0/0 character devices, opaque directories marked); it only loses the directories overlay
    /// copied up without change. Copy snapshots, or a layer already unpacked, just end.
    pub fn into_layer(mut self, diff_id: &str) -> Result<(), SnapshotError> {
        let hex = diff_id_hex(diff_id)?.to_string();
        let target = self.layer_root.join(&hex);
        if self.kind != SnapshotKind::Overlay || !self.mounted || target.is_dir() {
            return Ok(());
        }
        umount2(&self.rootfs, MntFlags::empty()).map_err(|e| SnapshotError::Io {
            op: "unmount",
            path: self.rootfs.clone(),
            source: io::Error::from(e),
        })?;
        self.mounted = false;
        let upper = self.dir.join("upper");
        prune_copied_up(&upper, &self.lowers)?;
        match fs::rename(&upper, &target) {
            Ok(()) => Ok(()),
            Err(_) if target.is_dir() => Ok(()),
            Err(e) => Err(io_err("rename upper dir to", &target)(e)),
        }
    }
}

impl Drop for ActiveSnapshot {
    fn drop(&mut self) {
        if self.mounted {
            match umount2(&self.rootfs, MntFlags::empty()) {
                Ok(()) => {}
                Err(Errno::EBUSY) => {
                    tracing::warn!(rootfs = %self.rootfs.display(),
                        "snapshot rootfs busy; detaching it lazily");
                    if let Err(e) = umount2(&self.rootfs, MntFlags::MNT_DETACH) {
                        tracing::error!(rootfs = %self.rootfs.display(), error = %e,
                            "could not detach snapshot rootfs; leaving its directory");
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(rootfs = %self.rootfs.display(), error = %e,
                        "could not unmount snapshot rootfs; leaving its directory");
                    return;
                }
            }
        }
        remove_tree(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::tests::{describe, entry_names, set_all_mtimes, write_file};
    use crate::layer::write_layer_from_diff;
    use std::os::unix::fs::PermissionsExt;

    /// Writes the tree under `src` as a layer (as a base image layer would be).
    fn layer_of_tree(src: &Path, out: &Path) -> LayerBlob {
        let empty = out.join("empty-before");
        fs::create_dir_all(&empty).unwrap();
        let blob = write_layer_from_diff(&empty, src, out, Compression::Gzip)
            .unwrap()
            .unwrap();
        fs::remove_dir(&empty).unwrap();
        blob
    }

    fn mounted(path: &Path) -> bool {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let p = path.to_string_lossy();
        info.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
    }

    fn names(root: &Path) -> Vec<String> {
        describe(root)
            .into_keys()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    /// One build step through a snapshot of `kind`: base layer, changes, diff, restack.
    fn step_cycle(kind: SnapshotKind) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Snapshotter::open(&tmp.path().join("store"), Some(kind)).unwrap();
        assert_eq!(store.kind(), kind);
        let out = tmp.path().join("blobs");

        let base = tmp.path().join("base");
        write_file(&base.join("etc/conf"), b"conf");
        write_file(&base.join("etc/keep"), b"keep");
        write_file(&base.join("data/old1"), b"1");
        write_file(&base.join("data/sub/old2"), b"2");
        write_file(&base.join("bin/tool"), b"#!/bin/sh\n");
        fs::set_permissions(base.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        xattr::set(base.join("bin/tool"), "user.tag", b"base").unwrap();
        set_all_mtimes(&base, 1_600_000_000);
        let l1 = layer_of_tree(&base, &out);
        let dir1 = store.ensure_layer(&l1.path, &l1.diff_id).unwrap();
        assert!(dir1.starts_with(store.root()));
        // Once only: a second call finds it.
        assert_eq!(store.ensure_layer(&l1.path, &l1.diff_id).unwrap(), dir1);

        let snap = store.prepare(std::slice::from_ref(&l1.diff_id)).unwrap();
        assert_eq!(snap.kind(), kind);
        let rootfs = snap.rootfs().to_path_buf();
        assert_eq!(describe(&rootfs), describe(&base));
        assert_eq!(snap.diff(&out, Compression::Gzip).unwrap(), None);

        // The step.
        fs::remove_file(rootfs.join("etc/conf")).unwrap();
        fs::remove_dir_all(rootfs.join("data")).unwrap();
        write_file(&rootfs.join("data/fresh"), b"fresh");
        write_file(&rootfs.join("new/file"), b"new");
        fs::hard_link(rootfs.join("new/file"), rootfs.join("new/link")).unwrap();
        fs::set_permissions(rootfs.join("bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();

        let l2 = snap.diff(&out, Compression::Zstd).unwrap().unwrap();
        let entries = entry_names(&l2.path);
        assert!(entries.contains(&"etc/.wh.conf".to_string()), "{entries:?}");
        assert!(!entries.iter().any(|e| e == "etc/keep"), "{entries:?}");
        match kind {
            // overlay records the removed and recreated directory as opaque...
            SnapshotKind::Overlay => {
                assert!(
                    entries.contains(&"data/.wh..wh..opq".to_string()),
                    "{entries:?}"
                )
            }
            // ...the comparison as the names that went away.
            SnapshotKind::Copy => {
                assert!(
                    entries.contains(&"data/.wh.old1".to_string()),
                    "{entries:?}"
                );
                assert!(entries.contains(&"data/.wh.sub".to_string()), "{entries:?}");
            }
        }
        assert!(entries.contains(&"new/link".to_string()), "{entries:?}");
        // Diffing again gives all the changes since prepare, the same bytes.
        let again = snap.diff(&out, Compression::Zstd).unwrap().unwrap();
        assert_eq!(again.digest, l2.digest);
        let after_step = describe(&rootfs);
        drop(snap);
        assert!(!rootfs.exists());

        let dir2 = store.ensure_layer(&l2.path, &l2.diff_id).unwrap();
        assert_ne!(dir1, dir2);
        let next = store
            .prepare(&[l1.diff_id.clone(), l2.diff_id.clone()])
            .unwrap();
        let stacked = next.rootfs();
        assert_eq!(
            names(stacked),
            [
                "bin",
                "bin/tool",
                "data",
                "data/fresh",
                "etc",
                "etc/keep",
                "new",
                "new/file",
                "new/link"
            ]
        );
        let meta = fs::symlink_metadata(stacked.join("bin/tool")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!(
            xattr::get(stacked.join("bin/tool"), "user.tag").unwrap(),
            Some(b"base".to_vec())
        );
        // The stacked layers show exactly what the step left, bar sub-second times.
        let mut expected = after_step;
        let mut got = describe(stacked);
        for d in expected.values_mut().chain(got.values_mut()) {
            d.mtime = 0;
        }
        assert_eq!(got, expected);
        assert_eq!(next.diff(&out, Compression::Gzip).unwrap(), None);
    }

    #[test]
    fn overlay_step_cycle() {
        step_cycle(SnapshotKind::Overlay);
    }

    #[test]
    fn copy_step_cycle() {
        step_cycle(SnapshotKind::Copy);
    }

    /// BuildKit's `testCopyDuplicates`-style chains: the same layer twice, apart or adjacent,
    /// stacks like applying it twice.
    #[test]
    fn a_chain_may_hold_the_same_layer_several_times() {
        for kind in [SnapshotKind::Overlay, SnapshotKind::Copy] {
            let tmp = tempfile::tempdir().unwrap();
            let store = Snapshotter::open(&tmp.path().join("store"), Some(kind)).unwrap();
            let out = tmp.path().join("blobs");
            let tree = |name: &str, files: &[(&str, &[u8])]| {
                let dir = tmp.path().join(name);
                for (path, data) in files {
                    write_file(&dir.join(path), data);
                }
                set_all_mtimes(&dir, 1_600_000_000);
                let layer = layer_of_tree(&dir, &out);
                store.ensure_layer(&layer.path, &layer.diff_id).unwrap();
                layer.diff_id
            };
            let a = tree("a", &[("a", b"from a"), ("shared", b"a")]);
            let b = tree("b", &[("b", b"from b"), ("shared", b"b")]);
            let c = tree("c", &[("c", b"from c")]);
            for chain in [
                vec![a.clone(), a.clone()],
                vec![a.clone(), b.clone(), a.clone(), c.clone()],
            ] {
                let snap = store.prepare(&chain).unwrap();
                let root = snap.rootfs();
                assert_eq!(fs::read(root.join("a")).unwrap(), b"from a", "{kind:?}");
                assert_eq!(
                    fs::read(root.join("shared")).unwrap(),
                    b"a",
                    "{kind:?}: the upper copy of a decides"
                );
                assert_eq!(root.join("b").exists(), chain.contains(&b), "{kind:?}");
                assert_eq!(root.join("c").exists(), chain.contains(&c), "{kind:?}");
                assert_eq!(snap.diff(&out, Compression::Gzip).unwrap(), None);
            }
        }
    }

    #[test]
    fn dirs_only_copied_up_are_no_change() {
        for kind in [SnapshotKind::Overlay, SnapshotKind::Copy] {
            let tmp = tempfile::tempdir().unwrap();
            let store = Snapshotter::open(&tmp.path().join("store"), Some(kind)).unwrap();
            let out = tmp.path().join("blobs");
            let base = tmp.path().join("base");
            write_file(&base.join("etc/passwd"), b"root:x:0:0::/:/bin/sh\n");
            write_file(&base.join("usr/lib/x"), b"x");
            set_all_mtimes(&base, 1_600_000_000);
            let l1 = layer_of_tree(&base, &out);
            store.ensure_layer(&l1.path, &l1.diff_id).unwrap();
            let snap = store.prepare(std::slice::from_ref(&l1.diff_id)).unwrap();
            let rootfs = snap.rootfs().to_path_buf();
            // A mount point stub made and cleaned up, the directory's times put back.
            let etc = rootfs.join("etc");
            let before = fs::metadata(&etc).unwrap();
            write_file(&etc.join("hosts"), b"");
            fs::remove_file(etc.join("hosts")).unwrap();
            let atime = filetime::FileTime::from_last_access_time(&before);
            let mtime = filetime::FileTime::from_last_modification_time(&before);
            filetime::set_file_times(&etc, atime, mtime).unwrap();
            assert_eq!(
                snap.diff(&out, Compression::Gzip).unwrap(),
                None,
                "{kind:?}"
            );
            // A real change below a copied-up directory still brings its parents.
            write_file(&rootfs.join("usr/lib/new"), b"new");
            let blob = snap.diff(&out, Compression::Gzip).unwrap().unwrap();
            assert_eq!(
                entry_names(&blob.path),
                ["usr/", "usr/lib/", "usr/lib/new"],
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_upper_dir_becomes_the_layer_it_was_diffed_into() {
        let tmp = tempfile::tempdir().unwrap();
        let store =
            Snapshotter::open(&tmp.path().join("store"), Some(SnapshotKind::Overlay)).unwrap();
        let out = tmp.path().join("blobs");
        let base = tmp.path().join("base");
        write_file(&base.join("etc/passwd"), b"root\n");
        write_file(&base.join("old/a"), b"a");
        set_all_mtimes(&base, 1_600_000_000);
        let l1 = layer_of_tree(&base, &out);
        store.ensure_layer(&l1.path, &l1.diff_id).unwrap();
        let snap = store.prepare(std::slice::from_ref(&l1.diff_id)).unwrap();
        let rootfs = snap.rootfs().to_path_buf();
        fs::remove_dir_all(rootfs.join("old")).unwrap();
        write_file(&rootfs.join("new/b"), b"b");
        let etc = fs::metadata(rootfs.join("etc")).unwrap();
        write_file(&rootfs.join("etc/stub"), b"");
        fs::remove_file(rootfs.join("etc/stub")).unwrap();
        filetime::set_file_times(
            rootfs.join("etc"),
            filetime::FileTime::from_last_access_time(&etc),
            filetime::FileTime::from_last_modification_time(&etc),
        )
        .unwrap();
        let blob = snap.diff(&out, Compression::Gzip).unwrap().unwrap();
        snap.into_layer(&blob.diff_id).unwrap();
        // The kept dir is what unpacking the blob gives.
        let kept = store.ensure_layer(&blob.path, &blob.diff_id).unwrap();
        let unpacked = tmp.path().join("unpacked");
        fs::create_dir(&unpacked).unwrap();
        unpack_layer(&blob.path, &unpacked, UnpackMode::OverlayLower).unwrap();
        assert_eq!(describe(&kept), describe(&unpacked));
        assert!(!kept.join("etc").exists(), "copied-up dirs are pruned");
        let next = store
            .prepare(&[l1.diff_id.clone(), blob.diff_id.clone()])
            .unwrap();
        assert!(!next.rootfs().join("old").exists());
        assert_eq!(fs::read(next.rootfs().join("new/b")).unwrap(), b"b");
        assert_eq!(
            fs::read(next.rootfs().join("etc/passwd")).unwrap(),
            b"root\n"
        );
    }

    #[test]
    fn open_detects_overlay_as_root() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Snapshotter::open(tmp.path(), None).unwrap();
        assert_eq!(store.kind(), SnapshotKind::Overlay);
        // The probe left nothing behind.
        assert_eq!(fs::read_dir(tmp.path().join("active")).unwrap().count(), 0);
    }

    #[test]
    fn scratch_snapshots_start_empty() {
        for kind in [SnapshotKind::Overlay, SnapshotKind::Copy] {
            let tmp = tempfile::tempdir().unwrap();
            let store = Snapshotter::open(tmp.path(), Some(kind)).unwrap();
            let out = tmp.path().join("out");
            let snap = store.prepare(&[]).unwrap();
            assert!(names(snap.rootfs()).is_empty());
            assert_eq!(snap.diff(&out, Compression::Gzip).unwrap(), None);
            write_file(&snap.rootfs().join("hello"), b"hi");
            let blob = snap.diff(&out, Compression::Gzip).unwrap().unwrap();
            assert_eq!(entry_names(&blob.path), ["hello"]);
        }
    }

    #[test]
    fn sixty_layer_overlay_stack() {
        let tmp = tempfile::tempdir().unwrap();
        // A long store path: absolute lower dirs would not fit in the mount data.
        let root = tmp
            .path()
            .join("a-rather-long-directory-name-for-the-snapshot-store")
            .join("and-another-long-one-below-it-to-make-the-point");
        let store = Snapshotter::open(&root, Some(SnapshotKind::Overlay)).unwrap();
        let out = tmp.path().join("out");
        let mut layers: Vec<String> = Vec::new();
        for i in 0..60 {
            let snap = store.prepare(&layers).unwrap();
            let rootfs = snap.rootfs();
            write_file(
                &rootfs.join(format!("all/f{i:02}")),
                i.to_string().as_bytes(),
            );
            write_file(&rootfs.join(format!("latest/f{i:02}")), b"latest");
            if i > 0 {
                fs::remove_file(rootfs.join(format!("latest/f{:02}", i - 1))).unwrap();
            }
            let blob = snap.diff(&out, Compression::Zstd).unwrap().unwrap();
            store.ensure_layer(&blob.path, &blob.diff_id).unwrap();
            layers.push(blob.diff_id);
        }
        let snap = store.prepare(&layers).unwrap();
        let rootfs = snap.rootfs();
        assert!(mounted(rootfs));
        assert_eq!(fs::read_dir(rootfs.join("all")).unwrap().count(), 60);
        assert_eq!(fs::read(rootfs.join("all/f42")).unwrap(), b"42");
        assert_eq!(names(&rootfs.join("latest")), ["f59"]);
    }

    #[test]
    fn ensure_layer_verifies_the_diff_id() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        write_file(&src.join("f"), b"content");
        let out = tmp.path().join("out");
        let blob = layer_of_tree(&src, &out);
        for kind in [SnapshotKind::Overlay, SnapshotKind::Copy] {
            let store =
                Snapshotter::open(&tmp.path().join(format!("{kind:?}")), Some(kind)).unwrap();
            let wrong = format!("sha256:{}", "0".repeat(64));
            let err = store.ensure_layer(&blob.path, &wrong).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&wrong) && msg.contains(&blob.diff_id), "{msg}");
            for sub in ["layers", "layers-copy"] {
                let left = fs::read_dir(store.root().join(sub)).unwrap().count();
                assert_eq!(left, 0, "partial layer dir left in {sub}");
            }
            assert!(matches!(
                store.ensure_layer(&blob.path, "sha256:XYZ"),
                Err(SnapshotError::InvalidDiffId(_))
            ));
            let broken = tmp.path().join("broken.tar.gz");
            let bytes = fs::read(&blob.path).unwrap();
            fs::write(&broken, &bytes[..bytes.len() - 10]).unwrap();
            assert!(matches!(
                store.ensure_layer(&broken, &blob.diff_id),
                Err(SnapshotError::Layer(_))
            ));
            assert!(matches!(
                store.prepare(std::slice::from_ref(&blob.diff_id)),
                Err(SnapshotError::LayerMissing { .. })
            ));
            // Concurrent callers all get the one dir.
            let dirs: Vec<PathBuf> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| store.ensure_layer(&blob.path, &blob.diff_id).unwrap()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(dirs.iter().all(|d| d == &dirs[0]));
            let entries = fs::read_dir(dirs[0].parent().unwrap()).unwrap().count();
            assert_eq!(entries, 1, "temporary dirs left behind");
        }
    }

    #[test]
    fn drop_unmounts_even_when_busy() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Snapshotter::open(tmp.path(), Some(SnapshotKind::Overlay)).unwrap();
        let snap = store.prepare(&[]).unwrap();
        let rootfs = snap.rootfs().to_path_buf();
        assert!(mounted(&rootfs));
        drop(snap);
        assert!(!mounted(&rootfs));
        assert!(!rootfs.exists());

        let snap = store.prepare(&[]).unwrap();
        let rootfs = snap.rootfs().to_path_buf();
        write_file(&rootfs.join("open"), b"x");
        let busy = File::open(rootfs.join("open")).unwrap();
        drop(snap);
        assert!(!mounted(&rootfs));
        drop(busy);
        assert_eq!(
            fs::read_dir(store.root().join("active")).unwrap().count(),
            0
        );
    }
}
