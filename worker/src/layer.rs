//! OCI layer tarballs: turning filesystem changes into layer blobs and layer blobs back into
//! trees.
//!
//! A layer is written from one of two sources: the upper directory of an overlay mount
//! ([`write_layer_from_upper`]), where overlay already recorded what a step changed, or two full
//! trees compared entry by entry ([`write_layer_from_diff`], the copying fallback). Either way
//! the entries are emitted in a fixed order (depth first, siblings sorted by their name in the
//! archive, a directory before its contents), with the parents of every changed entry included,
//! so one tree always gives the same bytes. Deletions become AUFS-style whiteouts (`.wh.<name>`)
//! and directories that hide what lower layers had get an opaque marker (`.wh..wh..opq`), as the
//! OCI image spec describes. The tar stream, the compressor and the output file are chained so
//! that a single pass computes the three identities of a [`LayerBlob`]: the sha256 of the
//! compressed bytes (the OCI descriptor digest), the sha256 of the uncompressed tar (the diff_id)
//! and the blake3 of the compressed bytes (the store key).
//!
//! [`unpack_layer`] reads a layer back (gzip, zstd or plain tar, told apart by magic bytes),
//! either as an overlay lower directory ([`UnpackMode::OverlayLower`]: whiteouts become the
//! character devices and xattrs overlayfs understands) or onto an existing tree
//! ([`UnpackMode::Apply`]: whiteouts delete). Every path is resolved inside the destination,
//! following symlinks the way a chroot would and refusing anything that leads out of it, and the
//! returned diff_id is only given for a stream that was read to its end without error.
//!
//! Everything here is blocking filesystem code; async callers use `spawn_blocking`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use filetime::FileTime;
use nix::sys::stat::{Mode, SFlag, major, makedev, minor, mknod};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// Media type of a gzip-compressed OCI layer.
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed OCI layer.
pub const MEDIA_TYPE_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of an uncompressed OCI layer.
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Gzip level used for new layers. Level 6 (gzip's default) costs about twice the CPU time of
/// level 3 for a few percent smaller layers; layers are written on the critical path of every
/// step, so we take the faster setting.
pub const GZIP_LEVEL: u32 = 3;
/// Zstd level used for new layers (zstd's own default).
pub const ZSTD_LEVEL: i32 = 3;

/// Name prefix of a whiteout entry: `.wh.x` deletes `x` from the layers below.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of AUFS metadata entries, which are not files of the image.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// Name of the opaque-directory marker: the directory hides everything lower layers put in it.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Xattr with which overlayfs marks an opaque directory (as root).
const OVERLAY_OPAQUE: &str = "trusted.overlay.opaque";
/// The same, for overlay mounts with `userxattr`.
const OVERLAY_OPAQUE_USER: &str = "user.overlay.opaque";

/// The tar block size.
const BLOCK: u64 = 512;
/// Symlinks followed while resolving one path before giving up (the kernel's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;

pub use strata_shared::job::Compression;

/// A layer blob written to disk, with all its identities computed in the same pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// The compressed bytes, named `<blake3>.<extension>` in the output directory.
    pub path: PathBuf,
    /// The OCI media type matching the compression.
    pub media_type: String,
    /// `sha256:<hex>` of the compressed bytes (the OCI descriptor digest).
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar (the image config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// Hex blake3 of the compressed bytes (the store key).
    pub blake3: String,
    /// Size of the compressed bytes.
    pub size: u64,
}

/// Errors from writing or unpacking layers. Each names the file, blob or entry it is about.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`read directory`, `create file`, ...).
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The compressed or tar stream of a blob could not be read (corrupt data, bad checksum,
    /// premature end).
    #[error("layer {}: corrupt stream after {offset} uncompressed bytes: {source}", blob.display())]
    Stream {
        /// The blob being read.
        blob: PathBuf,
        /// How many uncompressed bytes had been read when the error happened.
        offset: u64,
        /// The decoder's or tar reader's error.
        #[source]
        source: io::Error,
    },
    /// The tar stream ended before its end-of-archive marker.
    #[error("layer {} is truncated: the tar stream ends after {offset} bytes without an end-of-archive marker", blob.display())]
    Truncated {
        /// The blob being read.
        blob: PathBuf,
        /// Uncompressed bytes read before the end.
        offset: u64,
    },
    /// The blob starts with bytes that are neither gzip, zstd nor tar.
    #[error("layer {}: unsupported compression (first bytes {magic})", blob.display())]
    UnknownCompression {
        /// The blob being read.
        blob: PathBuf,
        /// The first bytes, in hex.
        magic: String,
    },
    /// An entry would be written outside the destination directory.
    #[error("layer {}: entry {entry:?} escapes the destination: {reason}", blob.display())]
    Escape {
        /// The blob being read.
        blob: PathBuf,
        /// The entry's path as written in the archive.
        entry: String,
        /// Why it escapes.
        reason: String,
    },
    /// An entry cannot be unpacked (unsupported type, bad header field, missing link target).
    #[error("layer {}: entry {entry:?}: {reason}", blob.display())]
    BadEntry {
        /// The blob being read.
        blob: PathBuf,
        /// The entry's path as written in the archive.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry could not be unpacked because the filesystem refused an operation.
    #[error("layer {}: entry {entry:?}: {op} {}: {source}", blob.display(), path.display())]
    Unpack {
        /// The blob being read.
        blob: PathBuf,
        /// The entry's path as written in the archive.
        entry: String,
        /// What was being done.
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A file changed size while it was being archived.
    #[error("{} changed while it was being archived: {reason}", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// What was seen.
        reason: String,
    },
    /// The upper directory uses an overlay feature whose changes cannot be read from the upper
    /// directory alone.
    #[error("{}: overlay xattr {xattr} is set; mount overlay with redirect_dir=off,metacopy=off to archive upper dirs", path.display())]
    OverlayFeature {
        /// The entry carrying the xattr.
        path: PathBuf,
        /// The xattr's name.
        xattr: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// File metadata
// ---------------------------------------------------------------------------------------------

/// The type of a filesystem entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

/// What the layer code needs to know about one filesystem entry (never following symlinks).
#[derive(Debug, Clone)]
pub(crate) struct Stat {
    kind: FileKind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    rdev: u64,
    dev: u64,
    ino: u64,
    nlink: u64,
    ctime: i64,
    ctime_nsec: i64,
    /// Symlink target.
    link: Option<OsString>,
    /// Xattrs that belong to the image, sorted by name.
    xattrs: Vec<(OsString, Vec<u8>)>,
    /// overlayfs' own xattrs (`trusted.overlay.*`, `user.overlay.*`), sorted by name.
    overlay_xattrs: Vec<(OsString, Vec<u8>)>,
}

fn is_overlay_xattr(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"trusted.overlay.") || b.starts_with(b"user.overlay.")
}

fn xattr_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOTSUP) | Some(nix::libc::ENODATA)
    )
}

type Xattrs = Vec<(OsString, Vec<u8>)>;

/// Reads the xattrs of `path` (not following a symlink), split into the image's and overlay's.
fn read_xattrs(path: &Path) -> Result<(Xattrs, Xattrs), LayerError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if xattr_unsupported(&e) => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(io_err("list xattrs of", path)(e)),
    };
    let mut image = Vec::new();
    let mut overlay = Vec::new();
    for name in names {
        let value = match xattr::get(path, &name) {
            Ok(Some(v)) => v,
            // Removed between list and get.
            Ok(None) => continue,
            Err(e) if xattr_unsupported(&e) => continue,
            Err(e) => return Err(io_err("read xattr of", path)(e)),
        };
        if is_overlay_xattr(&name) {
            overlay.push((name, value));
        } else {
            image.push((name, value));
        }
    }
    image.sort();
    overlay.sort();
    Ok((image, overlay))
}

impl Stat {
    /// Reads the metadata of `path` without following it if it is a symlink.
    pub(crate) fn read(path: &Path) -> Result<Stat, LayerError> {
        let m = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_char_device() {
            FileKind::Char
        } else if ft.is_block_device() {
            FileKind::Block
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else {
            FileKind::Socket
        };
        let link = if kind == FileKind::Symlink {
            Some(
                fs::read_link(path)
                    .map_err(io_err("read symlink", path))?
                    .into_os_string(),
            )
        } else {
            None
        };
        let (xattrs, overlay_xattrs) = if kind == FileKind::Socket {
            (Vec::new(), Vec::new())
        } else {
            read_xattrs(path)?
        };
        Ok(Stat {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            rdev: m.rdev(),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
            link,
            xattrs,
            overlay_xattrs,
        })
    }

    /// Whether this is an overlayfs whiteout (a character device 0/0).
    fn is_whiteout(&self) -> bool {
        self.kind == FileKind::Char && self.rdev == 0
    }

    /// Whether this directory is opaque in an overlay upper dir.
    fn is_opaque(&self) -> bool {
        self.kind == FileKind::Dir
            && self.overlay_xattrs.iter().any(|(name, value)| {
                (name == OVERLAY_OPAQUE || name == OVERLAY_OPAQUE_USER) && value.as_slice() == b"y"
            })
    }

    /// Compares everything an image records about an entry except file content.
    fn same_metadata(&self, other: &Stat) -> bool {
        self.kind == other.kind
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.mtime == other.mtime
            && self.mtime_nsec == other.mtime_nsec
            && self.link == other.link
            && self.xattrs == other.xattrs
            && (self.kind != FileKind::File || self.size == other.size)
            && (!matches!(self.kind, FileKind::Char | FileKind::Block) || self.rdev == other.rdev)
    }
}

fn read_dir_sorted(path: &Path) -> Result<Vec<OsString>, LayerError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(path).map_err(io_err("read directory", path))? {
        names.push(entry.map_err(io_err("read directory", path))?.file_name());
    }
    names.sort();
    Ok(names)
}

/// The metadata of every entry of a tree, taken when a snapshot is prepared, so that a later
/// diff needs no pristine copy of the tree: a regular file whose inode and ctime are unchanged
/// has unchanged content, and anything else that differs is archived.
#[derive(Debug, Default)]
pub(crate) struct Manifest {
    entries: HashMap<PathBuf, Stat>,
    children: HashMap<PathBuf, Vec<OsString>>,
}

impl Manifest {
    /// Records the tree under `root`.
    pub(crate) fn of_tree(root: &Path) -> Result<Manifest, LayerError> {
        let mut manifest = Manifest::default();
        let root_stat = Stat::read(root)?;
        manifest.entries.insert(PathBuf::new(), root_stat);
        let mut pending = vec![PathBuf::new()];
        while let Some(rel) = pending.pop() {
            let abs = root.join(&rel);
            let names = read_dir_sorted(&abs)?;
            for name in &names {
                let child_rel = rel.join(name);
                let stat = Stat::read(&abs.join(name))?;
                if stat.kind == FileKind::Dir {
                    pending.push(child_rel.clone());
                }
                manifest.entries.insert(child_rel, stat);
            }
            manifest.children.insert(rel, names);
        }
        Ok(manifest)
    }

    /// Number of entries recorded, the root included.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Change detection: an ordered list of nodes, some of which are emitted
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum NodeKind {
    /// A real entry of the source tree.
    Real { abs: PathBuf, stat: Stat },
    /// `.wh.<name>`: the name was deleted.
    Whiteout,
    /// `.wh..wh..opq`: the parent directory hides what lower layers had.
    Opaque,
}

#[derive(Debug)]
struct Node {
    /// Path in the archive, relative, without a trailing slash.
    rel: PathBuf,
    /// Index of the parent directory's node (None at top level).
    parent: Option<usize>,
    kind: NodeKind,
    /// Whether the entry goes into the layer.
    emit: bool,
}

fn whiteout_name(name: &OsStr) -> OsString {
    let mut bytes = WHITEOUT_PREFIX.to_vec();
    bytes.extend_from_slice(name.as_bytes());
    OsString::from_vec(bytes)
}

/// Lists an overlay upper directory: every entry is a change.
fn walk_upper(
    abs: &Path,
    rel: &Path,
    parent: Option<usize>,
    nodes: &mut Vec<Node>,
) -> Result<(), LayerError> {
    let mut items: Vec<(OsString, Stat)> = Vec::new();
    for name in read_dir_sorted(abs)? {
        let child_abs = abs.join(&name);
        let stat = Stat::read(&child_abs)?;
        for (xattr, _) in &stat.overlay_xattrs {
            let b = xattr.as_bytes();
            if b.ends_with(b".overlay.redirect") || b.ends_with(b".overlay.metacopy") {
                return Err(LayerError::OverlayFeature {
                    path: child_abs,
                    xattr: xattr.to_string_lossy().into_owned(),
                });
            }
        }
        if stat.kind == FileKind::Socket {
            continue;
        }
        let emitted = if stat.is_whiteout() {
            whiteout_name(&name)
        } else {
            name
        };
        items.push((emitted, stat));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, stat) in items {
        let child_rel = rel.join(&name);
        if stat.is_whiteout() {
            nodes.push(Node {
                rel: child_rel,
                parent,
                kind: NodeKind::Whiteout,
                emit: true,
            });
            continue;
        }
        // The name was not changed for a real entry, so this is where it lives.
        let child_abs = abs.join(&name);
        let is_dir = stat.kind == FileKind::Dir;
        let opaque = stat.is_opaque();
        let index = nodes.len();
        nodes.push(Node {
            rel: child_rel.clone(),
            parent,
            kind: NodeKind::Real {
                abs: child_abs.clone(),
                stat,
            },
            emit: true,
        });
        if is_dir {
            if opaque {
                nodes.push(Node {
                    rel: child_rel.join(OsStr::from_bytes(OPAQUE_MARKER)),
                    parent: Some(index),
                    kind: NodeKind::Opaque,
                    emit: true,
                });
            }
            walk_upper(&child_abs, &child_rel, Some(index), nodes)?;
        }
    }
    Ok(())
}

/// Marks upper directories that equal their lower counterpart as not emitted (their children
/// still decide, through [`close_emission`]). Directories inside an opaque directory are new.
fn skip_copied_up_dirs(nodes: &mut [Node], lowers: &[PathBuf]) -> Result<(), LayerError> {
    let mut in_opaque = vec![false; nodes.len()];
    for i in 0..nodes.len() {
        let parent_opaque = nodes[i].parent.is_some_and(|p| in_opaque[p]);
        let NodeKind::Real { stat, .. } = &nodes[i].kind else {
            continue;
        };
        if stat.kind != FileKind::Dir {
            continue;
        }
        in_opaque[i] = parent_opaque || stat.is_opaque();
        if in_opaque[i] {
            continue;
        }
        if lower_stat(lowers, &nodes[i].rel)?.is_some_and(|lower| lower.same_metadata(stat)) {
            nodes[i].emit = false;
        }
    }
    Ok(())
}

/// Removes from an overlay upper dir the directories overlay only copied up (equal to their
/// lower counterpart, with nothing changed below them), so that the upper dir holds exactly
/// the layer's entries and can serve as that layer's lower dir.
pub fn prune_copied_up(upper: &Path, lowers: &[PathBuf]) -> Result<(), LayerError> {
    fn visit(abs: &Path, rel: &Path, lowers: &[PathBuf]) -> Result<bool, LayerError> {
        // Whether everything below `abs` is unchanged directories (then removed).
        let mut all_unchanged = true;
        for name in read_dir_sorted(abs)? {
            let child_abs = abs.join(&name);
            let child_rel = rel.join(&name);
            let stat = Stat::read(&child_abs)?;
            if stat.is_whiteout() {
                // As unpacking its blob makes it: the blob keeps no time for a deletion.
                zero_times(&child_abs)?;
            }
            let unchanged_dir = stat.kind == FileKind::Dir
                && !stat.is_opaque()
                && lower_stat(lowers, &child_rel)?.is_some_and(|l| l.same_metadata(&stat))
                && visit(&child_abs, &child_rel, lowers)?;
            if unchanged_dir {
                fs::remove_dir(&child_abs).map_err(io_err("remove", &child_abs))?;
            } else {
                all_unchanged = false;
            }
        }
        Ok(all_unchanged)
    }
    visit(upper, Path::new(""), lowers)?;
    Ok(())
}

/// Sets a whiteout's times to the epoch, as its marker in a layer blob has them (see
/// [`marker_header`]), so that a kept upper dir and an unpacked blob agree.
fn zero_times(abs: &Path) -> Result<(), LayerError> {
    filetime::set_symlink_file_times(abs, filetime::FileTime::zero(), filetime::FileTime::zero())
        .map_err(io_err("set the times of", abs))
}

/// What the overlay shows at `rel` without the upper dir: the topmost lower entry, unless a
/// whiteout or an opaque directory above it hides it.
fn lower_stat(lowers: &[PathBuf], rel: &Path) -> Result<Option<Stat>, LayerError> {
    let components: Vec<&OsStr> = rel.iter().collect();
    'lowers: for lower in lowers {
        let mut path = lower.clone();
        let mut hides_below = false;
        for (depth, name) in components.iter().enumerate() {
            path.push(name);
            let Ok(meta) = fs::symlink_metadata(&path) else {
                if hides_below {
                    return Ok(None);
                }
                continue 'lowers;
            };
            let stat = Stat::read(&path)?;
            if stat.is_whiteout() {
                return Ok(None);
            }
            if depth + 1 == components.len() {
                return Ok(Some(stat));
            }
            if !meta.is_dir() {
                return Ok(None);
            }
            hides_below |= stat.is_opaque();
        }
    }
    Ok(None)
}

/// The state of the tree before a step, for [`walk_diff`].
trait Before {
    fn stat(&self, rel: &Path) -> Result<Option<Cow<'_, Stat>>, LayerError>;
    fn children(&self, rel: &Path) -> Result<Vec<OsString>, LayerError>;
    /// Whether a regular file whose metadata (size and mtime included) is unchanged also has
    /// unchanged content.
    fn same_content(
        &self,
        rel: &Path,
        before: &Stat,
        after_abs: &Path,
        after: &Stat,
    ) -> Result<bool, LayerError>;
}

/// A full copy of the tree before the step.
struct TreeBefore<'a> {
    root: &'a Path,
}

impl Before for TreeBefore<'_> {
    fn stat(&self, rel: &Path) -> Result<Option<Cow<'_, Stat>>, LayerError> {
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(_) => Stat::read(&abs).map(|s| Some(Cow::Owned(s))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &abs)(e)),
        }
    }

    fn children(&self, rel: &Path) -> Result<Vec<OsString>, LayerError> {
        read_dir_sorted(&self.root.join(rel))
    }

    fn same_content(
        &self,
        rel: &Path,
        _before: &Stat,
        after_abs: &Path,
        _after: &Stat,
    ) -> Result<bool, LayerError> {
        let before_abs = self.root.join(rel);
        files_equal(&before_abs, after_abs)
    }
}

impl Before for Manifest {
    fn stat(&self, rel: &Path) -> Result<Option<Cow<'_, Stat>>, LayerError> {
        Ok(self.entries.get(rel).map(Cow::Borrowed))
    }

    fn children(&self, rel: &Path) -> Result<Vec<OsString>, LayerError> {
        Ok(self.children.get(rel).cloned().unwrap_or_default())
    }

    fn same_content(
        &self,
        _rel: &Path,
        before: &Stat,
        _after_abs: &Path,
        after: &Stat,
    ) -> Result<bool, LayerError> {
        // Any write to the file changes its ctime, and userspace cannot set ctime back.
        Ok(before.dev == after.dev
            && before.ino == after.ino
            && before.ctime == after.ctime
            && before.ctime_nsec == after.ctime_nsec)
    }
}

/// Compares two regular files byte by byte.
fn files_equal(a: &Path, b: &Path) -> Result<bool, LayerError> {
    let mut fa = File::open(a).map_err(io_err("open", a))?;
    let mut fb = File::open(b).map_err(io_err("open", b))?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(io_err("read", a))?;
        let nb = read_full(&mut fb, &mut bb).map_err(io_err("read", b))?;
        if ba.get(..na) != bb.get(..nb) {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the end of the stream.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Lists the tree `after` against `before`: changed and new entries are marked for emission,
/// removed ones become whiteouts.
fn walk_diff(
    before: &dyn Before,
    before_is_dir: bool,
    abs: &Path,
    rel: &Path,
    parent: Option<usize>,
    nodes: &mut Vec<Node>,
) -> Result<(), LayerError> {
    enum Item {
        Removed,
        Present(OsString),
    }
    let after_names = read_dir_sorted(abs)?;
    let mut items: Vec<(OsString, Item)> = Vec::new();
    if before_is_dir {
        let present: HashSet<&OsString> = after_names.iter().collect();
        for name in before.children(rel)? {
            if !present.contains(&name) {
                items.push((whiteout_name(&name), Item::Removed));
            }
        }
    }
    for name in after_names {
        items.push((name.clone(), Item::Present(name)));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    for (emitted, item) in items {
        let child_rel = rel.join(&emitted);
        let name = match item {
            Item::Removed => {
                nodes.push(Node {
                    rel: child_rel,
                    parent,
                    kind: NodeKind::Whiteout,
                    emit: true,
                });
                continue;
            }
            Item::Present(name) => name,
        };
        let child_abs = abs.join(&name);
        let stat = Stat::read(&child_abs)?;
        if stat.kind == FileKind::Socket {
            continue;
        }
        let old = if before_is_dir {
            before.stat(&child_rel)?
        } else {
            None
        };
        let changed = match &old {
            None => true,
            Some(old) => {
                !old.same_metadata(&stat)
                    || (stat.kind == FileKind::File
                        && !before.same_content(&child_rel, old, &child_abs, &stat)?)
            }
        };
        let old_is_dir = old.as_ref().is_some_and(|o| o.kind == FileKind::Dir);
        let is_dir = stat.kind == FileKind::Dir;
        let index = nodes.len();
        nodes.push(Node {
            rel: child_rel.clone(),
            parent,
            kind: NodeKind::Real {
                abs: child_abs.clone(),
                stat,
            },
            emit: changed,
        });
        if is_dir {
            walk_diff(
                before,
                old_is_dir,
                &child_abs,
                &child_rel,
                Some(index),
                nodes,
            )?;
        }
    }
    Ok(())
}

/// Completes the emission marks: every path of a hard-link group goes in once one of them does
/// (overlay copies up every link it touches), and every emitted entry brings its parents.
fn close_emission(nodes: &mut [Node]) {
    let mut groups: HashMap<(u64, u64), bool> = HashMap::new();
    for node in nodes.iter() {
        if let NodeKind::Real { stat, .. } = &node.kind
            && stat.kind != FileKind::Dir
            && stat.nlink > 1
        {
            *groups.entry((stat.dev, stat.ino)).or_default() |= node.emit;
        }
    }
    for node in nodes.iter_mut() {
        if let NodeKind::Real { stat, .. } = &node.kind
            && stat.kind != FileKind::Dir
            && stat.nlink > 1
            && groups.get(&(stat.dev, stat.ino)).copied().unwrap_or(false)
        {
            node.emit = true;
        }
    }
    // Parents precede their children, so walking backwards carries the mark all the way up.
    for i in (0..nodes.len()).rev() {
        let (emit, parent) = match nodes.get(i) {
            Some(n) => (n.emit, n.parent),
            None => continue,
        };
        if emit && let Some(p) = parent.and_then(|p| nodes.get_mut(p)) {
            p.emit = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// A writer that hashes what passes through it.
struct Hashing<W: Write> {
    inner: W,
    sha: Sha256,
    blake: Option<blake3::Hasher>,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W, with_blake3: bool) -> Self {
        Hashing {
            inner,
            sha: Sha256::new(),
            blake: with_blake3.then(blake3::Hasher::new),
            len: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.sha.update(written);
        if let Some(b) = &mut self.blake {
            b.update(written);
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R: Read> {
    inner: R,
    sha: Sha256,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(buf.get(..n).unwrap_or(buf));
        self.len += n as u64;
        Ok(n)
    }
}

fn sha256_hex(sha: Sha256) -> String {
    let digest = sha.finalize();
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Encoder<W> {
    fn new(w: W, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(GZIP_LEVEL),
            )),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL)?;
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
            Compression::Uncompressed => Encoder::Plain(w),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Plain(mut w) => {
                w.flush()?;
                Ok(w)
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Plain(w) => w.flush(),
        }
    }
}

type BlobWriter = BufWriter<Hashing<Encoder<Hashing<BufWriter<File>>>>>;

/// Removes a temporary file unless disarmed.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove temporary layer file");
        }
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name no other call in this process or any other process uses at the same time.
pub(crate) fn unique_name(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{n}-{nanos:x}", std::process::id())
}

/// Puts `name` into the ustar name fields; false when it does not fit (a PAX `path` is needed).
fn set_ustar_name(h: &mut tar::UstarHeader, name: &[u8]) -> bool {
    h.name = [0; 100];
    h.prefix = [0; 155];
    if name.len() <= h.name.len() {
        if let Some(dst) = h.name.get_mut(..name.len()) {
            dst.copy_from_slice(name);
        }
        return true;
    }
    // Split at a slash: prefix up to 155 bytes, name up to 100 bytes, neither empty.
    for (i, &b) in name.iter().enumerate() {
        if b != b'/' || i == 0 || i > h.prefix.len() {
            continue;
        }
        let (Some(prefix), Some(rest)) = (name.get(..i), name.get(i + 1..)) else {
            continue;
        };
        if rest.is_empty() || rest.len() > h.name.len() {
            continue;
        }
        if let (Some(p), Some(n)) = (
            h.prefix.get_mut(..prefix.len()),
            h.name.get_mut(..rest.len()),
        ) {
            p.copy_from_slice(prefix);
            n.copy_from_slice(rest);
            return true;
        }
    }
    let keep = name.get(..h.name.len()).unwrap_or(name);
    if let Some(dst) = h.name.get_mut(..keep.len()) {
        dst.copy_from_slice(keep);
    }
    false
}

/// Puts `link` into the ustar linkname field; false when it does not fit.
fn set_ustar_link(h: &mut tar::UstarHeader, link: &[u8]) -> bool {
    h.linkname = [0; 100];
    let keep = link.get(..h.linkname.len()).unwrap_or(link);
    if let Some(dst) = h.linkname.get_mut(..keep.len()) {
        dst.copy_from_slice(keep);
    }
    keep.len() == link.len()
}

/// One PAX record: `<len> <key>=<value>\n`, where len counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // space, '=', newline
    let mut len = rest + 1;
    while rest + len.to_string().len() != len {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

const ZERO_BLOCK: [u8; 512] = [0; 512];

/// Writes tar entries in the PAX format, as Go's archive/tar (and so Docker and BuildKit) do.
struct TarWriter {
    out: BlobWriter,
    out_path: PathBuf,
}

impl TarWriter {
    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), LayerError> {
        self.out
            .write_all(bytes)
            .map_err(io_err("write layer", &self.out_path))
    }

    fn pad(&mut self, len: u64) -> Result<(), LayerError> {
        let rem = (len % BLOCK) as usize;
        if rem != 0 {
            let pad = ZERO_BLOCK.get(rem..).unwrap_or(&[]);
            self.write_raw(pad)?;
        }
        Ok(())
    }

    /// Writes one entry: an optional PAX header, the ustar header, then the file's content.
    fn entry(
        &mut self,
        mut header: Header,
        name: &[u8],
        link: Option<&[u8]>,
        mut pax: PaxRecords,
        content: Option<(&Path, u64)>,
    ) -> Result<(), LayerError> {
        if let Some(ustar) = header.as_ustar_mut() {
            if !set_ustar_name(ustar, name) {
                pax.push((b"path".to_vec(), name.to_vec()));
            }
            if let Some(link) = link
                && !set_ustar_link(ustar, link)
            {
                pax.push((b"linkpath".to_vec(), link.to_vec()));
            }
        }
        if !pax.is_empty() {
            pax.sort();
            let mut data = Vec::new();
            for (k, v) in &pax {
                pax_record(&mut data, k, v);
            }
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0o644);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_mtime(0);
            ph.set_size(data.len() as u64);
            let trimmed = name.strip_suffix(b"/").unwrap_or(name);
            let base = trimmed
                .rsplit(|&b| b == b'/')
                .next()
                .unwrap_or(trimmed)
                .to_vec();
            let mut pax_name = b"PaxHeaders.0/".to_vec();
            pax_name.extend_from_slice(base.get(..80).unwrap_or(&base));
            if let Some(u) = ph.as_ustar_mut() {
                set_ustar_name(u, &pax_name);
            }
            ph.set_cksum();
            self.write_raw(ph.as_bytes())?;
            self.write_raw(&data)?;
            self.pad(data.len() as u64)?;
        }
        header.set_cksum();
        self.write_raw(header.as_bytes())?;
        if let Some((path, size)) = content {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err("open", path))?;
            let mut limited = (&mut file).take(size);
            let copied = io::copy(&mut limited, &mut self.out).map_err(|e| {
                // Tell a read error on the source from a write error on the layer.
                if e.kind() == io::ErrorKind::WriteZero || e.kind() == io::ErrorKind::StorageFull {
                    io_err("write layer", &self.out_path)(e)
                } else {
                    io_err("read", path)(e)
                }
            })?;
            if copied != size {
                return Err(LayerError::Changed {
                    path: path.to_path_buf(),
                    reason: format!("size was {size} bytes, only {copied} could be read"),
                });
            }
            let mut probe = [0u8; 1];
            if file.read(&mut probe).map_err(io_err("read", path))? != 0 {
                return Err(LayerError::Changed {
                    path: path.to_path_buf(),
                    reason: format!("it grew past its size of {size} bytes"),
                });
            }
            self.pad(size)?;
        }
        Ok(())
    }
}

/// The largest value the 7 octal digits of a ustar id field hold.
const USTAR_MAX_ID: u64 = 0o7777777;
/// The largest value the 11 octal digits of a ustar size field hold.
const USTAR_MAX_SIZE: u64 = 0o77777777777;

/// PAX records of one entry: key and value bytes.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

fn base_header(stat: &Stat, entry_type: EntryType) -> (Header, PaxRecords) {
    let mut h = Header::new_ustar();
    let mut pax = Vec::new();
    h.set_entry_type(entry_type);
    h.set_mode(stat.mode);
    h.set_uid(u64::from(stat.uid));
    h.set_gid(u64::from(stat.gid));
    if u64::from(stat.uid) > USTAR_MAX_ID {
        pax.push((b"uid".to_vec(), stat.uid.to_string().into_bytes()));
    }
    if u64::from(stat.gid) > USTAR_MAX_ID {
        pax.push((b"gid".to_vec(), stat.gid.to_string().into_bytes()));
    }
    // Whole seconds, as Docker writes them; times before 1970 are clamped to the epoch.
    h.set_mtime(u64::try_from(stat.mtime).unwrap_or(0));
    h.set_size(0);
    for (name, value) in &stat.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name.as_bytes());
        pax.push((key, value.clone()));
    }
    (h, pax)
}

/// A header for a whiteout or opaque marker: an empty file with fixed metadata, so the bytes
/// do not depend on when the deletion happened.
fn marker_header() -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(0);
    h
}

/// Writes the emitted nodes as a layer blob in `out_dir`; None when nothing is emitted.
fn write_nodes(
    nodes: &[Node],
    out_dir: &Path,
    compression: Compression,
) -> Result<Option<LayerBlob>, LayerError> {
    if !nodes.iter().any(|n| n.emit) {
        return Ok(None);
    }
    fs::create_dir_all(out_dir).map_err(io_err("create directory", out_dir))?;
    let tmp = TempFile {
        path: out_dir.join(format!(".{}.tmp", unique_name("layer-"))),
        armed: true,
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp.path)
        .map_err(io_err("create", &tmp.path))?;
    let blob_hash = Hashing::new(BufWriter::with_capacity(256 * 1024, file), true);
    let encoder = Encoder::new(blob_hash, compression).map_err(io_err("compress", &tmp.path))?;
    let tar_hash = Hashing::new(encoder, false);
    let mut tw = TarWriter {
        out: BufWriter::with_capacity(256 * 1024, tar_hash),
        out_path: tmp.path.clone(),
    };

    let mut first_link: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for node in nodes.iter().filter(|n| n.emit) {
        let name = node.rel.as_os_str().as_bytes();
        match &node.kind {
            NodeKind::Whiteout | NodeKind::Opaque => {
                tw.entry(marker_header(), name, None, Vec::new(), None)?;
            }
            NodeKind::Real { abs, stat } => {
                if stat.kind != FileKind::Dir && stat.nlink > 1 {
                    let key = (stat.dev, stat.ino);
                    if let Some(target) = first_link.get(&key) {
                        let (h, pax) = base_header(stat, EntryType::Link);
                        let target = target.clone();
                        tw.entry(h, name, Some(&target), pax, None)?;
                        continue;
                    }
                    first_link.insert(key, name.to_vec());
                }
                match stat.kind {
                    FileKind::Dir => {
                        let (h, pax) = base_header(stat, EntryType::Directory);
                        let mut dir_name = name.to_vec();
                        dir_name.push(b'/');
                        tw.entry(h, &dir_name, None, pax, None)?;
                    }
                    FileKind::File => {
                        let (mut h, mut pax) = base_header(stat, EntryType::Regular);
                        h.set_size(stat.size);
                        if stat.size > USTAR_MAX_SIZE {
                            pax.push((b"size".to_vec(), stat.size.to_string().into_bytes()));
                        }
                        tw.entry(h, name, None, pax, Some((abs, stat.size)))?;
                    }
                    FileKind::Symlink => {
                        let (h, pax) = base_header(stat, EntryType::Symlink);
                        let target = stat.link.clone().unwrap_or_default();
                        tw.entry(h, name, Some(target.as_bytes()), pax, None)?;
                    }
                    FileKind::Char | FileKind::Block | FileKind::Fifo => {
                        let t = match stat.kind {
                            FileKind::Char => EntryType::Char,
                            FileKind::Block => EntryType::Block,
                            _ => EntryType::Fifo,
                        };
                        let (mut h, pax) = base_header(stat, t);
                        if stat.kind != FileKind::Fifo {
                            let bad_dev = |e| LayerError::BadEntry {
                                blob: abs.clone(),
                                entry: node.rel.to_string_lossy().into_owned(),
                                reason: format!("device number does not fit a tar header: {e}"),
                            };
                            let maj = u32::try_from(major(stat.rdev)).unwrap_or(u32::MAX);
                            let min = u32::try_from(minor(stat.rdev)).unwrap_or(u32::MAX);
                            h.set_device_major(maj).map_err(bad_dev)?;
                            h.set_device_minor(min).map_err(bad_dev)?;
                        }
                        tw.entry(h, name, None, pax, None)?;
                    }
                    FileKind::Socket => {}
                }
            }
        }
    }
    tw.write_raw(&ZERO_BLOCK)?;
    tw.write_raw(&ZERO_BLOCK)?;

    let TarWriter { out, out_path } = tw;
    let tar_hash = out
        .into_inner()
        .map_err(|e| io_err("write layer", &out_path)(e.into_error()))?;
    let diff_id = sha256_hex(tar_hash.sha);
    let mut blob_hash = tar_hash
        .inner
        .finish()
        .map_err(io_err("write layer", &out_path))?;
    blob_hash
        .flush()
        .map_err(io_err("write layer", &out_path))?;
    let size = blob_hash.len;
    let digest = sha256_hex(blob_hash.sha);
    let b3 = blob_hash
        .blake
        .map(|b| b.finalize().to_hex().to_string())
        .unwrap_or_default();
    let file = blob_hash
        .inner
        .into_inner()
        .map_err(|e| io_err("write layer", &out_path)(e.into_error()))?;
    drop(file);

    let final_path = out_dir.join(format!("{b3}.{}", compression.extension()));
    fs::rename(&tmp.path, &final_path).map_err(io_err("rename layer to", &final_path))?;
    let mut tmp = tmp;
    tmp.armed = false;
    Ok(Some(LayerBlob {
        path: final_path,
        media_type: compression.media_type().to_string(),
        digest: format!("sha256:{digest}"),
        diff_id: format!("sha256:{diff_id}"),
        blake3: b3,
        size,
    }))
}

/// Archives the changes an overlay upper directory records, as an OCI layer: regular files,
/// dirs, symlinks, hard links (same inode twice -> tar hard link), devices/fifos, modes, uid/gid,
/// mtimes, xattrs (PAX SCHILY.xattr.*, except trusted.overlay.*). An overlay whiteout (char
/// device 0/0) becomes `.wh.<name>`; an opaque directory (xattr trusted.overlay.opaque=y, or
/// user.overlay.opaque) gets a `.wh..wh..opq` entry. Entries are sorted by path, parents first,
/// so the same tree always gives the same bytes. Returns Ok(None) when the upper dir holds no change.
///
/// Sockets are skipped (as Docker does). An upper dir written with overlay's `redirect_dir` or
/// `metacopy` features is refused: its changes are not all in the upper dir.
///
/// `lowers` are the overlay's lower dirs, top first. A directory that overlay only copied up
/// (the step created and removed something inside it, or a mount point stub was cleaned up)
/// and whose metadata equals the lower one is left out unless something below it changed, as
/// BuildKit's overlay differ does.
pub fn write_layer_from_upper(
    upper: &Path,
    lowers: &[PathBuf],
    out_dir: &Path,
    compression: Compression,
) -> Result<Option<LayerBlob>, LayerError> {
    let mut nodes = Vec::new();
    walk_upper(upper, Path::new(""), None, &mut nodes)?;
    skip_copied_up_dirs(&mut nodes, lowers)?;
    close_emission(&mut nodes);
    write_nodes(&nodes, out_dir, compression)
}

/// The same from two full trees (the copying fallback): `before` is the rootfs before the step,
/// `after` the rootfs after it. Changed or new entries are archived (type, mode, uid, gid, size,
/// mtime to the nanosecond, link target, device number and xattrs are compared, and the content
/// of regular files whose metadata all match), removed ones become whiteouts. Ok(None) when
/// nothing changed.
///
/// Parents of changed entries are included, and when one path of a hard-linked file changes
/// all its paths are archived, as overlay's copy-up would.
pub fn write_layer_from_diff(
    before: &Path,
    after: &Path,
    out_dir: &Path,
    compression: Compression,
) -> Result<Option<LayerBlob>, LayerError> {
    let tree = TreeBefore { root: before };
    let before_is_dir = fs::symlink_metadata(before)
        .map_err(io_err("stat", before))?
        .is_dir();
    let mut nodes = Vec::new();
    walk_diff(&tree, before_is_dir, after, Path::new(""), None, &mut nodes)?;
    close_emission(&mut nodes);
    write_nodes(&nodes, out_dir, compression)
}

/// The same as [`write_layer_from_diff`] against a [`Manifest`] taken earlier of `after`.
pub(crate) fn write_layer_from_manifest(
    before: &Manifest,
    after: &Path,
    out_dir: &Path,
    compression: Compression,
) -> Result<Option<LayerBlob>, LayerError> {
    let mut nodes = Vec::new();
    walk_diff(before, true, after, Path::new(""), None, &mut nodes)?;
    close_emission(&mut nodes);
    write_nodes(&nodes, out_dir, compression)
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// How [`unpack_layer`] treats whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackMode {
    /// Into an empty dir to serve as an overlay lower dir: `.wh.x` -> char device 0/0 named x,
    /// `.wh..wh..opq` -> xattr trusted.overlay.opaque=y on the dir.
    OverlayLower,
    /// Onto an existing tree (copying fallback): `.wh.x` deletes x, `.wh..wh..opq` empties the dir
    /// of what lower layers put there.
    Apply,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Opens a blob and returns its uncompressed stream.
fn open_decompressed(blob: &Path) -> Result<Box<dyn Read>, LayerError> {
    let mut file = File::open(blob).map_err(io_err("open", blob))?;
    let mut magic = [0u8; 8];
    let n = read_full(&mut file, &mut magic).map_err(io_err("read", blob))?;
    let head = magic.get(..n).unwrap_or(&[]).to_vec();
    let stream = io::Cursor::new(head.clone()).chain(file);
    if head.starts_with(GZIP_MAGIC) {
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(256 * 1024, stream),
        )));
    }
    if head.starts_with(ZSTD_MAGIC) {
        let decoder = zstd::stream::read::Decoder::new(stream).map_err(io_err("open", blob))?;
        return Ok(Box::new(decoder));
    }
    // xz, bzip2 and other compressors: refuse them by name rather than as a corrupt tar.
    let known_other: &[&[u8]] = &[&[0xfd, b'7', b'z', b'X', b'Z'], b"BZh"];
    if n == 0 || known_other.iter().any(|m| head.starts_with(m)) {
        let magic = head.iter().map(|b| format!("{b:02x}")).collect::<String>();
        if n == 0 {
            return Err(LayerError::Truncated {
                blob: blob.to_path_buf(),
                offset: 0,
            });
        }
        return Err(LayerError::UnknownCompression {
            blob: blob.to_path_buf(),
            magic,
        });
    }
    Ok(Box::new(io::BufReader::with_capacity(256 * 1024, stream)))
}

/// Unpacks a layer (gzip, zstd or plain tar, detected from the magic bytes) into `dest`, keeping
/// owners, modes, mtimes, xattrs, hard links, symlinks, devices. Refuses entries that escape
/// `dest` (`..`, absolute paths, writes through a symlink pointing out): error naming the entry.
/// Returns the diff_id ("sha256:<hex>" of the uncompressed tar) computed while reading; a
/// truncated or corrupt stream is an error, never a partial success.
///
/// Symlinks met on the way to an entry are followed as inside a chroot at `dest` (an absolute
/// target such as `/usr/lib` means `dest/usr/lib`); a relative target climbing above `dest` is
/// an escape. Directories missing from the archive are created with mode 0755, owned by root.
/// Xattrs the destination filesystem does not support are skipped with a warning.
pub fn unpack_layer(blob: &Path, dest: &Path, mode: UnpackMode) -> Result<String, LayerError> {
    let stream = open_decompressed(blob)?;
    let reader = HashingReader {
        inner: stream,
        sha: Sha256::new(),
        len: 0,
    };
    let mut unpacker = Unpacker {
        blob,
        dest,
        mode,
        written: HashSet::new(),
        opaque: Vec::new(),
        dir_times: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut end_of_entries: u64 = 0;
    {
        let entries = archive.entries().map_err(|source| LayerError::Stream {
            blob: blob.to_path_buf(),
            offset: 0,
            source,
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| LayerError::Stream {
                blob: blob.to_path_buf(),
                offset: end_of_entries,
                source,
            })?;
            let size = entry.size();
            end_of_entries = entry
                .raw_file_position()
                .saturating_add(size.div_ceil(BLOCK).saturating_mul(BLOCK));
            unpacker.entry(&mut entry)?;
        }
    }
    let mut reader = archive.into_inner();
    // The tar reader stops at the first zero block; without one, the stream was cut short.
    if reader.len < end_of_entries + BLOCK {
        return Err(LayerError::Truncated {
            blob: blob.to_path_buf(),
            offset: reader.len,
        });
    }
    // The end-of-archive marker is two zero blocks.
    let mut second = [0u8; BLOCK as usize];
    let got = read_full(&mut reader, &mut second).map_err(|source| LayerError::Stream {
        blob: blob.to_path_buf(),
        offset: reader.len,
        source,
    })?;
    if got < second.len() {
        return Err(LayerError::Truncated {
            blob: blob.to_path_buf(),
            offset: reader.len,
        });
    }
    if second.iter().any(|&b| b != 0) {
        return Err(LayerError::Stream {
            blob: blob.to_path_buf(),
            offset: reader.len - BLOCK,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "the end-of-archive marker's second block is not zero",
            ),
        });
    }
    // The rest (record padding, the compressor's trailer) is part of the diff_id and of the
    // integrity checks.
    let consumed = reader.len;
    io::copy(&mut reader, &mut io::sink()).map_err(|source| LayerError::Stream {
        blob: blob.to_path_buf(),
        offset: consumed,
        source,
    })?;
    unpacker.finish()?;
    Ok(format!("sha256:{}", sha256_hex(reader.sha)))
}

/// Splits an archive path into normal components; `..` and absolute paths are refused.
fn split_entry_path(raw: &[u8]) -> Result<Vec<OsString>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".to_string());
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("`..` component".to_string()),
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

/// Parses a PAX time (`seconds[.fraction]`).
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    let mut scale = 100_000_000;
    for c in frac.chars().take(9) {
        nanos += c.to_digit(10)? * scale;
        scale /= 10;
    }
    if secs < 0 && nanos > 0 {
        // -1.5 means 1.5 s before the epoch.
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

struct Unpacker<'a> {
    blob: &'a Path,
    dest: &'a Path,
    mode: UnpackMode,
    /// Real paths (relative to dest) this layer created or overwrote.
    written: HashSet<PathBuf>,
    /// Real paths of directories this layer marked opaque (Apply mode).
    opaque: Vec<PathBuf>,
    /// Directory times to set once nothing more is written into them.
    dir_times: Vec<(PathBuf, FileTime)>,
}

/// Metadata of an entry, read from its header and PAX records.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: FileTime,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Unpacker<'_> {
    fn bad(&self, entry: &str, reason: impl Into<String>) -> LayerError {
        LayerError::BadEntry {
            blob: self.blob.to_path_buf(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn escape(&self, entry: &str, reason: impl Into<String>) -> LayerError {
        LayerError::Escape {
            blob: self.blob.to_path_buf(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn fs_err<'b>(
        &'b self,
        entry: &'b str,
        op: &'static str,
        path: &'b Path,
    ) -> impl FnOnce(io::Error) -> LayerError + 'b {
        move |source| LayerError::Unpack {
            blob: self.blob.to_path_buf(),
            entry: entry.to_string(),
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Resolves the directory `comps` inside dest to its real path (relative, free of
    /// symlinks), following symlinks as in a chroot at dest. Missing directories are created
    /// when `create` is set; otherwise a missing one is an error.
    fn resolve_dir(
        &mut self,
        comps: &[OsString],
        entry: &str,
        create: bool,
    ) -> Result<PathBuf, LayerError> {
        let mut real: Vec<OsString> = Vec::new();
        let mut queue: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(comp) = queue.pop_front() {
            match comp.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    if real.pop().is_none() {
                        return Err(
                            self.escape(entry, "a symlink on its path leads above the root")
                        );
                    }
                    continue;
                }
                _ => {}
            }
            let mut rel: PathBuf = real.iter().collect();
            rel.push(&comp);
            let abs = self.dest.join(&rel);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => real.push(comp),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(self.bad(entry, "too many levels of symlinks on its path"));
                    }
                    let target =
                        fs::read_link(&abs).map_err(self.fs_err(entry, "read symlink", &abs))?;
                    if target.is_absolute() {
                        real.clear();
                    }
                    let mut new_queue: VecDeque<OsString> = target
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .collect();
                    new_queue.extend(queue.drain(..));
                    queue = new_queue;
                }
                Ok(_) => {
                    return Err(self.bad(entry, format!("{} is not a directory", rel.display())));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&abs)
                        .map_err(self.fs_err(entry, "create directory", &abs))?;
                    self.written.insert(rel);
                    real.push(comp);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(self.bad(entry, format!("{} does not exist", rel.display())));
                }
                Err(e) => return Err(self.fs_err(entry, "stat", &abs)(e)),
            }
        }
        Ok(real.iter().collect())
    }

    /// Removes whatever is at `abs` (not following a symlink); true if something was there.
    fn remove_existing(&self, abs: &Path, entry: &str, keep_dir: bool) -> Result<bool, LayerError> {
        match fs::symlink_metadata(abs) {
            Ok(m) if m.is_dir() => {
                if keep_dir {
                    return Ok(true);
                }
                fs::remove_dir_all(abs).map_err(self.fs_err(entry, "remove", abs))?;
                Ok(false)
            }
            Ok(_) => {
                fs::remove_file(abs).map_err(self.fs_err(entry, "remove", abs))?;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.fs_err(entry, "stat", abs)(e)),
        }
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<EntryMeta, LayerError> {
        let h = entry.header();
        let old = h.as_old();
        // Go's reader (and so Docker) reads a blank numeric field as 0; some writers leave
        // uid, gid or mtime blank.
        let numeric = |field: &str, raw: &[u8], value: io::Result<u64>| match value {
            Ok(v) => Ok(v),
            Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            Err(e) => Err(self.bad(name, format!("bad {field}: {e}"))),
        };
        let mode = numeric("mode", &old.mode, h.mode().map(u64::from))? as u32 & 0o7777;
        let uid = numeric("uid", &old.uid, h.uid())?;
        let gid = numeric("gid", &old.gid, h.gid())?;
        let uid = u32::try_from(uid).map_err(|_| self.bad(name, format!("uid {uid} too large")))?;
        let gid = u32::try_from(gid).map_err(|_| self.bad(name, format!("gid {gid} too large")))?;
        let header_mtime = numeric("mtime", &old.mtime, h.mtime())?;
        let mut mtime =
            FileTime::from_unix_time(i64::try_from(header_mtime).unwrap_or(i64::MAX), 0);
        let mut xattrs = Vec::new();
        let pax = entry
            .pax_extensions()
            .map_err(|e| self.bad(name, format!("bad PAX header: {e}")))?;
        if let Some(pax) = pax {
            for ext in pax {
                let ext = ext.map_err(|e| self.bad(name, format!("bad PAX record: {e}")))?;
                let Ok(key) = ext.key() else { continue };
                if let Some(xname) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((xname.to_string(), ext.value_bytes().to_vec()));
                } else if key == "mtime"
                    && let Some((s, ns)) = parse_pax_time(ext.value_bytes())
                {
                    mtime = FileTime::from_unix_time(s, ns);
                }
            }
        }
        Ok(EntryMeta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// Owner, mode, xattrs and (for non-directories) times of a created entry.
    fn apply_meta(
        &mut self,
        abs: &Path,
        meta: &EntryMeta,
        is_symlink: bool,
        is_dir: bool,
        entry: &str,
    ) -> Result<(), LayerError> {
        std::os::unix::fs::lchown(abs, Some(meta.uid), Some(meta.gid))
            .map_err(self.fs_err(entry, "chown", abs))?;
        if !is_symlink {
            // After chown, which clears setuid and setgid.
            fs::set_permissions(abs, fs::Permissions::from_mode(meta.mode))
                .map_err(self.fs_err(entry, "chmod", abs))?;
        }
        for (name, value) in &meta.xattrs {
            if is_overlay_xattr(OsStr::new(name)) {
                continue;
            }
            match xattr::set(abs, name, value) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTSUP) => {
                    tracing::warn!(entry, xattr = %name, path = %abs.display(),
                        "filesystem does not support this xattr; skipped");
                }
                Err(e) => return Err(self.fs_err(entry, "set xattr on", abs)(e)),
            }
        }
        if is_dir {
            self.dir_times.push((abs.to_path_buf(), meta.mtime));
        } else {
            filetime::set_symlink_file_times(abs, meta.mtime, meta.mtime).map_err(self.fs_err(
                entry,
                "set times of",
                abs,
            ))?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), LayerError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let entry_type = entry.header().entry_type();
        if matches!(
            entry_type,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let comps = split_entry_path(&raw).map_err(|r| self.escape(&name, r))?;
        let Some((base, parents)) = comps.split_last() else {
            // The root itself: dest keeps its own metadata.
            return Ok(());
        };
        let base_bytes = base.as_bytes();

        if let Some(target) = base_bytes.strip_prefix(WHITEOUT_PREFIX) {
            let parent = self.resolve_dir(parents, &name, true)?;
            if base_bytes == OPAQUE_MARKER {
                return self.opaque_marker(&parent, &name);
            }
            if base_bytes.starts_with(WHITEOUT_META_PREFIX) {
                // AUFS bookkeeping (hard-link directories and the like), not image content.
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(self.bad(&name, "whiteout without a valid name"));
            }
            return self.whiteout(&parent.join(OsStr::from_bytes(target)), &name);
        }

        let parent = self.resolve_dir(parents, &name, true)?;
        let rel = parent.join(base);
        let abs = self.dest.join(&rel);
        let meta = self.meta(entry, &name)?;
        match entry_type {
            EntryType::Directory => {
                let exists = self.remove_existing(&abs, &name, true)?;
                if !exists {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&abs)
                        .map_err(self.fs_err(&name, "create directory", &abs))?;
                }
                self.written.insert(rel);
                self.apply_meta(&abs, &meta, false, true, &name)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove_existing(&abs, &name, false)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&abs)
                    .map_err(self.fs_err(&name, "create", &abs))?;
                let expected = entry.size();
                let copied = io::copy(entry, &mut file).map_err(|e| {
                    if e.kind() == io::ErrorKind::StorageFull
                        || e.kind() == io::ErrorKind::WriteZero
                    {
                        self.fs_err(&name, "write", &abs)(e)
                    } else {
                        LayerError::Stream {
                            blob: self.blob.to_path_buf(),
                            offset: entry.raw_file_position(),
                            source: e,
                        }
                    }
                })?;
                if entry_type != EntryType::GNUSparse && copied != expected {
                    return Err(LayerError::Truncated {
                        blob: self.blob.to_path_buf(),
                        offset: entry.raw_file_position() + copied,
                    });
                }
                drop(file);
                self.written.insert(rel);
                self.apply_meta(&abs, &meta, false, false, &name)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.bad(&name, "symlink without a target"))?
                    .into_owned();
                self.remove_existing(&abs, &name, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs)
                    .map_err(self.fs_err(&name, "create symlink", &abs))?;
                self.written.insert(rel);
                self.apply_meta(&abs, &meta, true, false, &name)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.bad(&name, "hard link without a target"))?
                    .into_owned();
                let target_comps = split_entry_path(&target)
                    .map_err(|r| self.escape(&name, format!("hard link target: {r}")))?;
                let Some((target_base, target_parents)) = target_comps.split_last() else {
                    return Err(self.bad(&name, "hard link to the root"));
                };
                let target_parent = self.resolve_dir(target_parents, &name, false)?;
                let target_abs = self.dest.join(target_parent.join(target_base));
                match fs::symlink_metadata(&target_abs) {
                    Ok(m) if m.is_dir() => {
                        return Err(self.bad(&name, "hard link to a directory"));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(self.fs_err(&name, "stat link target", &target_abs)(e)),
                }
                if target_abs == abs {
                    return Ok(());
                }
                self.remove_existing(&abs, &name, false)?;
                fs::hard_link(&target_abs, &abs).map_err(self.fs_err(&name, "hard link", &abs))?;
                self.written.insert(rel);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let h = entry.header();
                let (kind, dev) = if entry_type == EntryType::Fifo {
                    (SFlag::S_IFIFO, 0)
                } else {
                    let maj = h
                        .device_major()
                        .map_err(|e| self.bad(&name, format!("bad device major: {e}")))?
                        .unwrap_or(0);
                    let min = h
                        .device_minor()
                        .map_err(|e| self.bad(&name, format!("bad device minor: {e}")))?
                        .unwrap_or(0);
                    let kind = if entry_type == EntryType::Char {
                        SFlag::S_IFCHR
                    } else {
                        SFlag::S_IFBLK
                    };
                    (kind, makedev(u64::from(maj), u64::from(min)))
                };
                self.remove_existing(&abs, &name, false)?;
                mknod(&abs, kind, Mode::from_bits_truncate(0o600), dev).map_err(|e| {
                    self.fs_err(&name, "mknod", &abs)(io::Error::from_raw_os_error(e as i32))
                })?;
                self.written.insert(rel);
                self.apply_meta(&abs, &meta, false, false, &name)?;
            }
            other => {
                return Err(self.bad(
                    &name,
                    format!("unsupported entry type {:?}", other.as_byte() as char),
                ));
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, entry: &str) -> Result<(), LayerError> {
        let abs = self.dest.join(rel);
        match self.mode {
            UnpackMode::Apply => {
                self.remove_existing(&abs, entry, false)?;
            }
            UnpackMode::OverlayLower => {
                self.remove_existing(&abs, entry, false)?;
                mknod(&abs, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(|e| {
                    self.fs_err(entry, "create whiteout", &abs)(io::Error::from_raw_os_error(
                        e as i32,
                    ))
                })?;
                zero_times(&abs)?;
                self.written.insert(rel.to_path_buf());
            }
        }
        Ok(())
    }

    fn opaque_marker(&mut self, dir: &Path, entry: &str) -> Result<(), LayerError> {
        match self.mode {
            UnpackMode::Apply => self.opaque.push(dir.to_path_buf()),
            UnpackMode::OverlayLower => {
                let abs = self.dest.join(dir);
                xattr::set(&abs, OVERLAY_OPAQUE, b"y").map_err(self.fs_err(
                    entry,
                    "set trusted.overlay.opaque on",
                    &abs,
                ))?;
            }
        }
        Ok(())
    }

    /// Removes from `rel` (an opaque directory) everything this layer did not write.
    fn prune(&self, rel: &Path) -> Result<(), LayerError> {
        let abs = self.dest.join(rel);
        for name in read_dir_sorted(&abs)? {
            let child_rel = rel.join(&name);
            let child_abs = abs.join(&name);
            let entry = child_rel.to_string_lossy();
            if self.written.contains(&child_rel) {
                let m = fs::symlink_metadata(&child_abs).map_err(io_err("stat", &child_abs))?;
                if m.is_dir() {
                    self.prune(&child_rel)?;
                }
            } else {
                self.remove_existing(&child_abs, &entry, false)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), LayerError> {
        let opaque = std::mem::take(&mut self.opaque);
        for dir in &opaque {
            self.prune(dir)?;
        }
        // Children first: setting a child's time does not touch its parent's, but creating
        // entries did, so set every directory's time once all writing is done.
        for (abs, mtime) in self.dir_times.iter().rev() {
            filetime::set_symlink_file_times(abs, *mtime, *mtime)
                .map_err(io_err("set times of", abs))?;
        }
        Ok(())
    }
}

/// Decompresses a blob to a plain tar at `out`, verifying the stream decodes to its end, and
/// returns the diff_id of the tar.
pub(crate) fn decompress_layer(blob: &Path, out: &Path) -> Result<String, LayerError> {
    let stream = open_decompressed(blob)?;
    let mut reader = HashingReader {
        inner: stream,
        sha: Sha256::new(),
        len: 0,
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io_err("create", out))?;
    let mut w = BufWriter::with_capacity(256 * 1024, file);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(|source| LayerError::Stream {
            blob: blob.to_path_buf(),
            offset: reader.len,
            source,
        })?;
        if n == 0 {
            break;
        }
        w.write_all(buf.get(..n).unwrap_or(&buf))
            .map_err(io_err("write", out))?;
    }
    w.flush().map_err(io_err("write", out))?;
    if reader.len < 2 * BLOCK {
        return Err(LayerError::Truncated {
            blob: blob.to_path_buf(),
            offset: reader.len,
        });
    }
    Ok(format!("sha256:{}", sha256_hex(reader.sha)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    /// What a test compares about one entry of a tree.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Desc {
        pub kind: String,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub mtime: i64,
        pub content: Option<Vec<u8>>,
        pub link: Option<OsString>,
        pub rdev: u64,
        pub xattrs: Vec<(OsString, Vec<u8>)>,
        /// The first path (in sorted order) with the same inode, for hard links.
        pub same_inode_as: Option<PathBuf>,
    }

    /// Describes every entry under `root` (the root itself excluded), by relative path.
    pub(crate) fn describe(root: &Path) -> BTreeMap<PathBuf, Desc> {
        let manifest = Manifest::of_tree(root).unwrap();
        let mut paths: Vec<&PathBuf> = manifest
            .entries
            .keys()
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        paths.sort();
        let mut first_by_inode: HashMap<u64, PathBuf> = HashMap::new();
        let mut out = BTreeMap::new();
        for rel in paths {
            let st = &manifest.entries[rel];
            let same_inode_as = if st.kind != FileKind::Dir && st.nlink > 1 {
                let first = first_by_inode.entry(st.ino).or_insert_with(|| rel.clone());
                (first != rel).then(|| first.clone())
            } else {
                None
            };
            let content = (st.kind == FileKind::File).then(|| fs::read(root.join(rel)).unwrap());
            out.insert(
                rel.clone(),
                Desc {
                    kind: format!("{:?}", st.kind),
                    mode: st.mode,
                    uid: st.uid,
                    gid: st.gid,
                    mtime: st.mtime,
                    content,
                    link: st.link.clone(),
                    rdev: if matches!(st.kind, FileKind::Char | FileKind::Block) {
                        st.rdev
                    } else {
                        0
                    },
                    xattrs: st.xattrs.clone(),
                    same_inode_as,
                },
            );
        }
        out
    }

    pub(crate) fn write_file(path: &Path, content: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, content).unwrap();
    }

    pub(crate) fn set_mtime(path: &Path, secs: i64) {
        let t = FileTime::from_unix_time(secs, 0);
        filetime::set_symlink_file_times(path, t, t).unwrap();
    }

    /// Sets every mtime under `root` to `secs`, children before parents.
    pub(crate) fn set_all_mtimes(root: &Path, secs: i64) {
        for name in read_dir_sorted(root).unwrap() {
            let p = root.join(name);
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                set_all_mtimes(&p, secs);
            }
            set_mtime(&p, secs);
        }
    }

    /// A tree with one of everything a layer must carry.
    fn build_rich_tree(root: &Path) {
        fs::create_dir_all(root).unwrap();
        let dir = root.join("dir");
        fs::create_dir(&dir).unwrap();
        write_file(&dir.join("file.txt"), b"hello world\n");
        write_file(&dir.join("setuid"), b"#!/bin/sh\n");
        fs::set_permissions(dir.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
        symlink("file.txt", dir.join("rel-link")).unwrap();
        symlink("/etc/passwd", dir.join("abs-link")).unwrap();
        write_file(&dir.join("hard1"), b"shared inode");
        fs::hard_link(dir.join("hard1"), dir.join("hard2")).unwrap();
        fs::create_dir(root.join("other")).unwrap();
        fs::hard_link(dir.join("hard1"), root.join("other/hard3")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        mknod(
            &root.join("null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .unwrap();
        mknod(
            &root.join("loop9"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            makedev(7, 9),
        )
        .unwrap();
        write_file(&root.join("xattrs"), b"x");
        xattr::set(root.join("xattrs"), "user.test", b"value").unwrap();
        xattr::set(root.join("xattrs"), "trusted.binary", &[0, 1, 2, 255]).unwrap();
        let long = root
            .join("a".repeat(60))
            .join("b".repeat(60))
            .join("c".repeat(120));
        write_file(&long, b"deep");
        symlink("t".repeat(150), root.join("long-target")).unwrap();
        write_file(&root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name");
        write_file(&root.join("owned"), b"owner");
        std::os::unix::fs::lchown(root.join("owned"), Some(3_000_000), Some(1001)).unwrap();
        std::os::unix::fs::lchown(&dir, Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::lchown(dir.join("rel-link"), Some(1000), Some(1000)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        fs::create_dir(root.join("tmp")).unwrap();
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::create_dir(root.join("empty")).unwrap();
        set_all_mtimes(root, 1_600_000_000);
        set_mtime(&dir.join("file.txt"), 1_700_000_123);
    }

    fn sha256_of(bytes: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(bytes);
        sha256_hex(h)
    }

    fn decompressed(blob: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        open_decompressed(blob)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// The entry names of a layer, in archive order.
    pub(crate) fn entry_names(blob: &Path) -> Vec<String> {
        let mut archive = tar::Archive::new(open_decompressed(blob).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
            .collect()
    }

    fn check_identities(blob: &LayerBlob, compression: Compression) {
        let bytes = fs::read(&blob.path).unwrap();
        assert_eq!(blob.size, bytes.len() as u64);
        assert_eq!(blob.digest, format!("sha256:{}", sha256_of(&bytes)));
        assert_eq!(blob.blake3, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!(
            blob.diff_id,
            format!("sha256:{}", sha256_of(&decompressed(&blob.path)))
        );
        assert_eq!(blob.media_type, compression.media_type());
        assert_eq!(
            blob.path.file_name().unwrap().to_string_lossy(),
            format!("{}.{}", blob.blake3, compression.extension())
        );
    }

    #[test]
    fn round_trip_keeps_every_kind_of_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        build_rich_tree(&tree);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let original = describe(&tree);
        assert!(original.len() > 15, "{original:#?}");

        for compression in [
            Compression::Gzip,
            Compression::Zstd,
            Compression::Uncompressed,
        ] {
            let out = tmp.path().join(format!("out-{compression:?}"));
            let blob = write_layer_from_diff(&empty, &tree, &out, compression)
                .unwrap()
                .unwrap();
            check_identities(&blob, compression);
            for mode in [UnpackMode::Apply, UnpackMode::OverlayLower] {
                let dest = tmp
                    .path()
                    .join(format!("unpacked-{compression:?}-{mode:?}"));
                fs::create_dir(&dest).unwrap();
                let diff_id = unpack_layer(&blob.path, &dest, mode).unwrap();
                assert_eq!(diff_id, blob.diff_id);
                let unpacked = describe(&dest);
                for (path, desc) in &original {
                    assert_eq!(unpacked.get(path), Some(desc), "{}", path.display());
                }
                assert_eq!(unpacked.len(), original.len());
            }
        }
    }

    #[test]
    fn upper_and_diff_of_the_same_tree_give_the_same_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        build_rich_tree(&tree);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let out = tmp.path().join("out");
        let a = write_layer_from_upper(&tree, &[], &out, Compression::Gzip)
            .unwrap()
            .unwrap();
        let b = write_layer_from_diff(&empty, &tree, &out, Compression::Gzip)
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        let names = entry_names(&a.path);
        // Directories before their contents, siblings sorted, directories named with a slash.
        let dir_pos = names.iter().position(|n| n == "dir/").unwrap();
        let file_pos = names.iter().position(|n| n == "dir/file.txt").unwrap();
        assert!(dir_pos < file_pos);
        let top: Vec<&String> = names
            .iter()
            .filter(|n| !n.trim_end_matches('/').contains('/'))
            .collect();
        let sorted = {
            let mut s = top.clone();
            s.sort_by_key(|n| n.trim_end_matches('/').to_string());
            s
        };
        assert_eq!(top, sorted);
    }

    #[test]
    fn gnu_tar_reads_our_layers() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        build_rich_tree(&tree);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let blob = write_layer_from_diff(&empty, &tree, &tmp.path().join("out"), Compression::Gzip)
            .unwrap()
            .unwrap();
        let dest = tmp.path().join("gnu");
        fs::create_dir(&dest).unwrap();
        let status = std::process::Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpzf"])
            .arg(&blob.path)
            .arg("-C")
            .arg(&dest)
            .status()
            .expect("GNU tar is needed: apt-get install tar");
        assert!(status.success());
        let theirs = describe(&dest);
        let ours = describe(&tree);
        for (path, desc) in &ours {
            let got = theirs
                .get(path)
                .unwrap_or_else(|| panic!("{} missing", path.display()));
            assert_eq!(got, desc, "{}", path.display());
        }
    }

    #[test]
    fn upper_whiteouts_and_opaque_dirs_become_markers_and_back() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir(&upper).unwrap();
        mknod(
            &upper.join("gone"),
            SFlag::S_IFCHR,
            Mode::empty(),
            makedev(0, 0),
        )
        .unwrap();
        fs::create_dir(upper.join("opq")).unwrap();
        xattr::set(upper.join("opq"), OVERLAY_OPAQUE, b"y").unwrap();
        xattr::set(upper.join("opq"), "trusted.overlay.origin", b"whatever").unwrap();
        write_file(&upper.join("opq/new"), b"new");
        write_file(&upper.join("keep/f"), b"changed");
        // overlay shares one whiteout inode between several whiteouts.
        fs::create_dir(upper.join("sub")).unwrap();
        fs::hard_link(upper.join("gone"), upper.join("sub/also-gone")).unwrap();
        set_all_mtimes(&upper, 1_650_000_000);

        let out = tmp.path().join("out");
        let blob = write_layer_from_upper(&upper, &[], &out, Compression::Zstd)
            .unwrap()
            .unwrap();
        assert_eq!(
            entry_names(&blob.path),
            [
                ".wh.gone",
                "keep/",
                "keep/f",
                "opq/",
                "opq/.wh..wh..opq",
                "opq/new",
                "sub/",
                "sub/.wh.also-gone"
            ]
        );
        // overlay's own xattrs stay out of the layer.
        let mut archive = tar::Archive::new(open_decompressed(&blob.path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if let Some(pax) = entry.pax_extensions().unwrap() {
                for ext in pax {
                    assert!(!ext.unwrap().key().unwrap().contains("overlay"));
                }
            }
        }

        // As an overlay lower dir: the markers become what overlayfs reads.
        let lower = tmp.path().join("lower");
        fs::create_dir(&lower).unwrap();
        unpack_layer(&blob.path, &lower, UnpackMode::OverlayLower).unwrap();
        let gone = Stat::read(&lower.join("gone")).unwrap();
        assert!(gone.is_whiteout());
        assert!(
            Stat::read(&lower.join("sub/also-gone"))
                .unwrap()
                .is_whiteout()
        );
        assert!(Stat::read(&lower.join("opq")).unwrap().is_opaque());
        assert!(!Stat::read(&lower.join("keep")).unwrap().is_opaque());

        // Applied on a tree: the markers delete.
        let tree = tmp.path().join("tree");
        write_file(&tree.join("gone"), b"old");
        write_file(&tree.join("opq/old"), b"old");
        write_file(&tree.join("opq/deep/x"), b"old");
        write_file(&tree.join("keep/f"), b"old");
        write_file(&tree.join("keep/other"), b"untouched");
        write_file(&tree.join("sub/also-gone/inside"), b"old");
        unpack_layer(&blob.path, &tree, UnpackMode::Apply).unwrap();
        let names: Vec<PathBuf> = describe(&tree).into_keys().collect();
        let expected: Vec<PathBuf> = ["keep", "keep/f", "keep/other", "opq", "opq/new", "sub"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(names, expected);
        assert_eq!(fs::read(tree.join("keep/f")).unwrap(), b"changed");
    }

    #[test]
    fn opaque_marker_after_children_keeps_this_layers_children() {
        // A writer may put the marker anywhere in the directory; only lower content goes.
        let tmp = tempfile::tempdir().unwrap();
        let tar_path = tmp.path().join("layer.tar");
        let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "d", io::empty()).unwrap();
        let mut h = Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, "d/new", &b"new"[..]).unwrap();
        let mut h = Header::new_ustar();
        h.set_size(0);
        b.append_data(&mut h, "d/.wh..wh..opq", io::empty())
            .unwrap();
        b.into_inner().unwrap();
        let tree = tmp.path().join("tree");
        write_file(&tree.join("d/old"), b"old");
        unpack_layer(&tar_path, &tree, UnpackMode::Apply).unwrap();
        let names: Vec<PathBuf> = describe(&tree).into_keys().collect();
        assert_eq!(names, [PathBuf::from("d"), PathBuf::from("d/new")]);
    }

    #[test]
    fn empty_changes_give_none() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir(&upper).unwrap();
        let out = tmp.path().join("out");
        assert_eq!(
            write_layer_from_upper(&upper, &[], &out, Compression::Gzip).unwrap(),
            None
        );
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        build_rich_tree(&a);
        build_rich_tree(&b);
        assert_eq!(
            write_layer_from_diff(&a, &b, &out, Compression::Gzip).unwrap(),
            None
        );
        // Nothing was left behind in the output directory.
        assert!(!out.exists() || fs::read_dir(&out).unwrap().next().is_none());
    }

    #[test]
    fn same_tree_gives_same_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        build_rich_tree(&a);
        build_rich_tree(&b);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        for compression in [
            Compression::Gzip,
            Compression::Zstd,
            Compression::Uncompressed,
        ] {
            let first = write_layer_from_diff(&empty, &a, &tmp.path().join("o1"), compression)
                .unwrap()
                .unwrap();
            let again = write_layer_from_diff(&empty, &a, &tmp.path().join("o2"), compression)
                .unwrap()
                .unwrap();
            let other = write_layer_from_diff(&empty, &b, &tmp.path().join("o3"), compression)
                .unwrap()
                .unwrap();
            assert_eq!(first.digest, again.digest);
            assert_eq!(first.digest, other.digest);
            assert_eq!(first.diff_id, other.diff_id);
            assert_eq!(first.blake3, other.blake3);
        }
    }

    #[test]
    fn diff_finds_every_kind_of_change() {
        let tmp = tempfile::tempdir().unwrap();
        let before = tmp.path().join("before");
        let after = tmp.path().join("after");
        for root in [&before, &after] {
            write_file(&root.join("same"), b"same");
            write_file(&root.join("content"), b"aaaa");
            write_file(&root.join("mode"), b"m");
            write_file(&root.join("removed"), b"r");
            write_file(&root.join("removed-dir/x"), b"x");
            write_file(&root.join("to-dir"), b"file");
            write_file(&root.join("linked"), b"l");
            write_file(&root.join("xattr"), b"x");
            symlink("a", root.join("retarget")).unwrap();
            set_all_mtimes(root, 1_600_000_000);
        }
        // Same size and mtime, different bytes: only a content comparison sees it.
        fs::write(after.join("content"), b"bbbb").unwrap();
        set_mtime(&after.join("content"), 1_600_000_000);
        fs::set_permissions(after.join("mode"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(after.join("removed")).unwrap();
        fs::remove_dir_all(after.join("removed-dir")).unwrap();
        fs::remove_file(after.join("to-dir")).unwrap();
        write_file(&after.join("to-dir/inside"), b"i");
        fs::hard_link(after.join("linked"), after.join("new-link")).unwrap();
        xattr::set(after.join("xattr"), "user.k", b"v").unwrap();
        fs::remove_file(after.join("retarget")).unwrap();
        symlink("b", after.join("retarget")).unwrap();
        set_all_mtimes(&after, 1_600_000_000);
        set_mtime(&after, 1_600_000_000);
        set_mtime(&before, 1_600_000_000);

        let blob =
            write_layer_from_diff(&before, &after, &tmp.path().join("out"), Compression::Gzip)
                .unwrap()
                .unwrap();
        assert_eq!(
            entry_names(&blob.path),
            [
                ".wh.removed",
                ".wh.removed-dir",
                "content",
                "linked",
                "mode",
                "new-link",
                "retarget",
                "to-dir/",
                "to-dir/inside",
                "xattr"
            ]
        );
        // Applying the layer on `before` gives `after`.
        unpack_layer(&blob.path, &before, UnpackMode::Apply).unwrap();
        assert_eq!(describe(&before), describe(&after));
    }

    /// One raw tar entry: name, type, link name, data.
    type RawEntry<'a> = (&'a [u8], EntryType, &'a [u8], &'a [u8]);

    /// A tar with raw names (the tar crate's builder refuses `..`).
    fn raw_tar(path: &Path, entries: &[RawEntry<'_>]) {
        let mut out = Vec::new();
        for (name, kind, link, data) in entries {
            let mut h = Header::new_ustar();
            let u = h.as_ustar_mut().unwrap();
            u.name[..name.len()].copy_from_slice(name);
            u.linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0; 1024]);
        fs::write(path, out).unwrap();
    }

    #[test]
    fn entries_escaping_the_destination_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = tmp.path().join("a/b/dest");
        let cases: Vec<(&str, Vec<RawEntry<'_>>)> = vec![
            ("../evil", vec![(b"../evil", EntryType::Regular, b"", b"x")]),
            ("/abs", vec![(b"/abs", EntryType::Regular, b"", b"x")]),
            (
                "ok/../../evil",
                vec![(b"ok/../../evil", EntryType::Regular, b"", b"x")],
            ),
            (
                "lnk/evil",
                vec![
                    (b"lnk", EntryType::Symlink, b"../../../outside", b""),
                    (b"lnk/evil", EntryType::Regular, b"", b"x"),
                ],
            ),
            (
                "hard",
                vec![(b"hard", EntryType::Link, b"../../../outside/target", b"")],
            ),
            (
                "up/evil",
                vec![
                    (b"sub", EntryType::Directory, b"", b""),
                    (b"up", EntryType::Symlink, b"sub/../../x", b""),
                    (b"up/evil", EntryType::Regular, b"", b"x"),
                ],
            ),
        ];
        write_file(&outside.join("target"), b"secret");
        for (i, (entry, tar)) in cases.iter().enumerate() {
            let _ = fs::remove_dir_all(&dest);
            fs::create_dir_all(&dest).unwrap();
            let blob = tmp.path().join(format!("evil{i}.tar"));
            raw_tar(&blob, tar);
            for mode in [UnpackMode::Apply, UnpackMode::OverlayLower] {
                let err = unpack_layer(&blob, &dest, mode).unwrap_err();
                assert!(
                    matches!(&err, LayerError::Escape { entry: e, .. } if e == entry),
                    "{entry}: {err}"
                );
                assert!(err.to_string().contains(entry), "{err}");
            }
            assert_eq!(
                fs::read_dir(&outside).unwrap().count(),
                1,
                "something was written outside by {entry}"
            );
            assert!(!tmp.path().join("a/evil").exists() && !tmp.path().join("a/b/evil").exists());
        }
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let marker = format!("strata-layer-test-{}", std::process::id());
        let blob = tmp.path().join("abs.tar");
        let link_target = format!("/{marker}");
        let file_path = b"root-link/file";
        raw_tar(
            &blob,
            &[
                (
                    b"root-link",
                    EntryType::Symlink,
                    link_target.as_bytes(),
                    b"",
                ),
                (file_path, EntryType::Regular, b"", b"inside"),
                // A file replacing a symlink replaces the link, not its target.
                (b"passwd", EntryType::Symlink, b"/etc/passwd", b""),
                (b"passwd", EntryType::Regular, b"", b"mine"),
            ],
        );
        unpack_layer(&blob, &dest, UnpackMode::Apply).unwrap();
        assert_eq!(
            fs::read(dest.join(&marker).join("file")).unwrap(),
            b"inside"
        );
        assert!(!Path::new("/").join(&marker).exists());
        assert_eq!(fs::read(dest.join("passwd")).unwrap(), b"mine");
        assert_ne!(fs::read("/etc/passwd").unwrap(), b"mine");
    }

    fn sample_blob(dir: &Path, compression: Compression) -> LayerBlob {
        let tree = dir.join("tree");
        // Enough incompressible bytes that truncation lands inside the data.
        let mut data = Vec::new();
        let mut x: u32 = 1;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push((x >> 16) as u8);
        }
        write_file(&tree.join("big"), &data);
        write_file(&tree.join("small"), b"small");
        let empty = dir.join("empty");
        fs::create_dir_all(&empty).unwrap();
        write_layer_from_diff(
            &empty,
            &tree,
            &dir.join(format!("out-{compression:?}")),
            compression,
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn corrupt_or_truncated_blobs_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        for compression in [
            Compression::Gzip,
            Compression::Zstd,
            Compression::Uncompressed,
        ] {
            let blob = sample_blob(tmp.path(), compression);
            let bytes = fs::read(&blob.path).unwrap();
            let mut variants: Vec<(String, Vec<u8>)> = vec![
                ("half".into(), bytes[..bytes.len() / 2].to_vec()),
                ("minus 1".into(), bytes[..bytes.len() - 1].to_vec()),
                ("empty".into(), Vec::new()),
            ];
            let mut flipped = bytes.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x55;
            variants.push(("flipped middle".into(), flipped));
            if compression != Compression::Uncompressed {
                let mut trailer = bytes.clone();
                let n = trailer.len();
                trailer[n - 2] ^= 0x01;
                variants.push(("bad checksum".into(), trailer));
            } else {
                // Cut exactly after the last entry's data: every header is intact.
                let end = bytes.len() - 1024;
                variants.push(("no end marker".into(), bytes[..end].to_vec()));
            }
            for (what, content) in variants {
                let path = tmp.path().join("broken");
                fs::write(&path, &content).unwrap();
                let dest = tmp.path().join("dest");
                let _ = fs::remove_dir_all(&dest);
                fs::create_dir(&dest).unwrap();
                let result = unpack_layer(&path, &dest, UnpackMode::Apply);
                match result {
                    Err(e) => assert!(e.to_string().contains("broken"), "{e}"),
                    Ok(d)
                        if compression == Compression::Uncompressed && what == "flipped middle" =>
                    {
                        // A flipped data byte in a plain tar still reads; only the digest tells.
                        assert_ne!(d, blob.diff_id);
                    }
                    Ok(d) => panic!("{compression:?} {what}: unpacked with diff_id {d}"),
                }
            }
        }
    }

    #[test]
    fn pax_times_and_records() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
        let mut rec = Vec::new();
        pax_record(&mut rec, b"path", &[b'a'; 93]);
        // 3 digits + space + "path=" + 93 + newline = 103
        assert!(rec.starts_with(b"103 path="));
        assert_eq!(rec.len(), 103);
        let mut rec = Vec::new();
        pax_record(&mut rec, b"k", b"v");
        assert_eq!(rec, b"6 k=v\n");
    }

    #[test]
    fn pax_mtime_with_fraction_is_honoured() {
        let tmp = tempfile::tempdir().unwrap();
        let tar_path = tmp.path().join("layer.tar");
        let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
        b.append_pax_extensions([("mtime", &b"1700000000.25"[..])])
            .unwrap();
        let mut h = Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(1);
        b.append_data(&mut h, "f", &b"f"[..]).unwrap();
        b.into_inner().unwrap();
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        unpack_layer(&tar_path, &dest, UnpackMode::Apply).unwrap();
        let m = fs::metadata(dest.join("f")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 250_000_000));
    }
}
