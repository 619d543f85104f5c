//! Parser directives: the `# syntax=`, `# escape=` and `# check=` comments at the top of a
//! Dockerfile.
//!
//! Directives are only recognised before anything else: the first line that is not a
//! well-formed directive of a known name (an instruction, a blank line, any other comment)
//! ends the search. Each directive may appear once. Names are case-insensitive.

use std::fmt;

/// The escape character a Dockerfile uses unless `# escape=` says otherwise.
pub const DEFAULT_ESCAPE: char = '\\';

/// The directives this frontend knows.
const KNOWN: [&str; 3] = ["syntax", "escape", "check"];

/// One directive found at the top of a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lower-cased name: `syntax`, `escape` or `check`.
    pub name: String,
    /// The value with surrounding whitespace removed.
    pub value: String,
    /// 1-based line number.
    pub line: usize,
}

/// Why a directive line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectiveError {
    /// The same directive appeared twice.
    Repeated(String),
    /// `# escape=` named something other than `` ` `` or `\`.
    InvalidEscape(String),
}

impl fmt::Display for DirectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirectiveError::Repeated(name) => {
                write!(f, "only one {name} parser directive can be used")
            }
            DirectiveError::InvalidEscape(v) => {
                write!(f, "invalid escape token '{v}' does not match ` or \\")
            }
        }
    }
}

impl std::error::Error for DirectiveError {}

/// Reads directives line by line until the first line that is not one.
#[derive(Debug, Default, Clone)]
pub struct DirectiveScanner {
    line: usize,
    done: bool,
    seen: Vec<String>,
}

impl DirectiveScanner {
    /// Whether the directive section has ended.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Looks at the next line (without its line ending). Returns the directive it holds, if
    /// any; after the first non-directive line every call returns `Ok(None)`.
    pub fn scan(&mut self, line: &str) -> Result<Option<Directive>, DirectiveError> {
        self.line += 1;
        if self.done {
            return Ok(None);
        }
        let Some((name, value)) = split_directive(line) else {
            self.done = true;
            return Ok(None);
        };
        let name = name.to_ascii_lowercase();
        if !KNOWN.contains(&name.as_str()) {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&name) {
            return Err(DirectiveError::Repeated(name));
        }
        self.seen.push(name.clone());
        Ok(Some(Directive {
            name,
            value: value.to_string(),
            line: self.line,
        }))
    }
}

/// Splits `#  name = value  ` into its name and value; `None` when the line is not of that
/// shape (the name is a letter followed by letters and digits, the value is not empty).
fn split_directive(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?.trim_start();
    let name_len = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map_or(rest.len(), |(i, _)| i);
    if name_len == 0 {
        return None;
    }
    let (name, after) = rest.split_at(name_len);
    let after = after.trim_start_matches(is_re_space);
    let value = after.strip_prefix('=')?;
    let value = value.trim_matches(is_re_space);
    if value.is_empty() {
        return None;
    }
    Some((name, value))
}

/// The characters of the `\s` class in BuildKit's directive pattern.
fn is_re_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r')
}

/// The directives of a Dockerfile, as the parser found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub syntax: Option<Directive>,
    pub escape: Option<Directive>,
    pub check: Option<Directive>,
}

impl Directives {
    /// Records a directive in its slot.
    pub(crate) fn record(&mut self, d: Directive) {
        match d.name.as_str() {
            "syntax" => self.syntax = Some(d),
            "escape" => self.escape = Some(d),
            _ => self.check = Some(d),
        }
    }
}

/// Checks a `# syntax=` value. The built-in frontend serves what BuildKit's own Dockerfile
/// frontend images are: `docker/dockerfile` at any 1.x version or channel (`1`, `1.7`,
/// `1.7.1-labs`, `labs`, `latest`, `master`, with or without `docker.io/` and a digest) and
/// `docker/dockerfile-upstream` at any tag. Anything else is refused with a message naming it,
/// since builds run offline and fetch no frontend image.
pub fn check_syntax(value: &str) -> Result<(), String> {
    // The image reference is the first word; the rest are frontend options.
    let image = value.split_whitespace().next().unwrap_or_default();
    let without_digest = image.split('@').next().unwrap_or_default();
    let (repo, tag) = match without_digest.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (without_digest, "latest"),
    };
    let repo = repo
        .strip_prefix("docker.io/")
        .or_else(|| repo.strip_prefix("index.docker.io/"))
        .or_else(|| repo.strip_prefix("registry-1.docker.io/"))
        .unwrap_or(repo);
    let version = tag.strip_suffix("-labs").unwrap_or(tag);
    let one_x = matches!(version, "latest" | "labs" | "master" | "1")
        || version.strip_prefix("1.").is_some_and(|v| {
            v.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        });
    let served = match repo {
        "docker/dockerfile-upstream" => !tag.is_empty(),
        "docker/dockerfile" | "library/docker/dockerfile" => one_x,
        _ => false,
    };
    if served {
        Ok(())
    } else {
        Err(format!(
            "unsupported syntax {value:?}: strata builds offline with its built-in frontend, which serves docker/dockerfile:1.x and docker/dockerfile-upstream only"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_stop_at_first_other_line() {
        let mut s = DirectiveScanner::default();
        let d = s.scan("# syntax = docker/dockerfile:1 ").unwrap().unwrap();
        assert_eq!(
            (d.name.as_str(), d.value.as_str()),
            ("syntax", "docker/dockerfile:1")
        );
        let d = s.scan("#ESCAPE=`").unwrap().unwrap();
        assert_eq!(
            (d.name.as_str(), d.value.as_str(), d.line),
            ("escape", "`", 2)
        );
        assert_eq!(s.scan("# just a comment").unwrap(), None);
        assert!(s.done());
        assert_eq!(s.scan("# check=skip=all").unwrap(), None);
    }

    #[test]
    fn repeated_directive_is_an_error() {
        let mut s = DirectiveScanner::default();
        s.scan("# escape=\\").unwrap();
        assert_eq!(
            s.scan("# escape=`"),
            Err(DirectiveError::Repeated("escape".into()))
        );
    }

    #[test]
    fn unknown_or_malformed_directive_ends_the_section() {
        for line in ["# foo=bar", "# 1abc=x", "# escape=", "#", "", "FROM x"] {
            let mut s = DirectiveScanner::default();
            assert_eq!(s.scan(line).unwrap(), None, "{line:?}");
            assert!(s.done());
        }
    }

    #[test]
    fn syntax_values() {
        for ok in [
            "docker/dockerfile:1",
            "docker/dockerfile:1.7",
            "docker/dockerfile:1.7.1-labs",
            "docker.io/docker/dockerfile:1.4",
            "docker/dockerfile:1@sha256:abcd",
            "docker/dockerfile:labs",
            "docker/dockerfile",
            "docker/dockerfile:master-labs",
            "docker/dockerfile-upstream:master",
            "docker/dockerfile-upstream:master-labs",
            "docker.io/docker/dockerfile-upstream:1.8.0",
            "docker.io/docker/dockerfile:1.7-labs",
        ] {
            assert!(check_syntax(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tonistiigi/dockerfile:x",
            "docker/dockerfile:2",
            "example.com/df:1",
            "docker/dockerfile:2.0",
            "ghcr.io/docker/dockerfile-upstream:master",
            "docker/dockerfile-upstream2:master",
        ] {
            assert!(check_syntax(bad).is_err(), "{bad}");
        }
    }
}
