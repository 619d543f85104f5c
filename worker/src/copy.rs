//! COPY and ADD with Docker's semantics, `.dockerignore` matching and source hashing.
//!
//! [`copy_into`] carries out one COPY or ADD instruction described by a [`CopySpec`]: it reads
//! sources from a source root (the build context, or another stage's root filesystem) and writes
//! them into the step's root filesystem, following the rules of BuildKit's Dockerfile frontend and
//! file backend: globs in Go `filepath.Match` syntax, a directory source copies its contents, a
//! destination ending in `/` is a directory, missing parents are created, owners become root
//! (or the `--chown` owner), `--chmod` in octal or symbolic form, `--exclude`, `--parents`, ADD's
//! extraction of local tar archives, and inline (heredoc) files. Every path is resolved inside its
//! root, with chroot semantics for symbolic links: a source that would leave its root is an error
//! and nothing outside either root is ever read or written.
//!
//! [`fetch_urls`] downloads ADD's http(s) sources (verifying `--checksum`), [`source_digest`]
//! hashes exactly what [`copy_into`] would read (for cache keys), [`DockerIgnore`] implements
//! `.dockerignore` with moby/patternmatcher's rules, and [`parse_chmod`] applies a `--chmod`
//! value to a mode. All filesystem work is blocking; async callers wrap it in `spawn_blocking`.

use crate::hashcache::HashCache;
use crate::rootfs::{self, Escape, ResolveError, Resolved};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use filetime::FileTime;
use sha2::Digest as _;

/// A numeric owner for copied files, already resolved from `--chown` by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id written to every copied file and created directory.
    pub uid: u32,
    /// Group id written to every copied file and created directory.
    pub gid: u32,
}

/// The root owner: of what COPY and ADD take from the build context without `--chown`, and of
/// the parent directories they create.
const ROOT: Owner = Owner { uid: 0, gid: 0 };

/// One COPY or ADD instruction after variable expansion.
#[derive(Debug, Clone, Default)]
pub struct CopySpec {
    /// Source paths or globs, relative to the source root (a leading `/` means the root), or
    /// http(s) URLs for ADD.
    pub sources: Vec<String>,
    /// Heredoc files: (name, content), written as files with mode 0644.
    pub inline: Vec<(String, Vec<u8>)>,
    /// Destination; relative to `workdir` unless absolute; ending in `/` means a directory.
    pub dest: String,
    /// Absolute WORKDIR of the stage (`/` if unset).
    pub workdir: String,
    /// `--chown`, already resolved to numeric ids by the caller.
    pub chown: Option<Owner>,
    /// Without `--chown`, keep each source's owner instead of making it root's: COPY from a
    /// stage or an image does (BuildKit), COPY from the build context does not.
    pub keep_owners: bool,
    /// Raw `--chmod` value: octal (`755`) or symbolic (`u+x,g-w`).
    pub chmod: Option<String>,
    /// `--exclude` patterns (`.dockerignore` syntax), matched against paths relative to each
    /// copied source (for glob matches: relative to the glob's literal directory).
    pub exclude: Vec<String>,
    /// `--parents`: keep each source's directory path below the root, or below a `/./` pivot.
    pub parents: bool,
    /// ADD rather than COPY: local tar archives are extracted and URLs are allowed.
    pub is_add: bool,
    /// ADD `--checksum` (`sha256:<hex>`, also `sha384:` and `sha512:`), for a single URL source.
    pub checksum: Option<String>,
}

impl CopySpec {
    /// Whether any source is an http(s) URL (which must go through [`fetch_urls`]).
    pub fn has_urls(&self) -> bool {
        self.sources.iter().any(|s| is_url(s))
    }

    /// This spec without its URL sources (and without `--checksum`, which only concerns URLs):
    /// the part of a mixed ADD that is copied from the build context, while the part returned
    /// by [`fetch_urls`] is copied from the download directory.
    pub fn without_urls(&self) -> CopySpec {
        CopySpec {
            sources: self
                .sources
                .iter()
                .filter(|s| !is_url(s))
                .cloned()
                .collect(),
            checksum: None,
            ..self.clone()
        }
    }
}

/// Why a COPY or ADD failed; each variant names the path, pattern or URL it is about.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A source path, or the directory part of a glob, does not exist (or is ignored).
    #[error("failed to compute cache key: \"{path}\": not found")]
    NotFound {
        /// The source as written in the instruction (or the glob match).
        path: String,
    },
    /// A source path, or a symbolic link on its way, leads outside the source root.
    #[error("forbidden path outside the build context: {path}")]
    OutsideRoot {
        /// The source as written in the instruction.
        path: String,
    },
    /// Several sources (or a glob with several matches) but a destination that is not a directory.
    #[error(
        "When using {instruction} with more than one source file, the destination must be a directory and end with a /"
    )]
    DestinationNotDirectory {
        /// `COPY` or `ADD`.
        instruction: &'static str,
    },
    /// A directory had to be created or written into where a non-directory exists.
    #[error("cannot copy to non-directory: {path}")]
    NotADirectory {
        /// Host path of the offending destination.
        path: PathBuf,
    },
    /// A file would replace an existing directory.
    #[error("cannot replace directory {path} with a file")]
    ReplaceDirectory {
        /// Host path of the existing directory.
        path: PathBuf,
    },
    /// Symbolic links nest too deeply (or loop) while resolving a path.
    #[error("too many levels of symbolic links resolving {path}")]
    SymlinkLoop {
        /// The path being resolved.
        path: String,
    },
    /// A `--chmod` value that is neither octal up to 07777 nor a valid symbolic mode.
    #[error("invalid chmod parameter: '{value}': {reason}")]
    InvalidChmod {
        /// The raw value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A glob or `.dockerignore`/`--exclude` pattern with a syntax error.
    #[error("syntax error in pattern {pattern:?}")]
    InvalidPattern {
        /// The offending pattern.
        pattern: String,
    },
    /// A `.dockerignore` or `--exclude` line that is a lone `!`.
    #[error("illegal exclusion pattern: \"!\"")]
    IllegalExclusion,
    /// A heredoc file name that is empty or not a plain file name.
    #[error("invalid inline file name {name:?}")]
    InvalidInlineName {
        /// The name.
        name: String,
    },
    /// A URL source in a COPY instruction.
    #[error("source can't be a URL for COPY: {url}")]
    UrlInCopy {
        /// The URL.
        url: String,
    },
    /// A URL source handed to `copy_into` or `source_digest` instead of `fetch_urls`.
    #[error(
        "URL source {url} must be downloaded with fetch_urls and copied from the download directory"
    )]
    UrlNotFetched {
        /// The URL.
        url: String,
    },
    /// `--checksum` used where BuildKit rejects it.
    #[error("{reason}")]
    ChecksumNotAllowed {
        /// Which rule was broken.
        reason: &'static str,
    },
    /// A `--checksum` value that is not `algorithm:hex` with a supported algorithm.
    #[error(
        "invalid checksum {value:?}: expected sha256:<64 hex>, sha384:<96 hex> or sha512:<128 hex>"
    )]
    InvalidChecksum {
        /// The raw value.
        value: String,
    },
    /// The downloaded content does not have the expected digest.
    #[error("checksum mismatch for {url}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// The digest given with `--checksum`.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
    /// The HTTP request failed.
    #[error("failed to download {url}: {error}")]
    Http {
        /// The URL.
        url: String,
        /// The client error.
        #[source]
        error: reqwest::Error,
    },
    /// The server answered with a non-success status.
    #[error("failed to download {url}: HTTP status {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// A filesystem operation failed.
    #[error("failed to {op} {path}: {error}")]
    Io {
        /// What was being done (`read`, `create`, `chown` ...).
        op: &'static str,
        /// Host path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        error: io::Error,
    },
    /// A local archive could not be read or extracted.
    #[error("failed to extract archive {path}: {error}")]
    Archive {
        /// Host path of the archive.
        path: PathBuf,
        /// The underlying error.
        #[source]
        error: io::Error,
    },
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> CopyError + 'p {
    move |error| CopyError::Io {
        op,
        path: path.to_path_buf(),
        error,
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// Go's `path.Clean` for slash-separated strings.
pub(crate) fn clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for comp in p.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|c| *c != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Go's `path.Dir` for slash-separated strings.
fn dir_of(p: &str) -> String {
    match p.rfind('/') {
        Some(i) => clean(p.get(..=i).unwrap_or("/")),
        None => ".".to_string(),
    }
}

/// Whether a path string contains an unescaped glob metacharacter.
fn contains_wildcards(s: &str) -> bool {
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// Removes backslash escapes from a literal path component.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            } else {
                out.push('\\');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Escapes glob metacharacters so that `s` is matched literally as a source.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

fn comps_to_string(comps: &[OsString]) -> String {
    comps
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn str_comps(s: &str) -> Vec<OsString> {
    s.split('/').map(OsString::from).collect()
}

/// [`rootfs::resolve`] for a slash-separated `path`, its errors naming `display` (the path as
/// the instruction wrote it).
fn resolve(
    root: &Path,
    path: &str,
    follow_final: bool,
    escape: Escape,
    display: &str,
) -> Result<Resolved, CopyError> {
    resolve_os(root, OsStr::new(path), follow_final, escape, display)
}

/// [`resolve`] for a path that need not be UTF-8.
fn resolve_os(
    root: &Path,
    path: &OsStr,
    follow_final: bool,
    escape: Escape,
    display: &str,
) -> Result<Resolved, CopyError> {
    rootfs::resolve(root, path, follow_final, escape).map_err(|e| match e {
        ResolveError::OutsideRoot { .. } => CopyError::OutsideRoot {
            path: display.to_string(),
        },
        ResolveError::Loop { .. } => CopyError::SymlinkLoop {
            path: display.to_string(),
        },
        ResolveError::ReadLink { link, source, .. } => io_err("read link", &link)(source),
    })
}

/// Creates `path` and its missing parents (mode 0755, owned by `owner`); `path` must already be
/// resolved inside its root (its existing part holds no symbolic links).
fn mkdir_all(path: &Path, owner: Owner) -> Result<(), CopyError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(CopyError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    if let Some(parent) = path.parent() {
        mkdir_all(parent, owner)?;
    }
    match fs::DirBuilder::new().mode(0o755).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => return Ok(()),
        Err(e) => return Err(io_err("create directory", path)(e)),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", path))?;
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)).map_err(io_err("chown", path))
}

// ---------------------------------------------------------------------------------------------
// Go filepath.Match
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct BadPattern;

/// Go's `filepath.Match`: `*` and `?` never match `/`, `[...]` classes with `^` negation and
/// ranges, `\` escapes. A malformed pattern is an error even when the name does not match.
fn go_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let pat: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let mut p: &[char] = &pat;
    let mut n: &[char] = &name;
    'outer: while !p.is_empty() {
        let (star, chunk, rest) = scan_chunk(p);
        p = rest;
        if star && chunk.is_empty() {
            return Ok(!n.contains(&'/'));
        }
        let (t, ok) = match_chunk(chunk, n)?;
        if ok && (t.is_empty() || !p.is_empty()) {
            n = t;
            continue;
        }
        if star {
            let mut i = 0;
            while i < n.len() && n.get(i) != Some(&'/') {
                let (t, ok) = match_chunk(chunk, n.get(i + 1..).unwrap_or(&[]))?;
                if ok {
                    if p.is_empty() && !t.is_empty() {
                        i += 1;
                        continue;
                    }
                    n = t;
                    continue 'outer;
                }
                i += 1;
            }
        }
        while !p.is_empty() {
            let (_, chunk, rest) = scan_chunk(p);
            p = rest;
            match_chunk(chunk, &[])?;
        }
        return Ok(false);
    }
    Ok(n.is_empty())
}

fn scan_chunk(mut p: &[char]) -> (bool, &[char], &[char]) {
    let mut star = false;
    while p.first() == Some(&'*') {
        p = p.get(1..).unwrap_or(&[]);
        star = true;
    }
    let mut inrange = false;
    let mut i = 0;
    while i < p.len() {
        match p.get(i) {
            Some('\\') if i + 1 < p.len() => i += 1,
            Some('[') => inrange = true,
            Some(']') => inrange = false,
            Some('*') if !inrange => break,
            _ => {}
        }
        i += 1;
    }
    let (chunk, rest) = p.split_at(i.min(p.len()));
    (star, chunk, rest)
}

fn match_chunk<'a>(
    mut chunk: &[char],
    mut s: &'a [char],
) -> Result<(&'a [char], bool), BadPattern> {
    let mut failed = false;
    while let Some(&c) = chunk.first() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match c {
            '[' => {
                let mut r = '\0';
                if !failed {
                    r = s.first().copied().unwrap_or('\0');
                    s = s.get(1..).unwrap_or(&[]);
                }
                chunk = chunk.get(1..).unwrap_or(&[]);
                let mut negated = false;
                if chunk.first() == Some(&'^') {
                    negated = true;
                    chunk = chunk.get(1..).unwrap_or(&[]);
                }
                let mut matched = false;
                let mut nrange = 0;
                loop {
                    if chunk.first() == Some(&']') && nrange > 0 {
                        chunk = chunk.get(1..).unwrap_or(&[]);
                        break;
                    }
                    let (lo, rest) = get_esc(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk.first() == Some(&'-') {
                        let (h, rest) = get_esc(chunk.get(1..).unwrap_or(&[]))?;
                        hi = h;
                        chunk = rest;
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    nrange += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            '?' => {
                if !failed {
                    if s.first() == Some(&'/') {
                        failed = true;
                    }
                    s = s.get(1..).unwrap_or(&[]);
                }
                chunk = chunk.get(1..).unwrap_or(&[]);
            }
            _ => {
                let mut lit = c;
                if c == '\\' {
                    chunk = chunk.get(1..).unwrap_or(&[]);
                    lit = *chunk.first().ok_or(BadPattern)?;
                }
                if !failed {
                    if s.first() != Some(&lit) {
                        failed = true;
                    }
                    s = s.get(1..).unwrap_or(&[]);
                }
                chunk = chunk.get(1..).unwrap_or(&[]);
            }
        }
    }
    if failed {
        Ok((&[], false))
    } else {
        Ok((s, true))
    }
}

fn get_esc(chunk: &[char]) -> Result<(char, &[char]), BadPattern> {
    let mut chunk = chunk;
    match chunk.first() {
        None | Some('-') | Some(']') => return Err(BadPattern),
        Some('\\') => {
            chunk = chunk.get(1..).unwrap_or(&[]);
        }
        _ => {}
    }
    let r = *chunk.first().ok_or(BadPattern)?;
    let rest = chunk.get(1..).unwrap_or(&[]);
    if rest.is_empty() {
        return Err(BadPattern);
    }
    Ok((r, rest))
}

// ---------------------------------------------------------------------------------------------
// moby/patternmatcher
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    /// `*`: any run of characters but `/`.
    Star,
    /// `?`: one character but `/`.
    One,
    /// `**` followed by more pattern: `(.*/)?`.
    AnyDirs,
    /// `**` at the end after other wildcards: `.*`.
    AnyRest,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone)]
enum MatchKind {
    Exact,
    Prefix(String),
    Suffix(String),
    Tokens(Vec<Tok>),
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    kind: MatchKind,
}

impl Pattern {
    fn compile(cleaned: String, exclusion: bool) -> Pattern {
        #[derive(PartialEq)]
        enum Detected {
            Exact,
            Prefix,
            Suffix,
            Regexp,
        }
        let chars: Vec<char> = cleaned.chars().collect();
        let mut toks = Vec::new();
        let mut detected = Detected::Exact;
        let mut i = 0;
        let mut first = true;
        while let Some(&ch) = chars.get(i) {
            i += 1;
            match ch {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i >= chars.len() {
                        if detected == Detected::Exact {
                            detected = Detected::Prefix;
                        } else {
                            toks.push(Tok::AnyRest);
                            detected = Detected::Regexp;
                        }
                    } else {
                        toks.push(Tok::AnyDirs);
                        detected = Detected::Regexp;
                    }
                    if first {
                        detected = Detected::Suffix;
                    }
                }
                '*' => {
                    toks.push(Tok::Star);
                    detected = Detected::Regexp;
                }
                '?' => {
                    toks.push(Tok::One);
                    detected = Detected::Regexp;
                }
                '\\' => match chars.get(i) {
                    Some(&n) => {
                        toks.push(Tok::Lit(n));
                        i += 1;
                        detected = Detected::Regexp;
                    }
                    None => toks.push(Tok::Lit('\\')),
                },
                '[' => {
                    let (tok, used) = parse_class(chars.get(i..).unwrap_or(&[]));
                    toks.push(tok);
                    i += used;
                    detected = Detected::Regexp;
                }
                ']' => {
                    toks.push(Tok::Lit(']'));
                    detected = Detected::Regexp;
                }
                c => toks.push(Tok::Lit(c)),
            }
            first = false;
        }
        let kind = match detected {
            Detected::Exact => MatchKind::Exact,
            Detected::Prefix => {
                let s: String = chars.iter().take(chars.len().saturating_sub(2)).collect();
                MatchKind::Prefix(s)
            }
            Detected::Suffix => MatchKind::Suffix(chars.iter().skip(2).collect()),
            Detected::Regexp => MatchKind::Tokens(toks),
        };
        Pattern {
            cleaned,
            exclusion,
            kind,
        }
    }

    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            MatchKind::Exact => path == self.cleaned,
            MatchKind::Prefix(p) => path.starts_with(p.as_str()),
            MatchKind::Suffix(s) => {
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            MatchKind::Tokens(toks) => tokens_match(toks, path),
        }
    }
}

/// Parses a character class after its `[`; returns the token and how many chars it used
/// (including the closing `]`). Patterns are validated with [`go_match`] first.
fn parse_class(chars: &[char]) -> (Tok, usize) {
    let mut i = 0;
    let mut negated = false;
    if chars.first() == Some(&'^') {
        negated = true;
        i += 1;
    }
    let mut ranges = Vec::new();
    let read = |i: &mut usize| -> Option<char> {
        let c = *chars.get(*i)?;
        *i += 1;
        if c == '\\' {
            let n = *chars.get(*i)?;
            *i += 1;
            Some(n)
        } else {
            Some(c)
        }
    };
    loop {
        match chars.get(i) {
            None => break,
            Some(']') if !ranges.is_empty() => {
                i += 1;
                break;
            }
            _ => {}
        }
        let Some(lo) = read(&mut i) else { break };
        let mut hi = lo;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            i += 1;
            if let Some(h) = read(&mut i) {
                hi = h;
            }
        }
        ranges.push((lo, hi));
    }
    (Tok::Class { negated, ranges }, i)
}

fn class_matches(negated: bool, ranges: &[(char, char)], c: char) -> bool {
    ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != negated
}

/// Matches the whole `path` against tokens (dynamic programming, no backtracking blow-up).
fn tokens_match(toks: &[Tok], path: &str) -> bool {
    let s: Vec<char> = path.chars().collect();
    let n = s.len();
    let at = |v: &[bool], i: usize| v.get(i).copied().unwrap_or(false);
    // next[j]: do the tokens after the current one match s[j..]? Built from the last token.
    let mut next = vec![false; n + 1];
    if let Some(end) = next.get_mut(n) {
        *end = true;
    }
    for tok in toks.iter().rev() {
        let mut cur = vec![false; n + 1];
        for j in (0..=n).rev() {
            let c = s.get(j).copied();
            let m = match tok {
                Tok::Lit(l) => c == Some(*l) && at(&next, j + 1),
                Tok::One => c.is_some_and(|c| c != '/') && at(&next, j + 1),
                Tok::Class { negated, ranges } => {
                    c.is_some_and(|c| class_matches(*negated, ranges, c)) && at(&next, j + 1)
                }
                Tok::Star => at(&next, j) || (c.is_some_and(|c| c != '/') && at(&cur, j + 1)),
                Tok::AnyDirs => {
                    at(&next, j) || (j..n).any(|k| s.get(k) == Some(&'/') && at(&next, k + 1))
                }
                Tok::AnyRest => (j..=n).any(|k| at(&next, k)),
            };
            if let Some(slot) = cur.get_mut(j) {
                *slot = m;
            }
        }
        next = cur;
    }
    at(&next, 0)
}

/// An ordered list of patterns with `!` exclusions, as moby/patternmatcher's `PatternMatcher`.
#[derive(Debug, Clone, Default)]
struct PatternSet {
    patterns: Vec<Pattern>,
    has_exclusions: bool,
}

/// Whether a path is visible once `.dockerignore` is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visibility {
    /// Not ignored.
    Included,
    /// An ignored directory that an exception (`!dir/...`) may re-include something below:
    /// walked, created only if something inside is included.
    DescendOnly,
    /// Ignored (with everything below it).
    Hidden,
}

impl PatternSet {
    fn new(patterns: &[String]) -> Result<PatternSet, CopyError> {
        let mut set = PatternSet::default();
        for raw in patterns {
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let cleaned = clean(trimmed);
            let (exclusion, body) = match cleaned.strip_prefix('!') {
                Some("") => return Err(CopyError::IllegalExclusion),
                Some(body) => (true, body.to_string()),
                None => (false, cleaned.clone()),
            };
            if go_match(&body, ".").is_err() {
                return Err(CopyError::InvalidPattern {
                    pattern: raw.clone(),
                });
            }
            set.has_exclusions |= exclusion;
            set.patterns.push(Pattern::compile(body, exclusion));
        }
        Ok(set)
    }

    fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `MatchesOrParentMatches`: the last pattern that matches the path or one of its parent
    /// directories decides.
    fn matches(&self, file: &str) -> bool {
        let parent = dir_of(file);
        let mut prefixes: Vec<&str> = Vec::new();
        if parent != "." {
            let mut end = 0;
            for part in parent.split('/') {
                end += part.len();
                prefixes.push(parent.get(..end).unwrap_or(""));
                end += 1;
            }
        }
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let m = p.matches(file) || prefixes.iter().any(|d| p.matches(d));
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// BuildKit's walker rule: an excluded directory is still walked when an exception pattern
    /// names something below it.
    fn visibility(&self, rel: &str, is_dir: bool) -> Visibility {
        if !self.matches(rel) {
            return Visibility::Included;
        }
        if is_dir && self.has_exclusions {
            let dir_slash = format!("{rel}/");
            if self
                .patterns
                .iter()
                .any(|p| p.exclusion && format!("{}/", p.cleaned).starts_with(&dir_slash))
            {
                return Visibility::DescendOnly;
            }
        }
        Visibility::Hidden
    }
}

/// The patterns of a `.dockerignore` file, applied to paths relative to the build context with
/// Docker's rules (moby/patternmatcher): `#` comment lines and blank lines are skipped, a leading
/// `/` or `./` is dropped and paths are cleaned, `*` and `?` stay within one path component,
/// `**` spans any number of directories, `!pattern` re-includes (the last matching pattern
/// wins), and a pattern that matches a directory excludes everything below it.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    set: PatternSet,
}

impl DockerIgnore {
    /// Parses the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> Result<Self, CopyError> {
        let mut patterns = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = if i == 0 {
                line.strip_prefix('\u{feff}').unwrap_or(line)
            } else {
                line
            };
            if line.starts_with('#') {
                continue;
            }
            let mut p = line.trim();
            if p.is_empty() {
                continue;
            }
            let invert = p.starts_with('!');
            if invert {
                p = p.get(1..).unwrap_or("").trim();
            }
            let mut cleaned = if p.is_empty() {
                String::new()
            } else {
                clean(p)
            };
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            patterns.push(if invert {
                format!("!{cleaned}")
            } else {
                cleaned
            });
        }
        Ok(DockerIgnore {
            set: PatternSet::new(&patterns)?,
        })
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated) is excluded.
    /// Whether some pattern re-includes paths (`!pattern`): an excluded directory may then
    /// still hold files that are not excluded.
    pub fn has_exceptions(&self) -> bool {
        self.set.has_exclusions
    }

    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let cleaned = clean(rel_path.trim_start_matches('/'));
        if cleaned == "." || cleaned.is_empty() {
            return false;
        }
        self.set.matches(&cleaned)
    }

    fn visibility(&self, rel: &str, is_dir: bool) -> Visibility {
        if rel.is_empty() {
            return Visibility::Included;
        }
        self.set.visibility(rel, is_dir)
    }
}

// ---------------------------------------------------------------------------------------------
// --chmod
// ---------------------------------------------------------------------------------------------

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;
const S_IRWXU: u32 = 0o700;
const S_IRWXG: u32 = 0o070;
const S_IRWXO: u32 = 0o007;
const STANDARD_BITS: u32 = S_ISUID | S_ISGID | S_IRWXU | S_IRWXG | S_IRWXO;

#[derive(Debug, Clone)]
enum ModeCmd {
    Set(u32),
    Clear(u32),
    /// `+X`: set if the file is a directory or already executable by someone.
    SetIfExec(u32),
    /// Copy the permission bits of class `from` (`u`, `g` or `o`) to the classes in `to`.
    CopyBits {
        from: u8,
        to_u: bool,
        to_g: bool,
        to_o: bool,
        set: bool,
        clear: bool,
    },
}

/// A parsed `--chmod` value.
#[derive(Debug, Clone)]
enum Chmod {
    Octal(u32),
    Symbolic(Vec<ModeCmd>),
}

impl Chmod {
    fn parse(value: &str) -> Result<Chmod, CopyError> {
        let invalid = |reason: &'static str| CopyError::InvalidChmod {
            value: value.to_string(),
            reason,
        };
        let non_octal = "it should be octal string and between 0 and 07777";
        let bytes = value.as_bytes();
        match bytes.first() {
            None => return Err(invalid("empty mode")),
            Some(b) if b.is_ascii_digit() => {
                let v = u32::from_str_radix(value, 8).map_err(|_| invalid(non_octal))?;
                if v > 0o7777 {
                    return Err(invalid(non_octal));
                }
                return Ok(Chmod::Octal(v));
            }
            Some(_) => {}
        }
        let syntax = || invalid("invalid symbolic mode syntax");
        let mut cmds = Vec::new();
        let add = |cmds: &mut Vec<ModeCmd>, op: u8, who: u32, arg: u32| {
            let bits = |w: u32| if w != 0 { w & arg } else { arg };
            match op {
                b'=' => {
                    cmds.push(ModeCmd::Clear(if who != 0 { who } else { STANDARD_BITS }));
                    cmds.push(ModeCmd::Set(bits(who)));
                }
                b'+' => cmds.push(ModeCmd::Set(bits(who))),
                b'-' => cmds.push(ModeCmd::Clear(bits(who))),
                _ => cmds.push(ModeCmd::SetIfExec(bits(who))),
            }
        };
        let mut i = 0usize;
        let mut equal_op_done = false;
        loop {
            let mut who = 0u32;
            while let Some(&c) = bytes.get(i) {
                match c {
                    b'a' => who |= STANDARD_BITS,
                    b'u' => who |= S_ISUID | S_IRWXU,
                    b'g' => who |= S_ISGID | S_IRWXG,
                    b'o' => who |= S_IRWXO,
                    _ => break,
                }
                i += 1;
            }
            loop {
                let op = *bytes.get(i).ok_or_else(syntax)?;
                i += 1;
                match op {
                    b'+' | b'-' => {}
                    b'=' => equal_op_done = false,
                    _ => return Err(syntax()),
                }
                who &= !S_ISVTX;
                let mut perm = 0u32;
                let mut perm_x = 0u32;
                loop {
                    let b = bytes.get(i).copied().unwrap_or(0);
                    match b {
                        b'r' => perm |= 0o444,
                        b's' => {
                            if who == 0 || who & !S_IRWXO != 0 {
                                perm |= S_ISUID | S_ISGID;
                            }
                        }
                        b't' => {
                            if who == 0 || who & !S_IRWXO != 0 {
                                who |= S_ISVTX;
                                perm |= S_ISVTX;
                            }
                        }
                        b'w' => perm |= 0o222,
                        b'X' => {
                            if op == b'+' {
                                perm_x = 0o111;
                            }
                        }
                        b'x' => perm |= 0o111,
                        b'u' | b'g' | b'o' => {
                            if perm != 0 {
                                add(&mut cmds, op, who, perm);
                                perm = 0;
                            }
                            if op == b'=' {
                                equal_op_done = true;
                            }
                            if perm_x != 0 {
                                add(&mut cmds, b'X', who, perm_x);
                                perm_x = 0;
                            }
                            let (to_u, to_g, to_o) = if who != 0 {
                                (who & 0o400 != 0, who & 0o040 != 0, who & 0o004 != 0)
                            } else {
                                (true, true, true)
                            };
                            cmds.push(ModeCmd::CopyBits {
                                from: b,
                                to_u,
                                to_g,
                                to_o,
                                set: op != b'-',
                                clear: op != b'+',
                            });
                        }
                        _ => {
                            if perm != 0 || (op == b'=' && !equal_op_done) {
                                if op == b'=' {
                                    equal_op_done = true;
                                }
                                add(&mut cmds, op, who, perm);
                            }
                            if perm_x != 0 {
                                add(&mut cmds, b'X', who, perm_x);
                            }
                            break;
                        }
                    }
                    i += 1;
                }
                match bytes.get(i) {
                    None => return Ok(Chmod::Symbolic(cmds)),
                    Some(b',') => {
                        i += 1;
                        if i >= bytes.len() {
                            return Err(syntax());
                        }
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// The new permission bits (07777) for a file whose current mode is `mode`.
    fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let old = mode & 0o7777;
        match self {
            Chmod::Octal(v) => *v,
            Chmod::Symbolic(cmds) => {
                let mut m = old;
                for cmd in cmds {
                    match *cmd {
                        ModeCmd::Set(b) => m |= b,
                        ModeCmd::Clear(b) => m &= !b,
                        ModeCmd::SetIfExec(b) => {
                            if old & 0o111 != 0 || is_dir {
                                m |= b;
                            }
                        }
                        ModeCmd::CopyBits {
                            from,
                            to_u,
                            to_g,
                            to_o,
                            set,
                            clear,
                        } => {
                            let value = match from {
                                b'u' => (m & S_IRWXU) >> 6,
                                b'g' => (m & S_IRWXG) >> 3,
                                _ => m & S_IRWXO,
                            };
                            let targets = [(to_u, 6u32), (to_g, 3), (to_o, 0)];
                            if clear {
                                let clr = if set { 0o7 } else { value };
                                for (on, shift) in targets {
                                    if on {
                                        m &= !(clr << shift);
                                    }
                                }
                            }
                            if set {
                                for (on, shift) in targets {
                                    if on {
                                        m |= value << shift;
                                    }
                                }
                            }
                        }
                    }
                }
                m & 0o7777
            }
        }
    }
}

/// Applies a `--chmod` value to a file's mode the way BuildKit does: an octal value (up to
/// 07777) replaces the permission bits, a symbolic value (`u+x,g-w`, `go=u-w`, `+X` ...) is
/// applied like chmod(1) with a zero umask. Returns the new permission bits (07777 range).
pub fn parse_chmod(value: &str, current_mode: u32, is_dir: bool) -> Result<u32, CopyError> {
    Ok(Chmod::parse(value)?.apply(current_mode, is_dir))
}

// ---------------------------------------------------------------------------------------------
// Planning: what a COPY/ADD reads
// ---------------------------------------------------------------------------------------------

/// One filesystem object to copy: its path relative to the copied source, its host path, and
/// its `lstat` metadata.
#[derive(Debug)]
struct Entry {
    rel: PathBuf,
    abs: PathBuf,
    meta: Metadata,
}

#[derive(Debug)]
enum Item {
    /// A source path (or glob match, or `--parents` base). A directory copies its contents.
    Path {
        /// Base name used when the destination is a directory.
        name: OsString,
        /// The source itself (symbolic link followed).
        root: Box<Entry>,
        /// For a directory: everything selected below it, parents before children.
        children: Vec<Entry>,
        /// ADD of a local archive: extract instead of copying.
        unpack: bool,
    },
    /// A heredoc file.
    Inline { name: String, content: Vec<u8> },
}

#[derive(Debug)]
struct Plan {
    items: Vec<Item>,
    /// The destination is a directory the items go into (its spelling says so, or one
    /// wildcard matched several sources).
    dest_is_dir: bool,
    chmod: Option<Chmod>,
    /// The owner of everything copied; `None` keeps each source's.
    owner: Option<Owner>,
}

impl Plan {
    /// The owner `meta`'s copy gets.
    fn owner_of(&self, meta: &Metadata) -> Owner {
        self.owner.unwrap_or(Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// The owner of directories created on the way to the destination, and of inline files.
    fn created_owner(&self) -> Owner {
        self.owner.unwrap_or(ROOT)
    }
}

struct Planner<'a> {
    root: &'a Path,
    spec: &'a CopySpec,
    ignore: Option<&'a DockerIgnore>,
    exclude: PatternSet,
}

/// What filters apply while walking one item.
struct WalkFilter<'a> {
    include: Option<&'a PatternSet>,
    include_comps: Vec<String>,
}

fn instruction(spec: &CopySpec) -> &'static str {
    if spec.is_add { "ADD" } else { "COPY" }
}

fn validate_urls_and_checksum(spec: &CopySpec) -> Result<(), CopyError> {
    if !spec.is_add
        && let Some(url) = spec.sources.iter().find(|s| is_url(s))
    {
        return Err(CopyError::UrlInCopy { url: url.clone() });
    }
    if spec.checksum.is_some() {
        if !spec.is_add {
            return Err(CopyError::ChecksumNotAllowed {
                reason: "checksum can't be specified for COPY",
            });
        }
        if spec.sources.len() != 1 {
            return Err(CopyError::ChecksumNotAllowed {
                reason: "checksum can't be specified for multiple sources",
            });
        }
        if !spec.sources.iter().all(|s| is_url(s)) {
            return Err(CopyError::ChecksumNotAllowed {
                reason: "checksum requires HTTP(S) or Git sources",
            });
        }
    }
    Ok(())
}

/// The destination as a cleaned absolute container path, and whether it names a directory.
fn dest_path(spec: &CopySpec) -> (String, bool) {
    let d = spec.dest.as_str();
    let dir_shaped = d.is_empty()
        || d == "."
        || d == ".."
        || d.ends_with('/')
        || d.ends_with("/.")
        || d.ends_with("/..");
    let joined = if d.starts_with('/') {
        d.to_string()
    } else {
        format!("/{}/{}", spec.workdir.trim_start_matches('/'), d)
    };
    (clean(&joined), dir_shaped)
}

fn build_plan(
    src_root: &Path,
    spec: &CopySpec,
    ignore: Option<&DockerIgnore>,
) -> Result<Plan, CopyError> {
    validate_urls_and_checksum(spec)?;
    if let Some(url) = spec.sources.iter().find(|s| is_url(s)) {
        return Err(CopyError::UrlNotFetched { url: url.clone() });
    }
    let chmod = spec.chmod.as_deref().map(Chmod::parse).transpose()?;
    let planner = Planner {
        root: src_root,
        spec,
        ignore,
        exclude: PatternSet::new(&spec.exclude)?,
    };
    let mut items = Vec::new();
    for src in &spec.sources {
        if spec.parents {
            if let Some(item) = planner.parents_item(src)? {
                items.push(item);
            }
        } else {
            planner.source_items(src, &mut items)?;
        }
    }
    for (name, content) in &spec.inline {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(CopyError::InvalidInlineName { name: name.clone() });
        }
        items.push(Item::Inline {
            name: name.clone(),
            content: content.clone(),
        });
    }
    // BuildKit counts the source arguments, not what they match: one wildcard that matches
    // several files copies them into the destination as a directory.
    let (_, dir_shaped) = dest_path(spec);
    if !spec.parents && spec.sources.len() + spec.inline.len() > 1 && !dir_shaped {
        return Err(CopyError::DestinationNotDirectory {
            instruction: instruction(spec),
        });
    }
    Ok(Plan {
        dest_is_dir: dir_shaped || items.len() > 1,
        items,
        chmod,
        owner: match (spec.chown, spec.keep_owners) {
            (Some(owner), _) => Some(owner),
            (None, true) => None,
            (None, false) => Some(ROOT),
        },
    })
}

/// Lexically cleans a source (relative to the root); `..` leaving the root is an error.
fn clean_source(src: &str) -> Result<String, CopyError> {
    let rel = clean(src.trim_start_matches('/'));
    if rel == ".." || rel.starts_with("../") {
        return Err(CopyError::OutsideRoot {
            path: src.to_string(),
        });
    }
    Ok(if rel == "." { String::new() } else { rel })
}

impl Planner<'_> {
    /// Whether the resolved path (components below the root) survives `.dockerignore`.
    fn visible(&self, rel: &[OsString], is_dir: bool) -> bool {
        let Some(ignore) = self.ignore else {
            return true;
        };
        let mut acc = String::new();
        for (i, c) in rel.iter().enumerate() {
            acc = join_rel(&acc, &c.to_string_lossy());
            let last = i + 1 == rel.len();
            if ignore.visibility(&acc, !last || is_dir) == Visibility::Hidden {
                return false;
            }
        }
        true
    }

    fn stat_visible(&self, res: &Resolved, display: &str) -> Result<Metadata, CopyError> {
        let meta = match fs::symlink_metadata(&res.host) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(CopyError::NotFound {
                    path: display.to_string(),
                });
            }
            Err(e) => return Err(io_err("stat", &res.host)(e)),
        };
        if !self.visible(&res.rel, meta.is_dir()) {
            return Err(CopyError::NotFound {
                path: display.to_string(),
            });
        }
        Ok(meta)
    }

    /// Items for one source path or glob (not `--parents`).
    fn source_items(&self, src: &str, items: &mut Vec<Item>) -> Result<(), CopyError> {
        let rel = clean_source(src)?;
        if !contains_wildcards(&rel) {
            items.push(self.path_item(str_comps(&unescape(&rel)), src)?);
            return Ok(());
        }
        let comps: Vec<&str> = rel.split('/').collect();
        let split = comps
            .iter()
            .position(|c| contains_wildcards(c))
            .unwrap_or(comps.len());
        let (lit, pats) = comps.split_at(split);
        let base_str = lit
            .iter()
            .map(|c| unescape(c))
            .collect::<Vec<_>>()
            .join("/");
        for p in pats {
            go_match(p, "").map_err(|_| CopyError::InvalidPattern {
                pattern: src.to_string(),
            })?;
        }
        let base = resolve(self.root, &base_str, true, Escape::Error, src)?;
        let meta = self.stat_visible(&base, src)?;
        let mut matches = Vec::new();
        if meta.is_dir() {
            self.glob_walk(&base.host, &base.rel, pats, &mut matches)?;
        }
        for m in matches {
            // `--exclude` also filters the matches themselves, relative to the glob's directory.
            let below_base = comps_to_string(m.get(base.rel.len()..).unwrap_or(&[]));
            if !self.exclude.is_empty() && self.exclude.matches(&below_base) {
                continue;
            }
            let display = comps_to_string(&m);
            items.push(self.path_item(m, &display)?);
        }
        Ok(())
    }

    /// Expands glob components below `dir` (not following symbolic links while descending).
    fn glob_walk(
        &self,
        dir: &Path,
        dir_rel: &[OsString],
        pats: &[&str],
        out: &mut Vec<Vec<OsString>>,
    ) -> Result<(), CopyError> {
        let Some((pat, rest)) = pats.split_first() else {
            return Ok(());
        };
        for (name, meta) in read_dir_sorted(dir)? {
            let matched =
                go_match(pat, &name.to_string_lossy()).map_err(|_| CopyError::InvalidPattern {
                    pattern: (*pat).to_string(),
                })?;
            if !matched {
                continue;
            }
            let mut rel = dir_rel.to_vec();
            rel.push(name.clone());
            if let Some(ignore) = self.ignore
                && ignore.visibility(&comps_to_string(&rel), meta.is_dir()) == Visibility::Hidden
            {
                continue;
            }
            if rest.is_empty() {
                out.push(rel);
            } else if meta.is_dir() {
                self.glob_walk(&dir.join(&name), &rel, rest, out)?;
            }
        }
        Ok(())
    }

    /// The item for one literal source path (relative to the root), its last symlink followed.
    fn path_item(&self, rel: Vec<OsString>, display: &str) -> Result<Item, CopyError> {
        let name = rel
            .iter()
            .rev()
            .find(|n| !n.is_empty() && *n != ".")
            .cloned()
            .unwrap_or_else(|| OsString::from("."));
        let joined = OsString::from_vec(
            rel.iter()
                .map(|c| c.as_bytes())
                .collect::<Vec<_>>()
                .join(&b'/'),
        );
        let res = resolve_os(self.root, &joined, true, Escape::Error, display)?;
        let meta = self.stat_visible(&res, display)?;
        let mut children = Vec::new();
        if meta.is_dir() {
            let filter = WalkFilter {
                include: None,
                include_comps: Vec::new(),
            };
            let root_rel = comps_to_string(&res.rel);
            self.walk(&res.host, Path::new(""), &root_rel, &filter, &mut children)?;
        }
        let unpack = self.spec.is_add && meta.is_file() && is_archive(&res.host);
        Ok(Item::Path {
            name,
            root: Box::new(Entry {
                rel: PathBuf::new(),
                abs: res.host,
                meta,
            }),
            children,
            unpack,
        })
    }

    /// `--parents`: the source's path below the root (or below a `/./` pivot) is kept.
    fn parents_item(&self, src: &str) -> Result<Option<Item>, CopyError> {
        let (base_src, pattern_src) = match src.split_once("/./") {
            Some((b, p)) => (b.to_string(), p.to_string()),
            None => ("/".to_string(), src.to_string()),
        };
        let base_rel = clean_source(&base_src)?;
        let pattern = clean(&format!("/{pattern_src}"))
            .trim_start_matches('/')
            .to_string();
        if pattern.is_empty() {
            // `dir/./` names the whole pivot directory.
            return self
                .path_item(str_comps(&unescape(&base_rel)), src)
                .map(Some);
        }
        let base = resolve(self.root, &unescape(&base_rel), true, Escape::Error, src)?;
        let meta = self.stat_visible(&base, src)?;
        if !contains_wildcards(&base_rel) && !contains_wildcards(&pattern) {
            let full = join_rel(&unescape(&base_rel), &unescape(&pattern));
            let required = resolve(self.root, &full, false, Escape::Error, src)?;
            self.stat_visible(&required, src)?;
        }
        if !meta.is_dir() {
            return Err(CopyError::NotADirectory { path: base.host });
        }
        let include = PatternSet::new(std::slice::from_ref(&pattern))?;
        let filter = WalkFilter {
            include: Some(&include),
            include_comps: pattern.split('/').map(str::to_string).collect(),
        };
        let mut children = Vec::new();
        let root_rel = comps_to_string(&base.rel);
        self.walk(&base.host, Path::new(""), &root_rel, &filter, &mut children)?;
        Ok(Some(Item::Path {
            name: OsString::from("."),
            root: Box::new(Entry {
                rel: PathBuf::new(),
                abs: base.host,
                meta,
            }),
            children,
            unpack: false,
        }))
    }

    /// Collects what is selected below `dir`, parents before children, in name order. A
    /// directory that is itself filtered out is kept only when something below it is selected.
    fn walk(
        &self,
        dir: &Path,
        item_rel: &Path,
        root_rel: &str,
        filter: &WalkFilter<'_>,
        out: &mut Vec<Entry>,
    ) -> Result<(), CopyError> {
        for (name, meta) in read_dir_sorted(dir)? {
            let is_dir = meta.is_dir();
            let name_str = name.to_string_lossy();
            let child_root_rel = join_rel(root_rel, &name_str);
            let child_rel = item_rel.join(&name);
            let child_rel_str = child_rel.to_string_lossy();
            let mut lazy = false;
            if let Some(ignore) = self.ignore {
                match ignore.visibility(&child_root_rel, is_dir) {
                    Visibility::Hidden => continue,
                    Visibility::DescendOnly => lazy = true,
                    Visibility::Included => {}
                }
            }
            if !self.exclude.is_empty() && self.exclude.matches(&child_rel_str) {
                if is_dir && self.exclude.has_exclusions {
                    lazy = true;
                } else {
                    continue;
                }
            }
            if let Some(include) = filter.include
                && !include.matches(&child_rel_str)
            {
                if is_dir && could_match_below(&filter.include_comps, &child_rel_str) {
                    lazy = true;
                } else {
                    continue;
                }
            }
            let abs = dir.join(&name);
            if is_dir {
                let mark = out.len();
                out.push(Entry {
                    rel: child_rel.clone(),
                    abs: abs.clone(),
                    meta,
                });
                self.walk(&abs, &child_rel, &child_root_rel, filter, out)?;
                if lazy && out.len() == mark + 1 {
                    out.truncate(mark);
                }
            } else if !lazy {
                out.push(Entry {
                    rel: child_rel,
                    abs,
                    meta,
                });
            }
        }
        Ok(())
    }
}

/// Whether something below directory `dir_rel` could match the include pattern (split into
/// components); used to avoid walking unrelated trees with `--parents`.
fn could_match_below(pattern: &[String], dir_rel: &str) -> bool {
    let dir: Vec<&str> = dir_rel.split('/').collect();
    for (i, d) in dir.iter().enumerate() {
        let Some(p) = pattern.get(i) else {
            return false;
        };
        if p.contains("**") {
            return true;
        }
        if !go_match(p, d).unwrap_or(true) {
            return false;
        }
    }
    pattern.len() > dir.len()
}

/// Directory entries sorted by name, with their `lstat` metadata.
fn read_dir_sorted(dir: &Path) -> Result<Vec<(OsString, Metadata)>, CopyError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(io_err("stat", &path))?;
        out.push((entry.file_name(), meta));
    }
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Archives (ADD)
// ---------------------------------------------------------------------------------------------

/// Reads the output of an external decompressor (`xz`, `bzip2`), as Docker's archive package
/// does for xz; reports a non-zero exit at end of stream.
struct ChildReader {
    child: Child,
    stdout: ChildStdout,
    command: &'static str,
    finished: bool,
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.finished {
            self.finished = true;
            let status = self.child.wait()?;
            if !status.success() {
                return Err(io::Error::other(format!(
                    "`{} -d -c -q` exited with {status}",
                    self.command
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Opens a possibly compressed stream: gzip, zstd, bzip2, xz (by magic number) or plain.
fn open_decompressed(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        let got = file.read(magic.get_mut(n..).unwrap_or(&mut []))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    file.seek(SeekFrom::Start(0))?;
    let head = magic.get(..n).unwrap_or(&[]);
    let external = |command: &'static str, file: File| -> io::Result<Box<dyn Read>> {
        let mut child = Command::new(command)
            .args(["-d", "-c", "-q"])
            .stdin(Stdio::from(file))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run `{command}`: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other(format!("`{command}` has no stdout")))?;
        Ok(Box::new(ChildReader {
            child,
            stdout,
            command,
            finished: false,
        }))
    };
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(
            file,
        ))))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::new(file)?))
    } else if head.starts_with(b"BZh") {
        external("bzip2", file)
    } else if head.starts_with(&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) {
        external("xz", file)
    } else {
        Ok(Box::new(file))
    }
}

/// Whether `path` is a regular file holding a (possibly compressed) tar archive: its first tar
/// header can be read.
fn is_archive(path: &Path) -> bool {
    let Ok(reader) = open_decompressed(path) else {
        return false;
    };
    let mut archive = tar::Archive::new(reader);
    let Ok(mut entries) = archive.entries() else {
        return false;
    };
    matches!(entries.next(), Some(Ok(_)))
}

/// Removes whatever is at `path` (a directory with its contents), if anything.
fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Cleans an archive member name into components below the extraction directory (`..` cannot
/// climb above it).
fn archive_member(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    clean(&format!("/{s}")).trim_start_matches('/').to_string()
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, perm: u32, rdev: u64) -> io::Result<()> {
    let mode = nix::sys::stat::Mode::from_bits_truncate(perm & 0o7777);
    nix::sys::stat::mknod(path, kind, mode, rdev).map_err(io::Error::from)
}

/// Extracts the archive at `archive` into the existing directory `dest`, the way ADD does
/// (containerd's `Apply`): entries keep the archive's owners (or get `chown`), modes and times;
/// member paths and hard link targets are resolved with `dest` as their root, so nothing is
/// written outside it.
fn extract_archive(archive: &Path, dest: &Path, chown: Option<Owner>) -> Result<(), CopyError> {
    let fail = |error: io::Error| CopyError::Archive {
        path: archive.to_path_buf(),
        error,
    };
    let reader = open_decompressed(archive).map_err(fail)?;
    let mut ar = tar::Archive::new(reader);
    let mut dir_times: Vec<(PathBuf, FileTime)> = Vec::new();
    for entry in ar.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        }
        let member = archive_member(&entry.path_bytes());
        let parent = resolve(dest, &dir_of(&member), true, Escape::Clamp, &member)?;
        let target = match member.rsplit('/').next() {
            Some(base) if !base.is_empty() => parent.host.join(base),
            _ => dest.to_path_buf(),
        };
        mkdir_all(&parent.host, chown.unwrap_or(ROOT))?;
        // Empty numeric fields read as 0, as Go's archive/tar does.
        let owner = match chown {
            Some(o) => o,
            None => Owner {
                uid: header
                    .uid()
                    .ok()
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0),
                gid: header
                    .gid()
                    .ok()
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0),
            },
        };
        let mode = header.mode().unwrap_or(0) & 0o7777;
        let mtime = FileTime::from_unix_time(
            header
                .mtime()
                .ok()
                .and_then(|v| i64::try_from(v).ok())
                .unwrap_or(0),
            0,
        );
        let xattrs: Vec<(String, Vec<u8>)> = match entry.pax_extensions() {
            Ok(Some(exts)) => exts
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let key = e.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_string();
                    Some((key, e.value_bytes().to_vec()))
                })
                .collect(),
            _ => Vec::new(),
        };
        let chown_target = |p: &Path| {
            std::os::unix::fs::lchown(p, Some(owner.uid), Some(owner.gid))
                .map_err(io_err("chown", p))
        };
        let chmod_target = |p: &Path| {
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", p))
        };
        use tar::EntryType;
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&target).map_err(io_err("remove", &target))?;
                        fs::create_dir(&target).map_err(io_err("create directory", &target))?;
                    }
                    Err(_) => {
                        fs::create_dir(&target).map_err(io_err("create directory", &target))?
                    }
                }
                chown_target(&target)?;
                chmod_target(&target)?;
                dir_times.push((target.clone(), mtime));
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                remove_existing(&target).map_err(io_err("remove", &target))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                    .map_err(io_err("create symlink", &target))?;
                chown_target(&target)?;
                filetime::set_symlink_file_times(&target, mtime, mtime)
                    .map_err(io_err("set times of", &target))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default();
                let link_member = archive_member(&link);
                let link_parent = resolve(
                    dest,
                    &dir_of(&link_member),
                    true,
                    Escape::Clamp,
                    &link_member,
                )?;
                let link_src = match link_member.rsplit('/').next() {
                    Some(base) if !base.is_empty() => link_parent.host.join(base),
                    _ => link_parent.host,
                };
                remove_existing(&target).map_err(io_err("remove", &target))?;
                fs::hard_link(&link_src, &target).map_err(io_err("hard link", &target))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                use nix::sys::stat::SFlag;
                let (flag, rdev) = match kind {
                    EntryType::Char | EntryType::Block => {
                        let major = header.device_major().map_err(fail)?.unwrap_or(0);
                        let minor = header.device_minor().map_err(fail)?.unwrap_or(0);
                        let flag = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, nix::sys::stat::makedev(major.into(), minor.into()))
                    }
                    _ => (SFlag::S_IFIFO, 0),
                };
                remove_existing(&target).map_err(io_err("remove", &target))?;
                mknod(&target, flag, mode, rdev).map_err(io_err("create device", &target))?;
                chown_target(&target)?;
                chmod_target(&target)?;
                filetime::set_symlink_file_times(&target, mtime, mtime)
                    .map_err(io_err("set times of", &target))?;
            }
            _ => {
                // Regular files, and (as POSIX asks) any unknown type.
                remove_existing(&target).map_err(io_err("remove", &target))?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                io::copy(&mut entry, &mut out).map_err(fail)?;
                drop(out);
                chown_target(&target)?;
                chmod_target(&target)?;
                filetime::set_symlink_file_times(&target, mtime, mtime)
                    .map_err(io_err("set times of", &target))?;
            }
        }
        for (key, value) in xattrs {
            if let Err(e) = xattr::set(&target, &key, &value) {
                tracing::debug!(path = %target.display(), key, error = %e, "xattr from archive not set");
            }
        }
    }
    for (dir, mtime) in dir_times.iter().rev() {
        filetime::set_symlink_file_times(dir, mtime.to_owned(), mtime.to_owned())
            .map_err(io_err("set times of", dir))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Copying
// ---------------------------------------------------------------------------------------------

struct Writer<'a> {
    /// The owner of every copy; `None` keeps each source's.
    owner: Option<Owner>,
    chmod: Option<&'a Chmod>,
    /// Directories whose owner, mode and times are set once their contents are written.
    pending_dirs: Vec<(PathBuf, &'a Entry)>,
    /// First copy of each multiply-linked inode, to recreate hard links.
    inodes: HashMap<(u64, u64), PathBuf>,
}

impl<'a> Writer<'a> {
    fn mode_for(&self, meta: &Metadata) -> u32 {
        match self.chmod {
            Some(c) => c.apply(meta.mode(), meta.is_dir()),
            None => meta.mode() & 0o7777,
        }
    }

    /// Owner, mode, times and xattrs of `src` onto `target`.
    fn finish(&self, src: &Path, meta: &Metadata, target: &Path) -> Result<(), CopyError> {
        let owner = self.owner.unwrap_or(Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        });
        std::os::unix::fs::lchown(target, Some(owner.uid), Some(owner.gid))
            .map_err(io_err("chown", target))?;
        if !meta.file_type().is_symlink() {
            fs::set_permissions(target, fs::Permissions::from_mode(self.mode_for(meta)))
                .map_err(io_err("chmod", target))?;
            copy_xattrs(src, target);
        }
        set_times(meta, target)
    }

    /// Ensures `target` can receive a non-directory: removes what is there unless it is a
    /// directory.
    fn clear_file_target(target: &Path) -> Result<(), CopyError> {
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => Err(CopyError::ReplaceDirectory {
                path: target.to_path_buf(),
            }),
            Ok(_) => fs::remove_file(target).map_err(io_err("remove", target)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("stat", target)(e)),
        }
    }

    fn copy_entry(&mut self, e: &'a Entry, target: &Path) -> Result<(), CopyError> {
        let ft = e.meta.file_type();
        if ft.is_dir() {
            match fs::symlink_metadata(target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(CopyError::NotADirectory {
                        path: target.to_path_buf(),
                    });
                }
                Err(_) => fs::DirBuilder::new()
                    .mode(0o700)
                    .create(target)
                    .map_err(io_err("create directory", target))?,
            }
            self.pending_dirs.push((target.to_path_buf(), e));
            return Ok(());
        }
        Self::clear_file_target(target)?;
        if ft.is_file() {
            let key = (e.meta.dev(), e.meta.ino());
            if e.meta.nlink() > 1 {
                if let Some(first) = self.inodes.get(&key) {
                    fs::hard_link(first, target).map_err(io_err("hard link", target))?;
                    return self.finish(&e.abs, &e.meta, target);
                }
                self.inodes.insert(key, target.to_path_buf());
            }
            let mut src = File::open(&e.abs).map_err(io_err("open", &e.abs))?;
            let mut dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(target)
                .map_err(io_err("create", target))?;
            io::copy(&mut src, &mut dst).map_err(io_err("copy to", target))?;
        } else if ft.is_symlink() {
            let link = fs::read_link(&e.abs).map_err(io_err("read link", &e.abs))?;
            std::os::unix::fs::symlink(&link, target).map_err(io_err("create symlink", target))?;
        } else {
            use nix::sys::stat::SFlag;
            let flag = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else if ft.is_block_device() {
                SFlag::S_IFBLK
            } else if ft.is_fifo() {
                SFlag::S_IFIFO
            } else {
                SFlag::S_IFSOCK
            };
            mknod(target, flag, e.meta.mode(), e.meta.rdev())
                .map_err(io_err("create device", target))?;
        }
        self.finish(&e.abs, &e.meta, target)
    }
}

fn set_times(meta: &Metadata, target: &Path) -> Result<(), CopyError> {
    let atime = FileTime::from_last_access_time(meta);
    let mtime = FileTime::from_last_modification_time(meta);
    filetime::set_symlink_file_times(target, atime, mtime).map_err(io_err("set times of", target))
}

/// Copies extended attributes (capabilities, ACLs, user attributes); failures are logged and
/// ignored, as BuildKit does.
fn copy_xattrs(src: &Path, target: &Path) {
    let Ok(names) = xattr::list(src) else {
        return;
    };
    for name in names {
        if let Ok(Some(value)) = xattr::get(src, &name)
            && let Err(e) = xattr::set(target, &name, &value)
        {
            tracing::debug!(path = %target.display(), key = ?name, error = %e, "xattr not copied");
        }
    }
}

/// Copies per COPY/ADD rules from `src_root` (the build context or another stage's rootfs) into
/// `dst_root` (the step's rootfs). `ignore` is the context's .dockerignore (None for stages).
/// URLs (ADD only) must already be downloaded: see [`fetch_urls`].
pub fn copy_into(
    src_root: &Path,
    dst_root: &Path,
    spec: &CopySpec,
    ignore: Option<&DockerIgnore>,
) -> Result<(), CopyError> {
    let plan = build_plan(src_root, spec, ignore)?;
    if plan.items.is_empty() {
        return Ok(());
    }
    if !fs::metadata(dst_root)
        .map_err(io_err("stat", dst_root))?
        .is_dir()
    {
        return Err(CopyError::NotADirectory {
            path: dst_root.to_path_buf(),
        });
    }
    let (dest, _) = dest_path(spec);
    let ensure = if plan.dest_is_dir {
        dest.clone()
    } else {
        dir_of(&dest)
    };
    let ensure_host = resolve(dst_root, &ensure, true, Escape::Clamp, &ensure)?.host;
    mkdir_all(&ensure_host, plan.created_owner())?;
    let mut writer = Writer {
        owner: plan.owner,
        chmod: plan.chmod.as_ref(),
        pending_dirs: Vec::new(),
        inodes: HashMap::new(),
    };
    for item in &plan.items {
        let dst = resolve(dst_root, &dest, true, Escape::Clamp, &dest)?.host;
        let dst_meta = fs::symlink_metadata(&dst).ok();
        let dst_is_dir = dst_meta.as_ref().is_some_and(Metadata::is_dir);
        match item {
            Item::Path {
                root, unpack: true, ..
            } => {
                mkdir_all(&dst, plan.created_owner())?;
                extract_archive(&root.abs, &dst, spec.chown)?;
            }
            Item::Path {
                name,
                root,
                children,
                ..
            } => {
                if root.meta.is_dir() {
                    match &dst_meta {
                        None => mkdir_all(&dst, plan.created_owner())?,
                        Some(m) if !m.is_dir() => {
                            return Err(CopyError::NotADirectory { path: dst });
                        }
                        Some(_) => {}
                    }
                    writer.inodes.clear();
                    for child in children {
                        writer.copy_entry(child, &dst.join(&child.rel))?;
                    }
                    for (dir, e) in std::mem::take(&mut writer.pending_dirs).iter().rev() {
                        writer.finish(&e.abs, &e.meta, dir)?;
                    }
                    set_times(&root.meta, &dst)?;
                } else {
                    let target = if dst_is_dir { dst.join(name) } else { dst };
                    if let Some(parent) = target.parent() {
                        mkdir_all(parent, plan.created_owner())?;
                    }
                    writer.inodes.clear();
                    writer.copy_entry(root, &target)?;
                }
            }
            Item::Inline { name, content } => {
                let target = if dst_is_dir { dst.join(name) } else { dst };
                if let Some(parent) = target.parent() {
                    mkdir_all(parent, plan.created_owner())?;
                }
                Writer::clear_file_target(&target)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                f.write_all(content).map_err(io_err("write", &target))?;
                drop(f);
                let owner = plan.created_owner();
                std::os::unix::fs::lchown(&target, Some(owner.uid), Some(owner.gid))
                    .map_err(io_err("chown", &target))?;
                let mode = plan.chmod.as_ref().map_or(0o644, |c| c.apply(0o644, false));
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &target))?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Source digest
// ---------------------------------------------------------------------------------------------

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

fn put_u64(h: &mut blake3::Hasher, v: u64) {
    h.update(&v.to_le_bytes());
}

/// blake3 of a file's bytes, read in 1 MiB blocks.
fn hash_file(path: &Path, buf: &mut [u8]) -> Result<blake3::Hash, CopyError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h = blake3::Hasher::new();
    loop {
        let n = f.read(buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or(&[]));
    }
    Ok(h.finalize())
}

/// What the digest needs to read from one entry besides its metadata.
#[derive(Debug, Default)]
struct EntryData {
    /// blake3 of a regular file's bytes.
    content: Option<blake3::Hash>,
    /// A symbolic link's target.
    link: Option<PathBuf>,
    /// Extended attributes, sorted by name.
    xattrs: Vec<(OsString, Vec<u8>)>,
}

fn read_entry_data(
    e: &Entry,
    buf: &mut [u8],
    cache: Option<&HashCache>,
) -> Result<EntryData, CopyError> {
    let ft = e.meta.file_type();
    let mut data = EntryData::default();
    if ft.is_symlink() {
        data.link = Some(fs::read_link(&e.abs).map_err(io_err("read link", &e.abs))?);
        return Ok(data);
    }
    if let Ok(names) = xattr::list(&e.abs) {
        data.xattrs = names
            .filter_map(|n| {
                let v = xattr::get(&e.abs, &n).ok().flatten()?;
                Some((n, v))
            })
            .collect();
        data.xattrs.sort();
    }
    if ft.is_file() {
        let known = cache.and_then(|c| c.get(&e.meta));
        data.content = Some(match known {
            Some(h) => h,
            None => {
                let h = hash_file(&e.abs, buf)?;
                if let Some(c) = cache {
                    c.put(&e.meta, h);
                }
                h
            }
        });
    }
    Ok(data)
}

/// Reads what the digest needs from every entry, on all cores (plain threads, one 1 MiB
/// buffer each); results come back in the order of `entries`.
fn read_entries_parallel(
    entries: &[&Entry],
    cache: Option<&HashCache>,
) -> Result<Vec<EntryData>, CopyError> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(entries.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<EntryData>>> = Mutex::new(
        std::iter::repeat_with(|| None)
            .take(entries.len())
            .collect(),
    );
    let first_error: Mutex<Option<CopyError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                let mut local = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(entry) = entries.get(i) else { break };
                    match read_entry_data(entry, &mut buf, cache) {
                        Ok(d) => local.push((i, d)),
                        Err(e) => {
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                            next.store(entries.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
                if let Ok(mut r) = results.lock() {
                    for (i, d) in local {
                        if let Some(slot) = r.get_mut(i) {
                            *slot = Some(d);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_default();
    results
        .into_iter()
        .zip(entries)
        .map(|(d, e)| {
            d.ok_or_else(|| CopyError::Io {
                op: "hash",
                path: e.abs.clone(),
                error: io::Error::other("entry was not read"),
            })
        })
        .collect()
}

fn file_type_tag(meta: &Metadata) -> u8 {
    let ft = meta.file_type();
    if ft.is_dir() {
        b'd'
    } else if ft.is_file() {
        b'f'
    } else if ft.is_symlink() {
        b'l'
    } else if ft.is_char_device() {
        b'c'
    } else if ft.is_block_device() {
        b'b'
    } else if ft.is_fifo() {
        b'p'
    } else {
        b's'
    }
}

/// The content hash of exactly the files `copy_into` would read (after globbing, exclusion and
/// .dockerignore): over each file's relative path, type, mode, uid, gid (as they will be written,
/// i.e. after chown/chmod are applied, plus the raw flags), size, link target, extended
/// attributes and bytes — never mtimes. blake3; file contents are hashed on all cores.
pub fn source_digest(
    src_root: &Path,
    spec: &CopySpec,
    ignore: Option<&DockerIgnore>,
) -> Result<blake3::Hash, CopyError> {
    source_digest_cached(src_root, spec, ignore, None)
}

/// [`source_digest`], reading only the files whose metadata `cache` does not know.
pub fn source_digest_cached(
    src_root: &Path,
    spec: &CopySpec,
    ignore: Option<&DockerIgnore>,
    cache: Option<&HashCache>,
) -> Result<blake3::Hash, CopyError> {
    let plan = build_plan(src_root, spec, ignore)?;
    // Everything that needs reading is read first, in parallel.
    let mut entries: Vec<&Entry> = Vec::new();
    for item in &plan.items {
        if let Item::Path { root, children, .. } = item {
            entries.push(root);
            entries.extend(children);
        }
    }
    let mut data = read_entries_parallel(&entries, cache)?.into_iter();

    let mut h = blake3::Hasher::new();
    h.update(b"strata copy source digest v1\0");
    h.update(&[u8::from(spec.is_add), u8::from(spec.parents)]);
    match spec.chown {
        Some(o) => {
            h.update(b"chown");
            put_u64(&mut h, o.uid.into());
            put_u64(&mut h, o.gid.into());
        }
        None => {
            h.update(b"nochown");
        }
    }
    put_bytes(&mut h, spec.chmod.as_deref().unwrap_or("").as_bytes());
    for item in &plan.items {
        match item {
            Item::Path {
                name,
                root,
                children,
                unpack,
            } => {
                h.update(if *unpack { b"A" } else { b"P" });
                put_bytes(&mut h, name.as_bytes());
                let mut links: HashMap<(u64, u64), usize> = HashMap::new();
                for (idx, e) in std::iter::once(&**root).chain(children).enumerate() {
                    let d = data.next().ok_or_else(|| CopyError::Io {
                        op: "hash",
                        path: e.abs.clone(),
                        error: io::Error::other("entry was not read"),
                    })?;
                    let meta = &e.meta;
                    let ft = meta.file_type();
                    put_bytes(&mut h, e.rel.as_os_str().as_bytes());
                    h.update(&[file_type_tag(meta)]);
                    let mode = match &plan.chmod {
                        Some(c) if !ft.is_symlink() => c.apply(meta.mode(), meta.is_dir()),
                        _ => meta.mode() & 0o7777,
                    };
                    put_u64(&mut h, mode.into());
                    let owner = plan.owner_of(meta);
                    put_u64(&mut h, owner.uid.into());
                    put_u64(&mut h, owner.gid.into());
                    if let Some(link) = &d.link {
                        put_bytes(&mut h, link.as_os_str().as_bytes());
                    }
                    if ft.is_char_device() || ft.is_block_device() {
                        put_u64(&mut h, meta.rdev());
                    }
                    put_u64(&mut h, d.xattrs.len() as u64);
                    for (k, v) in &d.xattrs {
                        put_bytes(&mut h, k.as_bytes());
                        put_bytes(&mut h, v);
                    }
                    if let Some(content) = d.content {
                        put_u64(&mut h, meta.len());
                        if meta.nlink() > 1 {
                            let first = *links.entry((meta.dev(), meta.ino())).or_insert(idx);
                            put_u64(&mut h, first as u64);
                        }
                        h.update(content.as_bytes());
                    }
                }
            }
            Item::Inline { name, content } => {
                h.update(b"I");
                put_bytes(&mut h, name.as_bytes());
                let mode = plan.chmod.as_ref().map_or(0o644, |c| c.apply(0o644, false));
                put_u64(&mut h, mode.into());
                let owner = plan.created_owner();
                put_u64(&mut h, owner.uid.into());
                put_u64(&mut h, owner.gid.into());
                put_u64(&mut h, content.len() as u64);
                h.update(blake3::hash(content).as_bytes());
            }
        }
    }
    Ok(h.finalize())
}

// ---------------------------------------------------------------------------------------------
// URLs (ADD)
// ---------------------------------------------------------------------------------------------

enum Checksum {
    Sha256(String),
    Sha384(String),
    Sha512(String),
}

impl Checksum {
    fn parse(value: &str) -> Result<Checksum, CopyError> {
        let invalid = || CopyError::InvalidChecksum {
            value: value.to_string(),
        };
        let (algo, hex) = value.split_once(':').ok_or_else(invalid)?;
        let want_len = match algo {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err(invalid()),
        };
        if hex.len() != want_len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let hex = hex.to_ascii_lowercase();
        Ok(match algo {
            "sha256" => Checksum::Sha256(hex),
            "sha384" => Checksum::Sha384(hex),
            _ => Checksum::Sha512(hex),
        })
    }

    fn expected(&self) -> String {
        match self {
            Checksum::Sha256(h) => format!("sha256:{h}"),
            Checksum::Sha384(h) => format!("sha384:{h}"),
            Checksum::Sha512(h) => format!("sha512:{h}"),
        }
    }
}

enum Hashing {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hashing {
    fn for_checksum(c: Option<&Checksum>) -> Hashing {
        match c {
            Some(Checksum::Sha384(_)) => Hashing::Sha384(sha2::Sha384::new()),
            Some(Checksum::Sha512(_)) => Hashing::Sha512(sha2::Sha512::new()),
            _ => Hashing::Sha256(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hashing::Sha256(h) => h.update(b),
            Hashing::Sha384(h) => h.update(b),
            Hashing::Sha512(h) => h.update(b),
        }
    }

    fn finish(self) -> String {
        fn hex(bytes: &[u8]) -> String {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
        match self {
            Hashing::Sha256(h) => format!("sha256:{}", hex(&h.finalize())),
            Hashing::Sha384(h) => format!("sha384:{}", hex(&h.finalize())),
            Hashing::Sha512(h) => format!("sha512:{}", hex(&h.finalize())),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file name of a download: the last segment of the URL's path, or `__unnamed__`.
fn url_file_name(url: &reqwest::Url) -> String {
    let path = percent_decode(url.path());
    let cleaned = clean(&path);
    match cleaned.rsplit('/').next() {
        Some(base) if !base.is_empty() && base != "." && base != ".." => base.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an HTTP date (IMF-fixdate, RFC 850 or asctime), as Go's `http.ParseTime`.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let (day, mon, year, time) = match parts.as_slice() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        [_, d, m, y, t, "GMT"] => (d.parse::<u32>().ok()?, *m, y.parse::<i64>().ok()?, *t),
        // Sunday, 06-Nov-94 08:49:37 GMT
        [_, dmy, t, "GMT"] => {
            let mut it = dmy.split('-');
            let d = it.next()?.parse::<u32>().ok()?;
            let m = it.next()?;
            let y = it.next()?.parse::<i64>().ok()?;
            (d, m, if y < 100 { y + 1900 } else { y }, *t)
        }
        // Sun Nov  6 08:49:37 1994
        [_, m, d, t, y] => (d.parse::<u32>().ok()?, *m, y.parse::<i64>().ok()?, *t),
        _ => return None,
    };
    let month = u32::try_from(MONTHS.iter().position(|m| *m == mon)? + 1).ok()?;
    let mut hms = time.split(':').map(|p| p.parse::<u32>().ok());
    let (h, mi, se) = (hms.next()??, hms.next()??, hms.next()??);
    if day == 0 || day > 31 || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(se);
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Downloads the http(s) sources of an ADD into `dir`, verifying checksums; returns a spec whose
/// URL sources are replaced by the downloaded files (relative to `dir`), to be copied from `dir`
/// with [`copy_into`] (or hashed with [`source_digest`]). The returned spec holds only the
/// downloaded files: the local sources of a mixed ADD are copied from the context with
/// [`CopySpec::without_urls`]. Downloads are never extracted; they get mode 0600 (before
/// `--chmod`) and the `Last-Modified` time. Each download goes into its own numbered
/// subdirectory of `dir`, so equal file names do not collide.
pub async fn fetch_urls(spec: &CopySpec, dir: &Path) -> Result<CopySpec, CopyError> {
    validate_urls_and_checksum(spec)?;
    let (_, dir_shaped) = dest_path(spec);
    if !spec.parents && spec.sources.len() + spec.inline.len() > 1 && !dir_shaped {
        return Err(CopyError::DestinationNotDirectory {
            instruction: instruction(spec),
        });
    }
    let checksum = spec.checksum.as_deref().map(Checksum::parse).transpose()?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|error| CopyError::Http {
            url: String::new(),
            error,
        })?;
    let mut sources = Vec::new();
    for (i, url) in spec.sources.iter().filter(|s| is_url(s)).enumerate() {
        let http = |error| CopyError::Http {
            url: url.clone(),
            error,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| CopyError::Io {
            op: "parse URL",
            path: PathBuf::from(url),
            error: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        let name = url_file_name(&parsed);
        let sub = dir.join(i.to_string());
        tokio::fs::create_dir_all(&sub)
            .await
            .map_err(io_err("create directory", &sub))?;
        let path = sub.join(&name);
        let mut resp = client.get(parsed).send().await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(CopyError::HttpStatus {
                url: url.clone(),
                status: resp.status().as_u16(),
            });
        }
        let mtime = resp
            .headers()
            .get(reqwest::header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(io_err("create", &path))?;
        let mut hashing = Hashing::for_checksum(checksum.as_ref());
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            hashing.update(&chunk);
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(io_err("write", &path))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(io_err("write", &path))?;
        drop(file);
        let actual = hashing.finish();
        if let Some(c) = &checksum
            && c.expected() != actual
        {
            return Err(CopyError::ChecksumMismatch {
                url: url.clone(),
                expected: c.expected(),
                actual,
            });
        }
        tokio::fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .await
            .map_err(io_err("chmod", &path))?;
        if let Some(t) = mtime {
            let ft = FileTime::from_system_time(t);
            filetime::set_file_times(&path, ft, ft).map_err(io_err("set times of", &path))?;
        }
        sources.push(format!("{i}/{}", escape_glob(&name)));
    }
    Ok(CopySpec {
        sources,
        inline: Vec::new(),
        dest: spec.dest.clone(),
        workdir: spec.workdir.clone(),
        chown: spec.chown,
        keep_owners: false,
        chmod: spec.chmod.clone(),
        exclude: Vec::new(),
        parents: false,
        is_add: false,
        checksum: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn write(root: &Path, rel: &str, content: &str, mode: u32) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn read(root: &Path, rel: &str) -> String {
        fs::read_to_string(root.join(rel)).unwrap()
    }

    fn mode(root: &Path, rel: &str) -> u32 {
        fs::symlink_metadata(root.join(rel)).unwrap().mode() & 0o7777
    }

    fn owner(root: &Path, rel: &str) -> (u32, u32) {
        let m = fs::symlink_metadata(root.join(rel)).unwrap();
        (m.uid(), m.gid())
    }

    fn exists(root: &Path, rel: &str) -> bool {
        fs::symlink_metadata(root.join(rel)).is_ok()
    }

    fn spec(sources: &[&str], dest: &str) -> CopySpec {
        CopySpec {
            sources: sources.iter().map(|s| s.to_string()).collect(),
            dest: dest.to_string(),
            workdir: "/".to_string(),
            ..Default::default()
        }
    }

    /// A context with a few files, and an empty destination root.
    fn setup() -> (TempDir, TempDir) {
        let ctx = TempDir::new().unwrap();
        let dst = TempDir::new().unwrap();
        write(ctx.path(), "a.txt", "A", 0o644);
        write(ctx.path(), "b.txt", "B", 0o600);
        write(ctx.path(), "run.sh", "#!/bin/sh\n", 0o755);
        write(ctx.path(), "dir/one.txt", "1", 0o644);
        write(ctx.path(), "dir/sub/two.md", "2", 0o640);
        (ctx, dst)
    }

    fn copy(ctx: &TempDir, dst: &TempDir, spec: &CopySpec) -> Result<(), CopyError> {
        copy_into(ctx.path(), dst.path(), spec, None)
    }

    #[test]
    fn file_to_dest_with_trailing_slash_goes_inside() {
        let (ctx, dst) = setup();
        copy(&ctx, &dst, &spec(&["a.txt"], "/app/")).unwrap();
        assert_eq!(read(dst.path(), "app/a.txt"), "A");
    }

    #[test]
    fn file_to_dest_without_slash_names_the_file() {
        let (ctx, dst) = setup();
        copy(&ctx, &dst, &spec(&["a.txt"], "/app/renamed")).unwrap();
        assert_eq!(read(dst.path(), "app/renamed"), "A");
        assert!(
            fs::metadata(dst.path().join("app/renamed"))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn file_into_existing_directory_without_slash() {
        let (ctx, dst) = setup();
        fs::create_dir_all(dst.path().join("opt")).unwrap();
        copy(&ctx, &dst, &spec(&["a.txt"], "/opt")).unwrap();
        assert_eq!(read(dst.path(), "opt/a.txt"), "A");
    }

    #[test]
    fn relative_dest_is_joined_to_workdir() {
        let (ctx, dst) = setup();
        let mut s = spec(&["a.txt"], "sub/");
        s.workdir = "/work".into();
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "work/sub/a.txt"), "A");
        let mut s = spec(&["a.txt", "b.txt"], ".");
        s.workdir = "/w2".into();
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "w2/a.txt"), "A");
        assert_eq!(read(dst.path(), "w2/b.txt"), "B");
    }

    #[test]
    fn directory_source_copies_its_contents() {
        let (ctx, dst) = setup();
        copy(&ctx, &dst, &spec(&["dir"], "/x")).unwrap();
        assert_eq!(read(dst.path(), "x/one.txt"), "1");
        assert_eq!(read(dst.path(), "x/sub/two.md"), "2");
        assert!(!exists(dst.path(), "x/dir"));
        // The whole context, with "." and "/".
        copy(&ctx, &dst, &spec(&["."], "/all/")).unwrap();
        assert_eq!(read(dst.path(), "all/dir/sub/two.md"), "2");
        copy(&ctx, &dst, &spec(&["/"], "/all2")).unwrap();
        assert_eq!(read(dst.path(), "all2/a.txt"), "A");
    }

    #[test]
    fn directory_onto_existing_file_is_an_error() {
        let (ctx, dst) = setup();
        write(dst.path(), "x", "file", 0o644);
        let err = copy(&ctx, &dst, &spec(&["dir"], "/x")).unwrap_err();
        assert!(matches!(err, CopyError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn glob_matches_files_and_copies_directory_contents() {
        let (ctx, dst) = setup();
        write(ctx.path(), "dir2/three.txt", "3", 0o644);
        copy(&ctx, &dst, &spec(&["*.txt"], "/g/")).unwrap();
        assert_eq!(read(dst.path(), "g/a.txt"), "A");
        assert_eq!(read(dst.path(), "g/b.txt"), "B");
        assert!(!exists(dst.path(), "g/run.sh"));
        copy(&ctx, &dst, &spec(&["di?"], "/d/")).unwrap();
        assert_eq!(read(dst.path(), "d/one.txt"), "1");
        assert!(!exists(dst.path(), "d/three.txt"));
        copy(
            &ctx,
            &dst,
            &spec(&["dir[0-9]/*.txt", "/dir/sub/*.m[a-z]"], "/e/"),
        )
        .unwrap();
        assert_eq!(read(dst.path(), "e/three.txt"), "3");
        assert_eq!(read(dst.path(), "e/two.md"), "2");
    }

    #[test]
    fn several_sources_need_a_directory_destination() {
        let (ctx, dst) = setup();
        let err = copy(&ctx, &dst, &spec(&["a.txt", "b.txt"], "/dest")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "When using COPY with more than one source file, the destination must be a directory and end with a /"
        );
        // One wildcard argument is one source, whatever it matches (BuildKit's
        // `testCopyWildcards`): its matches go into the destination as a directory.
        copy(&ctx, &dst, &spec(&["*.txt"], "/globbed")).unwrap();
        assert!(exists(dst.path(), "globbed/a.txt") && exists(dst.path(), "globbed/b.txt"));
        copy(&ctx, &dst, &spec(&["a.*"], "/single")).unwrap();
        assert_eq!(
            fs::read_to_string(dst.path().join("single")).unwrap(),
            "A",
            "one match is copied to the destination itself"
        );
        let mut add = spec(&["a.txt"], "/dest");
        add.is_add = true;
        add.inline = vec![("f".into(), b"x".to_vec())];
        let err = copy(&ctx, &dst, &add).unwrap_err();
        assert!(
            err.to_string().starts_with("When using ADD with more"),
            "{err}"
        );
        assert!(!exists(dst.path(), "dest"));
        copy(&ctx, &dst, &spec(&["a.txt", "b.txt"], "/dest/")).unwrap();
        assert_eq!(read(dst.path(), "dest/b.txt"), "B");
    }

    #[test]
    fn glob_with_one_match_may_name_a_file() {
        let (ctx, dst) = setup();
        copy(&ctx, &dst, &spec(&["run*"], "/usr/bin/entry")).unwrap();
        assert_eq!(read(dst.path(), "usr/bin/entry"), "#!/bin/sh\n");
    }

    #[test]
    fn empty_glob_copies_nothing_but_missing_paths_are_errors() {
        let (ctx, dst) = setup();
        copy(&ctx, &dst, &spec(&["*.none"], "/nothing/")).unwrap();
        assert!(!exists(dst.path(), "nothing"));
        let err = copy(&ctx, &dst, &spec(&["missing.txt"], "/x/")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to compute cache key: \"missing.txt\": not found"
        );
        let err = copy(&ctx, &dst, &spec(&["nodir/*.txt"], "/x/")).unwrap_err();
        assert!(
            matches!(err, CopyError::NotFound { ref path } if path == "nodir/*.txt"),
            "{err}"
        );
        let err = copy(&ctx, &dst, &spec(&["a.txt/x"], "/x/")).unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
    }

    #[test]
    fn missing_parents_are_created_owned_by_chown_user() {
        let (ctx, dst) = setup();
        copy(&ctx, &dst, &spec(&["a.txt"], "/p/q/r/")).unwrap();
        assert_eq!(owner(dst.path(), "p/q"), (0, 0));
        assert_eq!(mode(dst.path(), "p/q"), 0o755);
        let mut s = spec(&["a.txt"], "/u/v/file");
        s.chown = Some(Owner {
            uid: 1000,
            gid: 1001,
        });
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(owner(dst.path(), "u"), (1000, 1001));
        assert_eq!(owner(dst.path(), "u/v"), (1000, 1001));
        assert_eq!(owner(dst.path(), "u/v/file"), (1000, 1001));
        assert_eq!(mode(dst.path(), "u/v"), 0o755);
    }

    #[test]
    fn owner_becomes_root_and_modes_are_kept() {
        let (ctx, dst) = setup();
        std::os::unix::fs::lchown(ctx.path().join("b.txt"), Some(1234), Some(4321)).unwrap();
        std::os::unix::fs::lchown(ctx.path().join("dir/sub"), Some(1234), Some(4321)).unwrap();
        fs::set_permissions(
            ctx.path().join("dir/sub"),
            fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        copy(&ctx, &dst, &spec(&["b.txt", "run.sh", "dir"], "/o/")).unwrap();
        assert_eq!(owner(dst.path(), "o/b.txt"), (0, 0));
        assert_eq!(mode(dst.path(), "o/b.txt"), 0o600);
        assert_eq!(mode(dst.path(), "o/run.sh"), 0o755);
        assert_eq!(owner(dst.path(), "o/sub"), (0, 0));
        assert_eq!(mode(dst.path(), "o/sub"), 0o750);
        assert_eq!(mode(dst.path(), "o/sub/two.md"), 0o640);
        // mtimes are kept too
        let src_m = fs::metadata(ctx.path().join("run.sh")).unwrap().mtime();
        assert_eq!(
            fs::metadata(dst.path().join("o/run.sh")).unwrap().mtime(),
            src_m
        );
    }

    /// BuildKit's `testCopyFromStage` owners: a copy from a stage keeps every source owner,
    /// the destination directories that exist keep theirs, created parents are root's.
    #[test]
    fn copies_from_a_stage_keep_their_owners() {
        let (stage, dst) = setup();
        let own = |rel: &str, uid: u32, gid: u32| {
            std::os::unix::fs::lchown(stage.path().join(rel), Some(uid), Some(gid)).unwrap()
        };
        write(stage.path(), "file", "f", 0o644);
        own("file", 100, 200);
        own("dir", 101, 201);
        own("dir/sub", 102, 202);
        own("dir/sub/two.md", 103, 203);
        fs::create_dir_all(dst.path().join("existing")).unwrap();
        std::os::unix::fs::lchown(dst.path().join("existing"), Some(7), Some(8)).unwrap();
        let mut s = spec(&["file", "dir"], "/existing/");
        s.keep_owners = true;
        copy(&stage, &dst, &s).unwrap();
        assert_eq!(owner(dst.path(), "existing"), (7, 8));
        assert_eq!(owner(dst.path(), "existing/file"), (100, 200));
        assert_eq!(owner(dst.path(), "existing/sub"), (102, 202));
        assert_eq!(owner(dst.path(), "existing/sub/two.md"), (103, 203));
        assert_eq!(owner(dst.path(), "existing/one.txt"), (0, 0));
        let mut s = spec(&["dir"], "/new/parents/dir");
        s.keep_owners = true;
        copy(&stage, &dst, &s).unwrap();
        assert_eq!(owner(dst.path(), "new/parents"), (0, 0));
        assert_eq!(owner(dst.path(), "new/parents/dir/sub"), (102, 202));
        // --chown still wins, and the digest tells the owners apart.
        let mut s = spec(&["file"], "/chowned");
        s.keep_owners = true;
        s.chown = Some(Owner { uid: 5, gid: 6 });
        copy(&stage, &dst, &s).unwrap();
        assert_eq!(owner(dst.path(), "chowned"), (5, 6));
        let mut keep = spec(&["file"], "/x");
        keep.keep_owners = true;
        let before = source_digest(stage.path(), &keep, None).unwrap();
        own("file", 100, 201);
        assert_ne!(source_digest(stage.path(), &keep, None).unwrap(), before);
    }

    #[test]
    fn chown_applies_to_every_copied_entry() {
        let (ctx, dst) = setup();
        let mut s = spec(&["dir"], "/c/");
        s.chown = Some(Owner { uid: 42, gid: 43 });
        copy(&ctx, &dst, &s).unwrap();
        for p in ["c", "c/one.txt", "c/sub", "c/sub/two.md"] {
            assert_eq!(owner(dst.path(), p), (42, 43), "{p}");
        }
    }

    #[test]
    fn chmod_octal_applies_to_files_and_directories() {
        let (ctx, dst) = setup();
        let mut s = spec(&["dir", "a.txt"], "/m/");
        s.chmod = Some("0751".into());
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(mode(dst.path(), "m/a.txt"), 0o751);
        assert_eq!(mode(dst.path(), "m/one.txt"), 0o751);
        assert_eq!(mode(dst.path(), "m/sub"), 0o751);
        assert_eq!(mode(dst.path(), "m/sub/two.md"), 0o751);
        // the destination directory itself was created by mkdir -p
        assert_eq!(mode(dst.path(), "m"), 0o755);
    }

    #[test]
    fn chmod_symbolic_applies_like_chmod() {
        let (ctx, dst) = setup();
        let mut s = spec(&["dir", "a.txt", "run.sh"], "/s/");
        s.chmod = Some("u+x,g-w,o=".into());
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(mode(dst.path(), "s/a.txt"), 0o740);
        assert_eq!(mode(dst.path(), "s/run.sh"), 0o750);
        assert_eq!(mode(dst.path(), "s/sub"), 0o750);
        assert_eq!(mode(dst.path(), "s/sub/two.md"), 0o740);
        let mut s = spec(&["dir"], "/x/");
        s.chmod = Some("a+X".into());
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(mode(dst.path(), "x/one.txt"), 0o644);
        assert_eq!(mode(dst.path(), "x/sub"), 0o755);
    }

    #[test]
    fn parse_chmod_octal_and_symbolic() {
        let cases: &[(&str, u32, bool, u32)] = &[
            ("755", 0o644, false, 0o755),
            ("0644", 0o755, true, 0o644),
            ("4755", 0o644, false, 0o4755),
            ("0", 0o777, false, 0),
            ("u+x", 0o644, false, 0o744),
            ("u+x,g-w", 0o664, false, 0o744),
            ("go-w", 0o666, false, 0o644),
            ("a=r", 0o755, false, 0o444),
            ("=rw,+X", 0o750, false, 0o666 | 0o111),
            ("=rw,+X", 0o640, false, 0o666),
            ("+X", 0o640, true, 0o751),
            ("u=rwx,go=u-w", 0o000, false, 0o755),
            ("go=", 0o777, false, 0o700),
            ("g=u", 0o740, false, 0o770),
            ("u+s", 0o755, false, 0o4755),
            ("g+s,+t", 0o755, true, 0o3755),
            ("o+s", 0o755, false, 0o755),
            ("u-x+w", 0o544, false, 0o644),
            ("+x", 0o644, false, 0o755),
            ("ug+rw,o-rwx", 0o604, false, 0o660),
        ];
        for (value, cur, is_dir, want) in cases {
            let got = parse_chmod(value, *cur, *is_dir).unwrap();
            assert_eq!(got, *want, "{value} on {cur:o} (dir {is_dir}): got {got:o}");
        }
        // the file type bits of the current mode are ignored
        assert_eq!(parse_chmod("u+x", 0o100644, false).unwrap(), 0o744);
    }

    #[test]
    fn parse_chmod_rejects_invalid_values() {
        for bad in [
            "", "8", "0778", "77777", "u", "u+z", "x", "u+x,", "+rw,zz", "u++q",
        ] {
            let err = parse_chmod(bad, 0o644, false).unwrap_err();
            assert!(
                matches!(err, CopyError::InvalidChmod { .. }),
                "{bad}: {err}"
            );
        }
        let err = parse_chmod("8", 0o644, false).unwrap_err();
        assert!(err.to_string().contains("between 0 and 07777"), "{err}");
    }

    #[test]
    fn exclude_skips_matching_entries() {
        let (ctx, dst) = setup();
        write(ctx.path(), "dir/sub/keep.md", "k", 0o644);
        write(ctx.path(), "dir/logs/x.log", "l", 0o644);
        let mut s = spec(&["dir"], "/e/");
        s.exclude = vec![
            "*.txt".into(),
            "sub/*.md".into(),
            "!sub/keep.md".into(),
            "logs".into(),
        ];
        copy(&ctx, &dst, &s).unwrap();
        assert!(!exists(dst.path(), "e/one.txt"));
        assert!(!exists(dst.path(), "e/sub/two.md"));
        assert_eq!(read(dst.path(), "e/sub/keep.md"), "k");
        assert!(!exists(dst.path(), "e/logs"));
        // on glob matches, relative to the glob's directory
        let mut s = spec(&["*"], "/g/");
        s.exclude = vec!["*.txt".into(), "dir".into()];
        copy(&ctx, &dst, &s).unwrap();
        assert!(exists(dst.path(), "g/run.sh"));
        assert!(!exists(dst.path(), "g/a.txt"));
        assert!(!exists(dst.path(), "g/one.txt"));
        // `**` crosses directories
        let mut s = spec(&["dir"], "/h/");
        s.exclude = vec!["**/*.md".into()];
        copy(&ctx, &dst, &s).unwrap();
        assert!(exists(dst.path(), "h/one.txt"));
        assert!(!exists(dst.path(), "h/sub/two.md"));
        assert!(exists(dst.path(), "h/sub"));
    }

    #[test]
    fn parents_keeps_the_source_path() {
        let (ctx, dst) = setup();
        let mut s = spec(&["dir/sub/two.md", "a.txt", "dir/one.txt"], "/p/");
        s.parents = true;
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "p/dir/sub/two.md"), "2");
        assert_eq!(read(dst.path(), "p/dir/one.txt"), "1");
        assert_eq!(read(dst.path(), "p/a.txt"), "A");
        assert!(!exists(dst.path(), "p/b.txt"));
        // a whole directory keeps its own path too
        let mut s = spec(&["dir/sub"], "/q");
        s.parents = true;
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "q/dir/sub/two.md"), "2");
        assert!(!exists(dst.path(), "q/dir/one.txt"));
    }

    #[test]
    fn parents_with_pivot_and_globs() {
        let (ctx, dst) = setup();
        write(ctx.path(), "src/x/y/c.txt", "c", 0o644);
        write(ctx.path(), "src/a.txt", "a", 0o644);
        write(ctx.path(), "src/x/b.txt", "b", 0o644);
        write(ctx.path(), "src/x/b.bin", "b", 0o644);
        let mut s = spec(&["./src/./x/*.txt"], "/pv/");
        s.parents = true;
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "pv/x/b.txt"), "b");
        assert!(!exists(dst.path(), "pv/src"));
        assert!(!exists(dst.path(), "pv/x/b.bin"));
        assert!(!exists(dst.path(), "pv/x/y"));
        let mut s = spec(&["./src/**/*.txt"], "/st/");
        s.parents = true;
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "st/src/a.txt"), "a");
        assert_eq!(read(dst.path(), "st/src/x/b.txt"), "b");
        assert_eq!(read(dst.path(), "st/src/x/y/c.txt"), "c");
        assert!(!exists(dst.path(), "st/src/x/b.bin"));
        assert!(!exists(dst.path(), "st/dir"));
        let mut s = spec(&["src/nope.txt"], "/st/");
        s.parents = true;
        let err = copy(&ctx, &dst, &s).unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
    }

    #[test]
    fn symlinks_inside_directories_stay_symlinks() {
        let (ctx, dst) = setup();
        symlink("one.txt", ctx.path().join("dir/link")).unwrap();
        symlink("/etc/passwd", ctx.path().join("dir/abs")).unwrap();
        copy(&ctx, &dst, &spec(&["dir"], "/l/")).unwrap();
        assert_eq!(
            fs::read_link(dst.path().join("l/link")).unwrap(),
            PathBuf::from("one.txt")
        );
        assert_eq!(
            fs::read_link(dst.path().join("l/abs")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
    }

    #[test]
    fn top_level_symlink_sources_are_followed() {
        let (ctx, dst) = setup();
        symlink("a.txt", ctx.path().join("alink")).unwrap();
        symlink("dir", ctx.path().join("dlink")).unwrap();
        symlink("/dir/one.txt", ctx.path().join("abs-in-root")).unwrap();
        copy(&ctx, &dst, &spec(&["alink", "dlink", "abs-in-root"], "/f/")).unwrap();
        let m = fs::symlink_metadata(dst.path().join("f/alink")).unwrap();
        assert!(m.is_file());
        assert_eq!(read(dst.path(), "f/alink"), "A");
        assert_eq!(read(dst.path(), "f/sub/two.md"), "2");
        assert_eq!(read(dst.path(), "f/abs-in-root"), "1");
        // glob matches are followed too
        copy(&ctx, &dst, &spec(&["al*"], "/g/")).unwrap();
        assert!(
            fs::symlink_metadata(dst.path().join("g/alink"))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn sources_outside_the_root_are_rejected() {
        let outside = TempDir::new().unwrap();
        write(outside.path(), "secret", "S", 0o644);
        let (ctx, dst) = setup();
        let inner = ctx.path().join("inner");
        fs::create_dir(&inner).unwrap();
        // the context is `inner`; `outside` and `../a.txt` are beyond it
        let ctx_root = inner.as_path();
        for src in ["../a.txt", "/../a.txt", "x/../../a.txt"] {
            let err = copy_into(ctx_root, dst.path(), &spec(&[src], "/x/"), None).unwrap_err();
            assert!(matches!(err, CopyError::OutsideRoot { .. }), "{src}: {err}");
        }
        symlink("../a.txt", inner.join("up")).unwrap();
        let err = copy_into(ctx_root, dst.path(), &spec(&["up"], "/x/"), None).unwrap_err();
        assert!(matches!(err, CopyError::OutsideRoot { .. }), "{err}");
        // an absolute link resolves inside the root: the outside file is never read
        symlink(outside.path().join("secret"), inner.join("abs")).unwrap();
        let err = copy_into(ctx_root, dst.path(), &spec(&["abs"], "/x/"), None).unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
        // a directory link leading out, as an intermediate component
        symlink("../..", inner.join("updir")).unwrap();
        let err = copy_into(
            ctx_root,
            dst.path(),
            &spec(&["updir/etc/passwd"], "/x/"),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, CopyError::OutsideRoot { .. }), "{err}");
        assert!(!exists(dst.path(), "x/secret"));
        assert!(!exists(dst.path(), "x/a.txt"));
    }

    #[test]
    fn destination_links_resolve_inside_the_destination_root() {
        let (ctx, dst) = setup();
        let outside = TempDir::new().unwrap();
        fs::create_dir(dst.path().join("run")).unwrap();
        fs::create_dir(dst.path().join("var")).unwrap();
        symlink("../run", dst.path().join("var/run")).unwrap();
        symlink(outside.path(), dst.path().join("evil")).unwrap();
        symlink("../../../../../../..", dst.path().join("up")).unwrap();
        copy(&ctx, &dst, &spec(&["a.txt"], "/var/run/")).unwrap();
        assert_eq!(read(dst.path(), "run/a.txt"), "A");
        copy(&ctx, &dst, &spec(&["a.txt"], "/evil/")).unwrap();
        copy(&ctx, &dst, &spec(&["b.txt"], "/up/b.txt")).unwrap();
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(read(dst.path(), "b.txt"), "B");
        // an existing file is replaced; a link at the target is replaced, not followed
        symlink(outside.path().join("t"), dst.path().join("run/b.txt")).unwrap();
        copy(&ctx, &dst, &spec(&["b.txt"], "/run/")).unwrap();
        assert!(
            fs::symlink_metadata(dst.path().join("run/b.txt"))
                .unwrap()
                .is_file()
        );
        assert!(!outside.path().join("t").exists());
    }

    #[test]
    fn dockerignore_parse_rules() {
        let ig = DockerIgnore::parse(
            "# comment\n\n  /build  \n./tmp/*.o\n*.log\n**/node_modules\ndocs/**\nfoo/../bar\n",
        )
        .unwrap();
        assert!(ig.is_excluded("build"));
        assert!(ig.is_excluded("build/out/x"));
        assert!(ig.is_excluded("tmp/a.o"));
        assert!(!ig.is_excluded("tmp/sub/a.o"));
        assert!(ig.is_excluded("x.log"));
        assert!(!ig.is_excluded("sub/x.log"));
        assert!(ig.is_excluded("node_modules"));
        assert!(ig.is_excluded("a/b/node_modules/c/d.js"));
        assert!(ig.is_excluded("docs/a/b"));
        assert!(ig.is_excluded("bar"));
        assert!(!ig.is_excluded("# comment"));
        assert!(!ig.is_excluded("src/main.rs"));
        assert!(!ig.is_excluded("."));
        assert!(matches!(
            DockerIgnore::parse("!\n"),
            Err(CopyError::IllegalExclusion)
        ));
        assert!(matches!(
            DockerIgnore::parse("a[\n"),
            Err(CopyError::InvalidPattern { .. })
        ));
    }

    #[test]
    fn dockerignore_exceptions_last_match_wins() {
        let ig = DockerIgnore::parse("*.md\n!README.md\nREADME-secret.md\n**/*.tmp\n!keep/**\n")
            .unwrap();
        assert!(ig.is_excluded("CHANGES.md"));
        assert!(!ig.is_excluded("README.md"));
        assert!(ig.is_excluded("README-secret.md"));
        assert!(ig.is_excluded("a.tmp"));
        assert!(ig.is_excluded("x/y/a.tmp"));
        assert!(!ig.is_excluded("keep/y/a.tmp"));
        let ig = DockerIgnore::parse("docs\n!docs/README.md\n").unwrap();
        assert!(ig.is_excluded("docs/other.md"));
        assert!(!ig.is_excluded("docs/README.md"));
        let ig = DockerIgnore::parse("*\n!src\n").unwrap();
        assert!(ig.is_excluded("Dockerfile"));
        assert!(!ig.is_excluded("src/lib.rs"));
        let ig = DockerIgnore::parse("a?c\n[x-z]*\n\\*lit\n").unwrap();
        assert!(ig.is_excluded("abc"));
        assert!(!ig.is_excluded("a/c"));
        assert!(ig.is_excluded("yes"));
        assert!(!ig.is_excluded("no"));
        assert!(ig.is_excluded("*lit"));
        assert!(!ig.is_excluded("alit"));
    }

    #[test]
    fn dockerignore_applies_to_copy() {
        let (ctx, dst) = setup();
        write(ctx.path(), "docs/README.md", "r", 0o644);
        write(ctx.path(), "docs/other.md", "o", 0o644);
        write(ctx.path(), "secret.key", "k", 0o600);
        let ig = DockerIgnore::parse("*.key\ndocs\n!docs/README.md\ndir/sub\n").unwrap();
        copy_into(ctx.path(), dst.path(), &spec(&["."], "/app/"), Some(&ig)).unwrap();
        assert!(exists(dst.path(), "app/a.txt"));
        assert!(!exists(dst.path(), "app/secret.key"));
        assert_eq!(read(dst.path(), "app/docs/README.md"), "r");
        assert!(!exists(dst.path(), "app/docs/other.md"));
        assert!(exists(dst.path(), "app/dir/one.txt"));
        assert!(!exists(dst.path(), "app/dir/sub"));
        let err = copy_into(
            ctx.path(),
            dst.path(),
            &spec(&["secret.key"], "/k/"),
            Some(&ig),
        )
        .unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
        let err = copy_into(
            ctx.path(),
            dst.path(),
            &spec(&["dir/sub/two.md"], "/k/"),
            Some(&ig),
        )
        .unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
        copy_into(
            ctx.path(),
            dst.path(),
            &spec(&["*.key", "*.txt"], "/k/"),
            Some(&ig),
        )
        .unwrap();
        assert!(!exists(dst.path(), "k/secret.key"));
        assert!(exists(dst.path(), "k/a.txt"));
    }

    fn tar_bytes() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o750);
        h.set_uid(7);
        h.set_gid(8);
        h.set_size(0);
        h.set_mtime(1_000_000);
        b.append_data(&mut h, "pkg/", io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o4755);
        h.set_uid(7);
        h.set_gid(8);
        h.set_size(5);
        h.set_mtime(1_000_000);
        b.append_data(&mut h, "pkg/bin", &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "pkg/link", "bin").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_link(&mut h, "pkg/hard", "pkg/bin").unwrap();
        // A member that tries to climb out of the destination.
        let mut h = tar::Header::new_old();
        let name = b"../../../escape.txt";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_size(3);
        h.set_cksum();
        b.append(&h, &b"esc"[..]).unwrap();
        b.into_inner().unwrap()
    }

    fn check_extracted(dst: &Path, at: &str) {
        assert_eq!(read(dst, &format!("{at}/pkg/bin")), "hello");
        assert_eq!(mode(dst, &format!("{at}/pkg/bin")), 0o4755);
        assert_eq!(owner(dst, &format!("{at}/pkg/bin")), (7, 8));
        assert_eq!(mode(dst, &format!("{at}/pkg")), 0o750);
        assert_eq!(
            fs::metadata(dst.join(format!("{at}/pkg"))).unwrap().mtime(),
            1_000_000
        );
        assert_eq!(
            fs::read_link(dst.join(format!("{at}/pkg/link"))).unwrap(),
            PathBuf::from("bin")
        );
        let bin = fs::metadata(dst.join(format!("{at}/pkg/bin"))).unwrap();
        let hard = fs::metadata(dst.join(format!("{at}/pkg/hard"))).unwrap();
        assert_eq!(bin.ino(), hard.ino());
        // the climbing member lands inside the destination directory
        assert_eq!(read(dst, &format!("{at}/escape.txt")), "esc");
    }

    #[test]
    fn add_extracts_plain_and_gzip_tar_archives() {
        let (ctx, dst) = setup();
        let tar = tar_bytes();
        fs::write(ctx.path().join("plain.tar"), &tar).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        fs::write(ctx.path().join("comp.tgz"), gz.finish().unwrap()).unwrap();
        let mut s = spec(&["plain.tar"], "/opt/plain");
        s.is_add = true;
        copy(&ctx, &dst, &s).unwrap();
        check_extracted(dst.path(), "opt/plain");
        let mut s = spec(&["comp.tgz"], "/opt/gz/");
        s.is_add = true;
        copy(&ctx, &dst, &s).unwrap();
        check_extracted(dst.path(), "opt/gz");
        assert!(!exists(dst.path(), "escape.txt"));
        // --chown overrides the archive's owners
        let mut s = spec(&["comp.tgz"], "/opt/own/");
        s.is_add = true;
        s.chown = Some(Owner { uid: 5, gid: 6 });
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(owner(dst.path(), "opt/own/pkg/bin"), (5, 6));
        assert_eq!(mode(dst.path(), "opt/own/pkg/bin"), 0o4755);
    }

    #[test]
    fn add_extracts_zstd_xz_and_bzip2_tar_archives() {
        let (ctx, dst) = setup();
        let tar = tar_bytes();
        fs::write(
            ctx.path().join("a.tar.zst"),
            zstd::encode_all(&tar[..], 3).unwrap(),
        )
        .unwrap();
        for (tool, name) in [("xz", "a.tar.xz"), ("bzip2", "a.tar.bz2")] {
            let out = Command::new(tool)
                .arg("-c")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(&tar)?;
                    c.wait_with_output()
                })
                .unwrap_or_else(|e| panic!("{tool} is needed (apt-get install {tool}): {e}"));
            fs::write(ctx.path().join(name), out.stdout).unwrap();
        }
        for name in ["a.tar.zst", "a.tar.xz", "a.tar.bz2"] {
            let mut s = spec(&[name], &format!("/x/{name}/"));
            s.is_add = true;
            copy(&ctx, &dst, &s).unwrap();
            check_extracted(dst.path(), &format!("x/{name}"));
        }
    }

    #[test]
    fn archive_links_cannot_lead_outside_the_destination() {
        let (ctx, dst) = setup();
        let mut b = tar::Builder::new(Vec::new());
        for (name, target) in [("abs", "/etc"), ("up", "../../..")] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, name, target).unwrap();
        }
        for name in ["abs/passwd", "up/x"] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(1);
            b.append_data(&mut h, name, &b"z"[..]).unwrap();
        }
        fs::write(ctx.path().join("links.tar"), b.into_inner().unwrap()).unwrap();
        fs::create_dir_all(dst.path().join("etc")).unwrap();
        let mut s = spec(&["links.tar"], "/opt/t/");
        s.is_add = true;
        copy(&ctx, &dst, &s).unwrap();
        // absolute links resolve with the extraction directory as root, `..` stops there
        assert_eq!(read(dst.path(), "opt/t/etc/passwd"), "z");
        assert_eq!(read(dst.path(), "opt/t/x"), "z");
        assert!(!exists(dst.path(), "etc/passwd"));
        assert!(!exists(dst.path(), "x"));
    }

    #[test]
    fn copy_never_extracts_and_add_copies_non_archives() {
        let (ctx, dst) = setup();
        fs::write(ctx.path().join("plain.tar"), tar_bytes()).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"just text, not a tar").unwrap();
        fs::write(ctx.path().join("text.gz"), gz.finish().unwrap()).unwrap();
        copy(&ctx, &dst, &spec(&["plain.tar"], "/c/")).unwrap();
        assert!(
            fs::metadata(dst.path().join("c/plain.tar"))
                .unwrap()
                .is_file()
        );
        let mut s = spec(&["text.gz", "a.txt"], "/d/");
        s.is_add = true;
        copy(&ctx, &dst, &s).unwrap();
        assert!(
            fs::metadata(dst.path().join("d/text.gz"))
                .unwrap()
                .is_file()
        );
        assert_eq!(read(dst.path(), "d/a.txt"), "A");
    }

    #[test]
    fn inline_files_get_mode_0644() {
        let (ctx, dst) = setup();
        let mut s = spec(&[], "/etc/app/");
        s.inline = vec![
            ("one.conf".into(), b"x=1\n".to_vec()),
            ("two.conf".into(), b"y=2\n".to_vec()),
        ];
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(read(dst.path(), "etc/app/one.conf"), "x=1\n");
        assert_eq!(mode(dst.path(), "etc/app/two.conf"), 0o644);
        let mut s = spec(&[], "/usr/local/bin/run");
        s.inline = vec![("EOF".into(), b"#!/bin/sh\n".to_vec())];
        s.chmod = Some("755".into());
        s.chown = Some(Owner { uid: 3, gid: 4 });
        copy(&ctx, &dst, &s).unwrap();
        assert_eq!(mode(dst.path(), "usr/local/bin/run"), 0o755);
        assert_eq!(owner(dst.path(), "usr/local/bin/run"), (3, 4));
        s.inline = vec![("../x".into(), vec![])];
        assert!(matches!(
            copy(&ctx, &dst, &s),
            Err(CopyError::InvalidInlineName { .. })
        ));
    }

    #[test]
    fn hardlinks_and_special_files_are_preserved() {
        let (ctx, dst) = setup();
        fs::hard_link(
            ctx.path().join("dir/one.txt"),
            ctx.path().join("dir/one-again"),
        )
        .unwrap();
        nix::unistd::mkfifo(
            &ctx.path().join("dir/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        copy(&ctx, &dst, &spec(&["dir"], "/h/")).unwrap();
        let a = fs::metadata(dst.path().join("h/one.txt")).unwrap();
        let b = fs::metadata(dst.path().join("h/one-again")).unwrap();
        assert_eq!(a.ino(), b.ino());
        let f = fs::symlink_metadata(dst.path().join("h/fifo")).unwrap();
        assert!(f.file_type().is_fifo());
        assert_eq!(f.mode() & 0o7777, 0o640);
    }

    #[test]
    fn copy_rejects_urls_and_misplaced_checksums() {
        let (ctx, dst) = setup();
        let err = copy(&ctx, &dst, &spec(&["https://example.com/x"], "/x/")).unwrap_err();
        assert!(matches!(err, CopyError::UrlInCopy { .. }), "{err}");
        let mut s = spec(&["http://127.0.0.1:1/x"], "/x/");
        s.is_add = true;
        let err = copy(&ctx, &dst, &s).unwrap_err();
        assert!(matches!(err, CopyError::UrlNotFetched { .. }), "{err}");
        let mut s = spec(&["a.txt"], "/x/");
        s.checksum = Some(format!("sha256:{}", "0".repeat(64)));
        let err = copy(&ctx, &dst, &s).unwrap_err();
        assert_eq!(err.to_string(), "checksum can't be specified for COPY");
        s.is_add = true;
        let err = copy(&ctx, &dst, &s).unwrap_err();
        assert_eq!(err.to_string(), "checksum requires HTTP(S) or Git sources");
    }

    /// A tiny HTTP/1.1 server on 127.0.0.1 answering GETs from a fixed table.
    async fn serve(routes: Vec<(&'static str, Vec<u8>)>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let routes = routes.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let resp = match routes.iter().find(|(p, _)| *p == path) {
                        Some((_, body)) => {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(body);
                            r
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = sock.write_all(&resp).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        addr
    }

    fn sha256_hex(b: &[u8]) -> String {
        sha2::Sha256::digest(b)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[tokio::test]
    async fn fetch_urls_downloads_verifies_and_copies() {
        let body = b"downloaded content".to_vec();
        let addr = serve(vec![("/files/tool.tar.gz", body.clone())]).await;
        let url = format!("http://{addr}/files/tool.tar.gz");
        let dl = TempDir::new().unwrap();
        let dst = TempDir::new().unwrap();
        let mut s = spec(&[&url], "/opt/");
        s.is_add = true;
        s.checksum = Some(format!("sha256:{}", sha256_hex(&body)));
        let fetched = fetch_urls(&s, dl.path()).await.unwrap();
        assert_eq!(fetched.sources, vec!["0/tool.tar.gz".to_string()]);
        assert!(!fetched.is_add && fetched.checksum.is_none());
        let (dl_path, dst_path, f2) = (
            dl.path().to_path_buf(),
            dst.path().to_path_buf(),
            fetched.clone(),
        );
        tokio::task::spawn_blocking(move || copy_into(&dl_path, &dst_path, &f2, None))
            .await
            .unwrap()
            .unwrap();
        let out = dst.path().join("opt/tool.tar.gz");
        assert_eq!(fs::read(&out).unwrap(), body);
        let m = fs::metadata(&out).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
        assert_eq!(m.mtime(), 784_111_777);
        assert_eq!((m.uid(), m.gid()), (0, 0));
        // the digest covers the downloaded file
        let d1 = source_digest(dl.path(), &fetched, None).unwrap();
        fs::write(dl.path().join("0/tool.tar.gz"), b"other").unwrap();
        assert_ne!(d1, source_digest(dl.path(), &fetched, None).unwrap());
    }

    #[tokio::test]
    async fn fetch_urls_names_file_after_dest_and_applies_chmod() {
        let addr = serve(vec![
            ("/", b"root".to_vec()),
            ("/a%20b", b"spaced".to_vec()),
        ])
        .await;
        let dl = TempDir::new().unwrap();
        let dst = TempDir::new().unwrap();
        let mut s = spec(&[&format!("http://{addr}/")], "/bin/tool");
        s.is_add = true;
        s.chmod = Some("755".into());
        let fetched = fetch_urls(&s, dl.path()).await.unwrap();
        assert_eq!(fetched.sources, vec!["0/__unnamed__".to_string()]);
        copy_into(dl.path(), dst.path(), &fetched, None).unwrap();
        assert_eq!(read(dst.path(), "bin/tool"), "root");
        assert_eq!(mode(dst.path(), "bin/tool"), 0o755);
        let mut s = spec(&[&format!("http://{addr}/a%20b")], "/d/");
        s.is_add = true;
        let fetched = fetch_urls(&s, dl.path()).await.unwrap();
        copy_into(dl.path(), dst.path(), &fetched, None).unwrap();
        assert_eq!(read(dst.path(), "d/a b"), "spaced");
    }

    #[tokio::test]
    async fn fetch_urls_checksum_mismatch_names_both_digests() {
        let addr = serve(vec![("/f", b"payload".to_vec())]).await;
        let dl = TempDir::new().unwrap();
        let mut s = spec(&[&format!("http://{addr}/f")], "/x");
        s.is_add = true;
        let wrong = format!("sha256:{}", "ab".repeat(32));
        s.checksum = Some(wrong.clone());
        let err = fetch_urls(&s, dl.path()).await.unwrap_err();
        let msg = err.to_string();
        let actual = format!("sha256:{}", sha256_hex(b"payload"));
        assert!(msg.contains(&wrong) && msg.contains(&actual), "{msg}");
        s.checksum = Some("md5:abc".into());
        assert!(matches!(
            fetch_urls(&s, dl.path()).await,
            Err(CopyError::InvalidChecksum { .. })
        ));
    }

    #[tokio::test]
    async fn fetch_urls_reports_http_errors() {
        let addr = serve(vec![]).await;
        let dl = TempDir::new().unwrap();
        let url = format!("http://{addr}/missing");
        let mut s = spec(&[&url], "/x/");
        s.is_add = true;
        match fetch_urls(&s, dl.path()).await {
            Err(CopyError::HttpStatus { url: u, status }) => {
                assert_eq!((u.as_str(), status), (url.as_str(), 404));
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut s = spec(&[&url], "/x/");
        s.is_add = false;
        assert!(matches!(
            fetch_urls(&s, dl.path()).await,
            Err(CopyError::UrlInCopy { .. })
        ));
    }

    #[test]
    fn mixed_add_splits_into_local_and_url_parts() {
        let mut s = spec(&["a.txt", "https://example.com/f"], "/x/");
        s.is_add = true;
        assert!(s.has_urls());
        let local = s.without_urls();
        assert_eq!(local.sources, vec!["a.txt".to_string()]);
        assert!(!local.has_urls());
    }

    #[test]
    fn source_digest_is_stable_under_mtime_changes() {
        let (ctx, _dst) = setup();
        let s = spec(&["dir", "a.txt"], "/x/");
        let d1 = source_digest(ctx.path(), &s, None).unwrap();
        let t = FileTime::from_unix_time(12345, 0);
        filetime::set_file_times(ctx.path().join("a.txt"), t, t).unwrap();
        filetime::set_file_times(ctx.path().join("dir/sub"), t, t).unwrap();
        assert_eq!(d1, source_digest(ctx.path(), &s, None).unwrap());
        // same selection through a different spelling, same hash
        assert_eq!(
            d1,
            source_digest(ctx.path(), &spec(&["/dir/", "./a.txt"], "/y/"), None).unwrap()
        );
    }

    #[test]
    fn source_digest_changes_with_content_mode_and_flags() {
        let (ctx, _dst) = setup();
        let s = spec(&["dir"], "/x/");
        let d1 = source_digest(ctx.path(), &s, None).unwrap();
        write(ctx.path(), "dir/sub/two.md", "3", 0o640);
        let d2 = source_digest(ctx.path(), &s, None).unwrap();
        assert_ne!(d1, d2);
        fs::set_permissions(
            ctx.path().join("dir/one.txt"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let d3 = source_digest(ctx.path(), &s, None).unwrap();
        assert_ne!(d2, d3);
        let mut c = s.clone();
        c.chown = Some(Owner { uid: 1, gid: 1 });
        assert_ne!(d3, source_digest(ctx.path(), &c, None).unwrap());
        let mut c = s.clone();
        c.chmod = Some("644".into());
        assert_ne!(d3, source_digest(ctx.path(), &c, None).unwrap());
        symlink("one.txt", ctx.path().join("dir/l")).unwrap();
        let d4 = source_digest(ctx.path(), &s, None).unwrap();
        assert_ne!(d3, d4);
        fs::remove_file(ctx.path().join("dir/l")).unwrap();
        symlink("two.txt", ctx.path().join("dir/l")).unwrap();
        assert_ne!(d4, source_digest(ctx.path(), &s, None).unwrap());
    }

    #[test]
    fn source_digest_covers_only_selected_files() {
        let (ctx, _dst) = setup();
        let ig = DockerIgnore::parse("dir/sub\n").unwrap();
        let mut s = spec(&["dir", "*.txt"], "/x/");
        s.exclude = vec!["b.txt".into()];
        let d1 = source_digest(ctx.path(), &s, Some(&ig)).unwrap();
        write(ctx.path(), "dir/sub/two.md", "changed", 0o640);
        write(ctx.path(), "b.txt", "changed", 0o600);
        write(ctx.path(), "run.sh", "changed", 0o755);
        assert_eq!(d1, source_digest(ctx.path(), &s, Some(&ig)).unwrap());
        write(ctx.path(), "a.txt", "changed", 0o644);
        assert_ne!(d1, source_digest(ctx.path(), &s, Some(&ig)).unwrap());
        let err = source_digest(ctx.path(), &spec(&["nope"], "/x/"), None).unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }));
    }

    #[test]
    fn go_match_follows_filepath_match() {
        let ok = |p: &str, n: &str| go_match(p, n).unwrap();
        assert!(ok("*.txt", "a.txt"));
        assert!(ok("*", ".hidden"));
        assert!(!ok("*", "a/b"));
        assert!(ok("a?c", "abc"));
        assert!(!ok("a?c", "a/c"));
        assert!(ok("[a-c]x", "bx"));
        assert!(!ok("[^a-c]x", "bx"));
        assert!(ok("\\*", "*"));
        assert!(!ok("\\*", "a"));
        assert!(ok("a*b*c", "axxbyyc"));
        assert!(go_match("[", "a").is_err());
        assert!(go_match("a\\", "a").is_err());
        assert!(go_match("x[]", "x").is_err());
    }

    #[test]
    fn http_dates_parse_in_all_three_formats() {
        let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(want));
        assert_eq!(
            parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(want)
        );
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(want));
        assert_eq!(parse_http_date("yesterday"), None);
    }

    /// Hashing throughput on 300 MB in 20,000 files (run with `--ignored --nocapture`).
    #[test]
    #[ignore = "benchmark: writes 300 MB"]
    fn hash_throughput_300mb_20k_files() {
        let ctx = TempDir::new().unwrap();
        let per_file = 300 * 1024 * 1024 / 20_000;
        let mut data = vec![0u8; per_file];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        for i in 0..20_000 {
            let dir = ctx.path().join(format!("d{}", i % 100));
            if i < 100 {
                fs::create_dir_all(&dir).unwrap();
            }
            data[0] = (i % 256) as u8;
            fs::write(dir.join(format!("f{i}")), &data).unwrap();
        }
        let s = spec(&["."], "/x/");
        source_digest(ctx.path(), &s, None).unwrap(); // warm the page cache
        let runs = 3;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            source_digest(ctx.path(), &s, None).unwrap();
        }
        let secs = start.elapsed().as_secs_f64() / f64::from(runs);
        let mb = (per_file * 20_000) as f64 / 1e6;
        let t = std::time::Instant::now();
        build_plan(ctx.path(), &s, None).unwrap();
        println!("walk alone: {:.3} s", t.elapsed().as_secs_f64());
        println!(
            "source_digest: {mb:.0} MB in 20000 files: {secs:.3} s = {:.0} MB/s",
            mb / secs
        );
    }
}
