//! Reading the configuration files of coordinators and workers: the file's text is parsed by
//! the caller, relative paths in it are taken relative to the file, and every error names the
//! file.

use std::path::{Path, PathBuf};

/// A configuration that cannot be used, saying which file and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Reads `path` and hands its text and its directory to `parse`.
pub fn load<T>(
    path: &Path,
    parse: impl FnOnce(&str, &Path) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|message| ConfigError::Invalid {
        path: path.display().to_string(),
        message,
    })
}

/// Makes each relative path absolute against `base` (the configuration file's directory).
pub fn resolve<'a>(base: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_paths_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let err = load(&path, |_, _| Ok(())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("reading {}", path.display()))
        );
        std::fs::write(&path, "data = \"d\"").unwrap();
        let err = load(&path, |_, _| Err::<(), _>("data is wrong".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: data is wrong", path.display())
        );
        let mut paths = (PathBuf::from("d"), PathBuf::from("/abs"));
        let base = load(&path, |_, base| Ok(base.to_path_buf())).unwrap();
        resolve(&base, [&mut paths.0, &mut paths.1]);
        assert_eq!(paths, (dir.path().join("d"), PathBuf::from("/abs")));
    }
}
