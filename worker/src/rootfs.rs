//! Paths inside a root filesystem, resolved the way a process chrooted into it would see them:
//! symlinks are followed relative to the root, and nothing ever resolves outside it.

use std::io;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow before it is called a loop.
const MAX_LINKS: usize = 40;

/// Resolves `rel` (absolute paths are taken relative to the root) inside `root`, following
/// symlinks as if `root` were `/`. Missing trailing components are allowed (the result names
/// where they would be); `..` stops at the root.
pub fn resolve_in_root(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut todo: Vec<String> = Path::new(rel)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut parts: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            parts.pop();
            continue;
        }
        let candidate: PathBuf = root.join(parts.iter().collect::<PathBuf>()).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving {rel}"
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    parts.clear();
                }
                let more: Vec<String> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                todo.extend(more.into_iter().rev());
            }
            _ => parts.push(part),
        }
    }
    Ok(root.join(parts.iter().collect::<PathBuf>()))
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
