//! Paths inside a root filesystem, resolved the way a process chrooted into it would see them:
//! symlinks are followed relative to the root, and nothing ever resolves outside it.
//!
//! [`resolve`] is the one resolver of the worker: COPY and ADD (sources and destinations),
//! RUN (the working directory, mount targets, `/etc/passwd`) and RUN's bind mounts all go
//! through it. An absolute link target starts again at the root; `..` at the root either stays
//! there ([`Escape::Clamp`], as in a chroot) or is an error ([`Escape::Error`], for sources
//! that must not name anything outside their root); at most [`MAX_LINKS`] links are followed
//! (BuildKit's limit), then the path is a loop.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

/// How many symlinks one resolution may follow before it is called a loop.
pub const MAX_LINKS: usize = 255;

/// What to do when `..` climbs above the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// The path escapes: refuse.
    Error,
    /// Stay at the root, like `/..` in a chroot.
    Clamp,
}

/// A path resolved inside a root: the host path and its components below the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub host: PathBuf,
    pub rel: Vec<OsString>,
}

/// Why a path could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{path}: the path leads outside its root")]
    OutsideRoot { path: String },
    #[error("{path}: too many levels of symbolic links")]
    Loop { path: String },
    #[error("{path}: reading the link {link}: {source}")]
    ReadLink {
        path: String,
        link: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<ResolveError> for io::Error {
    fn from(e: ResolveError) -> io::Error {
        io::Error::other(e)
    }
}

/// Resolves the components of `path` (bytes split on `/`; a leading `/` means the root) inside
/// `root`. The last component is followed when it is a link only if `follow_final`. Missing
/// components are kept as they are (the result names where they would be).
pub fn resolve(
    root: &Path,
    path: &OsStr,
    follow_final: bool,
    escape: Escape,
) -> Result<Resolved, ResolveError> {
    let display = || path.to_string_lossy().into_owned();
    let mut pending: VecDeque<OsString> = components(path.as_bytes()).collect();
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some(comp) = pending.pop_front() {
        if comp == ".." {
            if done.pop().is_none() && escape == Escape::Error {
                return Err(ResolveError::OutsideRoot { path: display() });
            }
            continue;
        }
        if pending.is_empty() && !follow_final {
            done.push(comp);
            break;
        }
        let host = host_path(root, &done).join(&comp);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(ResolveError::Loop { path: display() });
                }
                let target =
                    std::fs::read_link(&host).map_err(|source| ResolveError::ReadLink {
                        path: display(),
                        link: host.clone(),
                        source,
                    })?;
                let bytes = target.as_os_str().as_bytes();
                if bytes.starts_with(b"/") {
                    done.clear();
                }
                for part in components(bytes).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(part);
                }
            }
            _ => done.push(comp),
        }
    }
    Ok(Resolved {
        host: host_path(root, &done),
        rel: done,
    })
}

/// Resolves `path` inside `root`, following every link and staying at the root on `..`: where
/// a process chrooted into `root` would find `path`.
pub fn resolve_in_root(root: &Path, path: impl AsRef<OsStr>) -> io::Result<PathBuf> {
    Ok(resolve(root, path.as_ref(), true, Escape::Clamp)?.host)
}

/// The non-empty components of a slash-separated path, `.` left out.
fn components(bytes: &[u8]) -> impl Iterator<Item = OsString> + '_ {
    bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsString::from_vec(c.to_vec()))
}

/// `root` joined with `comps`.
pub fn host_path(root: &Path, comps: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(c);
    }
    p
}

/// `mkdir -p` of `path` inside `root`: each missing directory gets `mode` and, if given, the
/// owner (uid, gid).
pub fn mkdir_all(root: &Path, path: &str, mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let mut current = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        current.push('/');
        current.push_str(part);
        let full = resolve_in_root(root, &current)?;
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{current} exists and is not a directory"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&full)?;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))?;
                if let Some((uid, gid)) = owner {
                    chown(&full, Some(uid), Some(gid))?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    /// Every way out of a root a link or a path can try, each resolved inside it.
    #[test]
    fn no_path_leaves_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        symlink("/", root.join("a/to-root")).unwrap();
        symlink("..", root.join("up")).unwrap();
        symlink("../../../../../../..", root.join("a/b/far-up")).unwrap();
        symlink("/etc/shadow", root.join("a/abs-file")).unwrap();
        symlink("b/../../../etc", root.join("a/mixed")).unwrap();
        symlink("self", root.join("self")).unwrap();
        symlink("pong", root.join("ping")).unwrap();
        symlink("ping", root.join("pong")).unwrap();
        let inside = |p: &str| resolve_in_root(root, p).unwrap();
        assert_eq!(inside("a/to-root/etc/passwd"), root.join("etc/passwd"));
        assert_eq!(inside("up/up/etc"), root.join("etc"));
        assert_eq!(inside("a/b/far-up/etc"), root.join("etc"));
        assert_eq!(inside("a/abs-file"), root.join("etc/shadow"));
        assert_eq!(inside("a/mixed/x"), root.join("etc/x"));
        assert_eq!(inside("/../../.././etc//x"), root.join("etc/x"));
        // Non-UTF-8 names stay as they are.
        let odd = OsStr::from_bytes(b"a/\xff\xfe");
        assert_eq!(
            resolve_in_root(root, odd).unwrap(),
            root.join("a").join(OsStr::from_bytes(b"\xff\xfe"))
        );
        // Loops, direct and through two links, are errors rather than hangs.
        assert!(matches!(
            resolve(root, OsStr::new("self/x"), true, Escape::Clamp),
            Err(ResolveError::Loop { .. })
        ));
        assert!(matches!(
            resolve(root, OsStr::new("ping"), true, Escape::Clamp),
            Err(ResolveError::Loop { .. })
        ));
        // Sources may not climb out at all; a final link is kept when not followed.
        assert!(matches!(
            resolve(root, OsStr::new("a/../../x"), true, Escape::Error),
            Err(ResolveError::OutsideRoot { .. })
        ));
        assert!(matches!(
            resolve(root, OsStr::new("up/../x"), true, Escape::Error),
            Err(ResolveError::OutsideRoot { .. })
        ));
        let last = resolve(root, OsStr::new("a/abs-file"), false, Escape::Error).unwrap();
        assert_eq!(last.host, root.join("a/abs-file"));
        assert_eq!(last.rel, [OsString::from("a"), OsString::from("abs-file")]);
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("real/escape")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, "abs/sub").unwrap(),
            root.join("real/sub")
        );
        assert_eq!(
            resolve_in_root(root, "/real/escape/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(root, "../../x").unwrap(), root.join("x"));
        assert!(resolve_in_root(root, "loop").is_err());
    }

    #[test]
    fn mkdir_all_sets_mode_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        mkdir_all(dir.path(), "/a/b/c", 0o750, Some((1000, 1000))).unwrap();
        let m = std::fs::metadata(dir.path().join("a/b/c")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o750);
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(mkdir_all(dir.path(), "/file/x", 0o755, None).is_err());
    }
}
