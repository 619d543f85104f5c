//! The Dockerfile frontend.
//!
//! Reading a Dockerfile happens in layers, as in BuildKit:
//! - [`directives`]: the `# syntax=`, `# escape=` and `# check=` lines at the top;
//! - [`parser`]: lines into an AST of [`parser::Node`]s (continuations, comments, heredocs,
//!   JSON and shell forms, flags), each node with its start and end line;
//! - [`shell`]: shell-word expansion of `$VAR`, `${VAR:-default}` and friends, and quoting;
//! - [`instructions`]: typed instructions with validated flags, grouped into stages;
//! - [`stages`]: global and per-stage build arguments, the automatic platform arguments,
//!   stage references, and the expansion of each instruction with what is in scope.
//!
//! [`FrontendError`] carries the Dockerfile lines an error is about; [`FrontendError::render`]
//! prints it the way a person wants to read it, with the offending lines shown.

pub mod directives;
pub mod instructions;
pub mod parser;
pub mod shell;
pub mod stages;

use std::fmt;

pub use parser::Range;

/// An error in a Dockerfile, with the lines it is about when it is about some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendError {
    pub range: Option<Range>,
    pub message: String,
}

impl FrontendError {
    pub fn at(range: Range, message: impl Into<String>) -> Self {
        FrontendError {
            range: Some(range),
            message: message.into(),
        }
    }

    pub fn new(message: impl Into<String>) -> Self {
        FrontendError {
            range: None,
            message: message.into(),
        }
    }

    /// `Dockerfile:7: message`, followed by the offending lines of `source`, numbered.
    pub fn render(&self, file: &str, source: &str) -> String {
        let Some(range) = self.range else {
            return format!("{file}: {}", self.message);
        };
        let mut out = format!("{file}:{}: {}", range.start, self.message);
        let lines: Vec<&str> = source.lines().collect();
        let last = range.end.min(range.start + 9);
        let width = last.to_string().len();
        for n in range.start..=last {
            if let Some(text) = n.checked_sub(1).and_then(|i| lines.get(i)) {
                out.push_str(&format!("\n {n:>width$} | {}", text.trim_end_matches('\r')));
            }
        }
        if range.end > last {
            out.push_str(&format!("\n {:>width$} | ...", ""));
        }
        out
    }
}

impl fmt::Display for FrontendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.range {
            Some(r) => write!(f, "line {}: {}", r.start, self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for FrontendError {}

impl From<parser::ParseError> for FrontendError {
    fn from(e: parser::ParseError) -> Self {
        FrontendError::at(e.range, e.message)
    }
}

/// The candidate closest to `word` by edit distance (case-insensitive), if it is close enough
/// to be a likely typo: at most half the candidate's length away (at least one edit), as
/// BuildKit's suggestions go (`foo` suggests `from`, `tmp` suggests `tmpfs`).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_lowercase();
    if word.is_empty() {
        return None;
    }
    candidates
        .into_iter()
        .filter(|c| !c.is_empty())
        .map(|c| (edit_distance(&word, &c.to_lowercase()), c))
        .filter(|&(d, c)| d <= (c.chars().count() / 2).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Edit distance counting an adjacent transposition as one edit (optimal string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// A parsed Dockerfile: its AST and its stages.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    pub ast: parser::Ast,
    pub parsed: instructions::Parsed,
}

impl Dockerfile {
    /// Parses and types a Dockerfile, checking its `# syntax=` directive.
    pub fn parse(source: &str) -> Result<Self, FrontendError> {
        if source.trim().is_empty() {
            return Err(FrontendError::new("the Dockerfile is empty"));
        }
        let ast = parser::parse(source)?;
        if let Some(syntax) = &ast.directives.syntax {
            directives::check_syntax(&syntax.value)
                .map_err(|m| FrontendError::at(Range::line(syntax.line), m))?;
        }
        let parsed = instructions::parse_stages(&ast)?;
        Ok(Dockerfile { ast, parsed })
    }

    /// What a build says once about its `# syntax=` directive: the built-in frontend serves it.
    pub fn frontend_note(&self) -> Option<String> {
        let syntax = self.ast.directives.syntax.as_ref()?;
        let image = syntax.value.split_whitespace().next()?;
        Some(format!(
            "using the built-in Dockerfile frontend for {image}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_the_lines() {
        let src = "FROM a\nRUNN make\n";
        let e = Dockerfile::parse(src).unwrap_err();
        assert_eq!(
            e.render("Dockerfile", src),
            "Dockerfile:2: unknown instruction \"RUNN\" (did you mean RUN?)\n 2 | RUNN make"
        );
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("RUNN", ["RUN", "ARG"]), Some("RUN"));
        assert_eq!(suggest("COPPY", ["COPY", "CMD"]), Some("COPY"));
        assert_eq!(suggest("XYZZY", ["RUN"]), None);
        // BuildKit's: a short word that is most of a keyword.
        assert_eq!(suggest("foo", ["FROM", "RUN", "COPY"]), Some("FROM"));
        assert_eq!(
            suggest("tmp", ["bind", "cache", "tmpfs", "secret", "ssh"]),
            Some("tmpfs")
        );
        assert_eq!(suggest("", ["RUN"]), None);
    }

    #[test]
    fn empty_and_comment_only() {
        assert!(Dockerfile::parse("").unwrap_err().message.contains("empty"));
        assert!(
            Dockerfile::parse("# hi\n\n")
                .unwrap_err()
                .message
                .contains("no instructions")
        );
    }

    #[test]
    fn foreign_syntax_is_refused() {
        let e = Dockerfile::parse("# syntax=example.com/frontend:2\nFROM a\n").unwrap_err();
        assert_eq!(e.range, Some(Range::line(1)));
        assert!(Dockerfile::parse("# syntax=docker/dockerfile:1.7-labs\nFROM a\n").is_ok());
    }

    #[test]
    fn upstream_syntax_is_served_by_the_built_in_frontend() {
        let df = Dockerfile::parse("# syntax=docker/dockerfile-upstream:master\nFROM a\n").unwrap();
        assert_eq!(
            df.frontend_note().as_deref(),
            Some("using the built-in Dockerfile frontend for docker/dockerfile-upstream:master")
        );
        assert_eq!(Dockerfile::parse("FROM a\n").unwrap().frontend_note(), None);
    }
}
