//! Shell-word expansion for Dockerfile instructions, behaving like BuildKit's
//! `frontend/dockerfile/shell` lexer.
//!
//! Instructions such as `ENV`, `ARG`, `COPY`, `WORKDIR` or `FROM` expand variables in their
//! arguments before they are used. This module does that expansion the way BuildKit does:
//! `$VAR` and `${VAR}`, the parameter forms `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`,
//! `${VAR+word}`, `${VAR:?message}`, `${VAR?message}`, the pattern forms `${VAR#pattern}`,
//! `${VAR##pattern}`, `${VAR%pattern}`, `${VAR%%pattern}`, `${VAR/pattern/replacement}` and
//! `${VAR//pattern/replacement}`, single and double quotes, and the escape character chosen
//! by the `# escape=` directive. It can also split the expanded text into words
//! ([`Lexer::process_words`]) and report which variable names were looked up and found or
//! not found ([`Lexer::process_word_with_matches`]), which linting uses.
//!
//! Nothing here runs a shell: command substitution, arithmetic and globbing of file names
//! are not done, exactly as in BuildKit. Patterns support `*`, `?` and escaped characters
//! only; like BuildKit, a `[` in a pattern is an ordinary character, not a class.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// Looks up variables during expansion.
///
/// A variable that is set to the empty string (`Some("")`) is different from one that is
/// not set at all (`None`): `${VAR-word}` and `${VAR?msg}` tell them apart.
pub trait Env {
    /// The value of `name`, or `None` when it is not set.
    fn get(&self, name: &str) -> Option<&str>;
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<&str> {
        HashMap::get(self, name).map(String::as_str)
    }
}

/// A list of `(key, value)` definitions in order; when a key is defined more than once the
/// last definition wins, as when BuildKit turns a `KEY=VALUE` list into its environment.
impl Env for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Same as the slice: the last definition of a key wins.
impl Env for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Env::get(self.as_slice(), name)
    }
}

impl<T: Env + ?Sized> Env for &T {
    fn get(&self, name: &str) -> Option<&str> {
        (**self).get(name)
    }
}

/// Expands variables and processes quotes in Dockerfile words, as BuildKit's `shell.Lex`.
///
/// The flags match BuildKit's and default to `false`:
/// - `raw_quotes` keeps the quote characters in the output (quoted text is still taken
///   literally and still kept together as one word);
/// - `raw_escapes` keeps the escape character in the output in front of what it escapes;
/// - `skip_process_quotes` treats `'` and `"` as ordinary characters;
/// - `skip_unset_env` leaves references to unset variables as they were written
///   (`$NAME`, `${NAME}`, `${NAME:-word}`, ...) instead of expanding them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lexer {
    /// The escape character: `\` by default, or a backtick when the Dockerfile starts with
    /// the directive `# escape=` followed by a backtick.
    pub escape: char,
    /// Keep quote characters in the result.
    pub raw_quotes: bool,
    /// Keep escape characters in the result.
    pub raw_escapes: bool,
    /// Do not treat quotes specially.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables unexpanded.
    pub skip_unset_env: bool,
}

impl Default for Lexer {
    /// A lexer with the default escape character `\`.
    fn default() -> Self {
        Lexer::new('\\')
    }
}

/// Everything one expansion produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded word, quotes removed (unless `raw_quotes`), spaces kept.
    pub result: String,
    /// The expanded text split into words at unquoted white space: white space that came
    /// out of a variable splits too, quoted or escaped white space does not.
    pub words: Vec<String>,
    /// Names that were looked up and found set (possibly to the empty string).
    pub matched: BTreeSet<String>,
    /// Names that were looked up and found unset.
    pub unmatched: BTreeSet<String>,
}

/// Why a word could not be expanded. Each message starts, as BuildKit's do, with
/// `failed to process "<word>":` and then says what was wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ShellError {
    /// A `${` whose closing `}` never came, e.g. `${VAR` or `${VAR:-x`.
    #[error("failed to process {word:?}: syntax error: missing '}}'")]
    MissingBrace {
        /// The word being expanded.
        word: String,
    },
    /// `${}`, `${{...}` or `${:...}`.
    #[error("failed to process {word:?}: syntax error: bad substitution")]
    BadSubstitution {
        /// The word being expanded.
        word: String,
    },
    /// `${VAR/pattern` without the `/` that starts the replacement.
    #[error("failed to process {word:?}: syntax error: missing '/' in ${{}}")]
    MissingSlash {
        /// The word being expanded.
        word: String,
    },
    /// An operator that is not supported, such as `${VAR:=word}` or `${VAR.}`.
    #[error("failed to process {word:?}: unsupported modifier ({modifier}) in substitution")]
    UnsupportedModifier {
        /// The word being expanded.
        word: String,
        /// The operator as written, e.g. `:=`.
        modifier: String,
    },
    /// A `'` without its closing `'`.
    #[error(
        "failed to process {word:?}: unexpected end of statement while looking for matching single-quote"
    )]
    UnterminatedSingleQuote {
        /// The word being expanded.
        word: String,
    },
    /// A `"` without its closing `"`.
    #[error(
        "failed to process {word:?}: unexpected end of statement while looking for matching double-quote"
    )]
    UnterminatedDoubleQuote {
        /// The word being expanded.
        word: String,
    },
    /// `${VAR?message}` with `VAR` unset, or `${VAR:?message}` with `VAR` unset or empty.
    #[error("failed to process {word:?}: {name}: {message}")]
    Required {
        /// The word being expanded.
        word: String,
        /// The variable's name.
        name: String,
        /// The expanded message, or `is not allowed to be unset` / `is not allowed to be
        /// empty` when none was given.
        message: String,
    },
    /// A pattern of `${VAR#...}`, `${VAR%...}` or `${VAR/...}` that is not valid, e.g. one
    /// with `\x` (only `\*`, `\?`, `\\`, `\}` and `\/` are allowed).
    #[error("failed to process {word:?}: invalid pattern ({pattern}) in substitution: {reason}")]
    InvalidPattern {
        /// The word being expanded.
        word: String,
        /// The pattern after expansion.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A replacement that would make the word longer than [`MAX_EXPANSION`] bytes (nested
    /// `${VAR//pattern/...}` grow exponentially: a hostile Dockerfile must not exhaust memory).
    #[error("failed to process {word:?}: the expansion would exceed {MAX_EXPANSION} bytes")]
    TooLarge {
        /// The word being expanded.
        word: String,
    },
}

/// The largest a `${VAR/pattern/replacement}` may make a value, in bytes.
pub const MAX_EXPANSION: usize = 1 << 20;

impl ShellError {
    /// The word whose expansion failed.
    pub fn word(&self) -> &str {
        match self {
            ShellError::MissingBrace { word }
            | ShellError::BadSubstitution { word }
            | ShellError::MissingSlash { word }
            | ShellError::UnsupportedModifier { word, .. }
            | ShellError::UnterminatedSingleQuote { word }
            | ShellError::UnterminatedDoubleQuote { word }
            | ShellError::Required { word, .. }
            | ShellError::InvalidPattern { word, .. }
            | ShellError::TooLarge { word } => word,
        }
    }
}

/// An error found while scanning, before the word it belongs to is attached.
#[derive(Debug)]
enum Fail {
    MissingBrace,
    BadSubstitution,
    MissingSlash,
    UnsupportedModifier(String),
    UnterminatedSingleQuote,
    UnterminatedDoubleQuote,
    Required { name: String, message: String },
    InvalidPattern { pattern: String, reason: String },
    TooLarge,
}

impl Fail {
    fn into_error(self, word: &str) -> ShellError {
        let word = word.to_string();
        match self {
            Fail::MissingBrace => ShellError::MissingBrace { word },
            Fail::BadSubstitution => ShellError::BadSubstitution { word },
            Fail::MissingSlash => ShellError::MissingSlash { word },
            Fail::UnsupportedModifier(modifier) => {
                ShellError::UnsupportedModifier { word, modifier }
            }
            Fail::UnterminatedSingleQuote => ShellError::UnterminatedSingleQuote { word },
            Fail::UnterminatedDoubleQuote => ShellError::UnterminatedDoubleQuote { word },
            Fail::Required { name, message } => ShellError::Required {
                word,
                name,
                message,
            },
            Fail::InvalidPattern { pattern, reason } => ShellError::InvalidPattern {
                word,
                pattern,
                reason,
            },
            Fail::TooLarge => ShellError::TooLarge { word },
        }
    }
}

impl Lexer {
    /// A lexer with the given escape character and every flag off.
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Expands `word` with `env`: variables replaced, quotes and escapes removed.
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        self.process_word_with_matches(word, env)
            .map(|expansion| expansion.result)
    }

    /// Expands `word` with `env`, then splits the result into words at white space that was
    /// neither quoted nor escaped.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        self.process_word_with_matches(word, env)
            .map(|expansion| expansion.words)
    }

    /// Expands `word` with `env` and returns the result, its words, and which variables were
    /// found set and which were not.
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &dyn Env,
    ) -> Result<Expansion, ShellError> {
        let mut scanner = Scanner::new(self, word, env);
        match scanner.process_until(None, self.raw_escapes) {
            Ok((result, words)) => Ok(Expansion {
                result,
                words,
                matched: scanner.matched,
                unmatched: scanner.unmatched,
            }),
            Err(fail) => Err(fail.into_error(word)),
        }
    }
}

/// Collects the words of an expansion.
#[derive(Default)]
struct WordSplitter {
    current: String,
    words: Vec<String>,
    in_word: bool,
}

impl WordSplitter {
    /// An unquoted character: white space ends the current word.
    fn push_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.current.is_empty() {
                self.words.push(std::mem::take(&mut self.current));
                self.in_word = false;
            }
        } else {
            self.push_raw_char(ch);
        }
    }

    /// A character that belongs to the word whatever it is (escaped).
    fn push_raw_char(&mut self, ch: char) {
        self.current.push(ch);
        self.in_word = true;
    }

    /// Text from a variable: its white space splits words.
    fn push_str(&mut self, text: &str) {
        text.chars().for_each(|ch| self.push_char(ch));
    }

    /// Quoted text: kept whole.
    fn push_raw_str(&mut self, text: &str) {
        self.current.push_str(text);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.words.push(self.current);
        }
        self.words
    }
}

/// The state of one expansion: the input, where we are in it, and the lookups made.
struct Scanner<'a> {
    lexer: &'a Lexer,
    env: &'a dyn Env,
    chars: Vec<char>,
    pos: usize,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl<'a> Scanner<'a> {
    fn new(lexer: &'a Lexer, word: &str, env: &'a dyn Env) -> Self {
        Scanner {
            lexer,
            env,
            chars: without_bom(word).chars().collect(),
            pos: 0,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }

    /// Looks `name` up and records whether it was found.
    fn lookup(&mut self, name: &str) -> Option<String> {
        match self.env.get(name) {
            Some(value) => {
                self.matched.insert(name.to_string());
                Some(value.to_string())
            }
            None => {
                self.unmatched.insert(name.to_string());
                None
            }
        }
    }

    /// Processes input up to `stop` (consumed, not included) or, with `None`, to the end.
    /// Returns the text and its words. Running out of input before `stop` is an error,
    /// which the caller reports as the missing `}` or `/`.
    fn process_until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), Fail> {
        let mut result = String::new();
        let mut words = WordSplitter::default();
        let quotes = !self.lexer.skip_process_quotes;

        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match ch {
                '$' => {
                    let value = self.dollar()?;
                    result.push_str(&value);
                    words.push_str(&value);
                }
                '\'' if quotes => {
                    let text = self.single_quoted()?;
                    result.push_str(&text);
                    words.push_raw_str(&text);
                }
                '"' if quotes => {
                    let text = self.double_quoted(raw_escapes)?;
                    result.push_str(&text);
                    words.push_raw_str(&text);
                }
                _ => {
                    self.pos += 1;
                    if ch == self.lexer.escape {
                        if raw_escapes {
                            words.push_raw_char(ch);
                            result.push(ch);
                        }
                        // An escape at the very end is dropped.
                        let Some(escaped) = self.next() else { break };
                        words.push_raw_char(escaped);
                        result.push(escaped);
                    } else {
                        words.push_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        match stop {
            None => Ok((result, words.finish())),
            Some('/') => Err(Fail::MissingSlash),
            Some(_) => Err(Fail::MissingBrace),
        }
    }

    /// Processes a nested word up to `stop`, as the operand of a `${...}` form. A failure
    /// that left us at the end of the input is reported as `at_end` (the missing
    /// delimiter), any other failure as it is.
    fn operand(&mut self, stop: char, raw_escapes: bool, at_end: Fail) -> Result<String, Fail> {
        match self.process_until(Some(stop), raw_escapes) {
            Ok((text, _)) => Ok(text),
            Err(_) if self.peek().is_none() => Err(at_end),
            Err(fail) => Err(fail),
        }
    }

    /// `'...'`: everything literal up to the next `'`.
    fn single_quoted(&mut self) -> Result<String, Fail> {
        self.pos += 1;
        let mut text = String::new();
        if self.lexer.raw_quotes {
            text.push('\'');
        }
        loop {
            match self.next() {
                None => return Err(Fail::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.lexer.raw_quotes {
                        text.push('\'');
                    }
                    return Ok(text);
                }
                Some(ch) => text.push(ch),
            }
        }
    }

    /// `"..."`: literal except for `$` expansions; the escape character escapes only `"`,
    /// `$` and itself and is kept in front of anything else.
    fn double_quoted(&mut self, raw_escapes: bool) -> Result<String, Fail> {
        self.pos += 1;
        let escape = self.lexer.escape;
        let mut text = String::new();
        if self.lexer.raw_quotes {
            text.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(Fail::UnterminatedDoubleQuote),
                Some('"') => {
                    self.pos += 1;
                    if self.lexer.raw_quotes {
                        text.push('"');
                    }
                    return Ok(text);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    text.push_str(&value);
                }
                Some(mut ch) => {
                    self.pos += 1;
                    if ch == escape {
                        if raw_escapes {
                            text.push(ch);
                        }
                        match self.peek() {
                            // Dropped here; the missing closing quote is reported next.
                            None => continue,
                            Some(next) if next == '"' || next == '$' || next == escape => {
                                self.pos += 1;
                                ch = next;
                            }
                            // BuildKit writes the escape character again in this case,
                            // so with `raw_escapes` it appears twice.
                            Some(_) => {}
                        }
                    }
                    text.push(ch);
                }
            }
        }
    }

    /// Reads a variable name: a run of digits (positional parameter), one special
    /// parameter character, or letters, digits and `_`.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(digit) = self.peek().filter(|&c| is_digit(c)) {
                    name.push(digit);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && is_special_parameter(ch) {
                self.pos += 1;
                name.push(ch);
                return name;
            }
            if !(is_letter(ch) || is_digit(ch) || ch == '_') {
                break;
            }
            name.push(ch);
            self.pos += 1;
        }
        name
    }

    /// `$NAME` or `${...}`, at the `$`.
    fn dollar(&mut self) -> Result<String, Fail> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.lookup(&name) {
                Some(value) => value,
                None if self.lexer.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }

        self.pos += 1;
        match self.peek() {
            None => return Err(Fail::MissingBrace),
            Some('{' | '}' | ':') => return Err(Fail::BadSubstitution),
            Some(_) => {}
        }
        let name = self.name();
        // BuildKit reports running out of input here as an unsupported modifier named
        // U+FFFD; the missing brace is what actually went wrong.
        let Some(op) = self.next() else {
            return Err(Fail::MissingBrace);
        };
        match op {
            '}' => Ok(match self.lookup(&name) {
                Some(value) => value,
                None if self.lexer.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '-' | '+' | '?' | '#' | '%' => self.parameter_operator(&name, op),
            '/' => self.replace(&name),
            other => Err(Fail::UnsupportedModifier(other.to_string())),
        }
    }

    /// `${NAME<op>word}` once `op` (`:`, `-`, `+`, `?`, `#` or `%`) has been read.
    fn parameter_operator(&mut self, name: &str, first: char) -> Result<String, Fail> {
        let (null_is_unset, op) = if first == ':' {
            match self.next() {
                Some(op) => (true, op),
                None => return Err(Fail::MissingBrace),
            }
        } else {
            (false, first)
        };
        let written = if null_is_unset {
            format!(":{op}")
        } else {
            op.to_string()
        };
        let is_pattern = op == '#' || op == '%';
        if null_is_unset && is_pattern {
            return Err(Fail::UnsupportedModifier(written));
        }

        // Patterns keep their escapes so that `\*` and friends reach the pattern compiler.
        let word = self.operand('}', is_pattern, Fail::MissingBrace)?;
        let value = self.lookup(name);
        if value.is_none() && self.lexer.skip_unset_env {
            return Ok(format!("${{{name}{written}{word}}}"));
        }
        let is_null = |value: &Option<String>| match value {
            None => true,
            Some(value) => null_is_unset && value.is_empty(),
        };

        match op {
            '-' => Ok(if is_null(&value) {
                word
            } else {
                value.unwrap_or_default()
            }),
            '+' => Ok(if is_null(&value) { String::new() } else { word }),
            '?' => match value {
                None => Err(required(name, word, "is not allowed to be unset")),
                Some(value) if null_is_unset && value.is_empty() => {
                    Err(required(name, word, "is not allowed to be empty"))
                }
                Some(value) => Ok(value),
            },
            '#' | '%' => {
                let (longest, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest),
                    None => (false, word.as_str()),
                };
                let value = value.unwrap_or_default();
                let trimmed = if op == '#' {
                    trim_prefix(pattern, &value, longest)
                } else {
                    trim_suffix(pattern, &value, longest)
                };
                trimmed.map_err(|reason| Fail::InvalidPattern {
                    pattern: pattern.to_string(),
                    reason,
                })
            }
            _ => Err(Fail::UnsupportedModifier(written)),
        }
    }

    /// `${NAME/pattern/replacement}` or `${NAME//pattern/replacement}`, after the first `/`.
    fn replace(&mut self, name: &str) -> Result<String, Fail> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let pattern = self.operand('/', true, Fail::MissingSlash)?;
        let replacement = self.operand('}', true, Fail::MissingBrace)?;
        let value = self.lookup(name);
        if value.is_none() && self.lexer.skip_unset_env {
            // BuildKit writes a single `/` here even for `//`.
            return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
        }
        let invalid = |reason| Fail::InvalidPattern {
            pattern: pattern.clone(),
            reason,
        };
        let glob = Glob::compile(&pattern, true).map_err(invalid)?;
        let value: Vec<char> = value.unwrap_or_default().chars().collect();
        // An empty pattern matches between every character: the bound covers that worst case.
        let largest = value
            .len()
            .saturating_mul(4)
            .saturating_add((value.len() + 1).saturating_mul(replacement.len()));
        if largest > MAX_EXPANSION {
            return Err(Fail::TooLarge);
        }
        if all {
            return Ok(glob.replace_all(&value, &replacement));
        }
        Ok(match glob.find(&value, 0, false) {
            Some((start, end)) => {
                let mut out: String = value.iter().take(start).collect();
                out.push_str(&replacement);
                out.extend(value.iter().skip(end));
                out
            }
            None => value.iter().collect(),
        })
    }
}

fn required(name: &str, message: String, default: &str) -> Fail {
    Fail::Required {
        name: name.to_string(),
        message: if message.is_empty() {
            default.to_string()
        } else {
            message
        },
    }
}

/// The special parameters of POSIX shells (`$@`, `$*`, `$#`, `$?`, `$-`, `$$`, `$!`, `$0`);
/// Dockerfiles never set them, but they are read as one-character names.
fn is_special_parameter(ch: char) -> bool {
    matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

/// BuildKit's scanner skips a byte-order mark at the very start of its input.
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Removes the start of `value` matched by `pattern` (shortest match, or longest when
/// `longest`); an unmatched value is returned whole.
fn trim_prefix(pattern: &str, value: &str, longest: bool) -> Result<String, String> {
    let glob = Glob::compile(pattern, longest)?;
    let chars: Vec<char> = value.chars().collect();
    Ok(match glob.find(&chars, 0, true) {
        Some((_, end)) => chars.iter().skip(end).collect(),
        None => value.to_string(),
    })
}

/// Removes the end of `value` matched by `pattern`, by trimming the prefix of the reversed
/// value with the reversed pattern (as BuildKit does).
fn trim_suffix(pattern: &str, value: &str, longest: bool) -> Result<String, String> {
    let reversed_value: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed_value, longest)?;
    Ok(trimmed.chars().rev().collect())
}

/// Reverses a pattern, keeping each `\` in front of the character it escapes:
/// `a\*c` becomes `c\*a`.
fn reverse_pattern(pattern: &str) -> String {
    let mut groups: Vec<(char, Option<char>)> = Vec::new();
    let mut chars = pattern.chars();
    while let Some(ch) = chars.next() {
        if ch == '\\' {
            // A trailing lone `\` stays on its own.
            groups.push((ch, chars.next()));
        } else {
            groups.push((ch, None));
        }
    }
    let mut out = String::with_capacity(pattern.len());
    for (first, second) in groups.into_iter().rev() {
        out.push(first);
        out.extend(second);
    }
    out
}

/// One instruction of a compiled pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inst {
    /// This character.
    Char(char),
    /// Any character but a newline.
    Any,
    /// Try both targets, the first one preferred.
    Split(usize, usize),
    /// Go on at the target.
    Jump(usize),
    /// The whole pattern matched.
    Match,
}

/// A shell pattern (`*`, `?`, `\` escapes) compiled to match exactly as BuildKit's
/// translation of it to a Go regular expression does: `*` and `?` do not match a newline,
/// and the match chosen is the leftmost one, with `*` preferring the longest run when
/// greedy and the shortest otherwise (Go's leftmost-first semantics).
///
/// Matching runs a Pike VM over the characters, so time is bounded by pattern length
/// times input length, whatever the pattern.
#[derive(Debug)]
struct Glob {
    program: Vec<Inst>,
}

impl Glob {
    /// Compiles `pattern`; the error is the reason it is invalid.
    fn compile(pattern: &str, greedy: bool) -> Result<Glob, String> {
        let mut program = Vec::new();
        let mut chars = without_bom(pattern).chars().peekable();
        let mut after_star = false;
        while let Some(ch) = chars.next() {
            let star = ch == '*';
            // A run of `*` matches the same spans as a single one.
            let repeated = star && after_star;
            after_star = star;
            match ch {
                _ if repeated => {}
                '*' => {
                    let here = program.len();
                    let (body, after) = (here + 1, here + 3);
                    program.push(if greedy {
                        Inst::Split(body, after)
                    } else {
                        Inst::Split(after, body)
                    });
                    program.push(Inst::Any);
                    program.push(Inst::Jump(here));
                }
                '?' => program.push(Inst::Any),
                '\\' => match chars.peek() {
                    // `\}` and `\/` only protect the delimiters of `${...}`: the
                    // character that follows is an ordinary one.
                    Some('}' | '/') => {}
                    _ => match chars.next() {
                        Some(escaped @ ('*' | '?' | '\\')) => program.push(Inst::Char(escaped)),
                        Some(other) => return Err(format!("invalid escape '\\{other}'")),
                        None => return Err("invalid escape '\\' at end of pattern".to_string()),
                    },
                },
                other => program.push(Inst::Char(other)),
            }
        }
        program.push(Inst::Match);
        Ok(Glob { program })
    }

    /// The first match in `text` starting at `from` or later (only at `from` when
    /// `anchored`), as a range of character positions.
    fn find(&self, text: &[char], from: usize, anchored: bool) -> Option<(usize, usize)> {
        let size = self.program.len();
        let mut current = Threads::new(size);
        let mut next = Threads::new(size);
        let mut stack = Vec::new();
        let mut found = None;
        let mut pos = from;
        loop {
            if found.is_none() && (!anchored || pos == from) {
                // A later start has the lowest priority.
                current.add(&self.program, 0, pos, &mut stack);
            }
            if current.list.is_empty() {
                break;
            }
            let ch = text.get(pos).copied();
            for &(pc, start) in &current.list {
                match self.program.get(pc) {
                    Some(Inst::Match) => {
                        found = Some((start, pos));
                        // Everything after this thread has a lower priority.
                        break;
                    }
                    Some(Inst::Char(want)) if ch == Some(*want) => {
                        next.add(&self.program, pc + 1, start, &mut stack);
                    }
                    Some(Inst::Any) if ch.is_some_and(|c| c != '\n') => {
                        next.add(&self.program, pc + 1, start, &mut stack);
                    }
                    _ => {}
                }
            }
            if pos >= text.len() {
                break;
            }
            pos += 1;
            std::mem::swap(&mut current, &mut next);
            next.clear();
        }
        found
    }

    /// Replaces every match in `text` as Go's `Regexp.ReplaceAllString` does: after an
    /// empty match the search moves on one character, an empty match right after another
    /// match is not replaced, and `$0`/`${0}` in the template stand for the match, other
    /// `$name` references for nothing and `$$` for `$`.
    fn replace_all(&self, text: &[char], template: &str) -> String {
        let mut out = String::new();
        let mut last_end = 0;
        let mut search = 0;
        while search <= text.len() {
            let Some((start, end)) = self.find(text, search, false) else {
                break;
            };
            out.extend(text.get(last_end..start).unwrap_or_default());
            if end > last_end || start == 0 {
                let matched: String = text.get(start..end).unwrap_or_default().iter().collect();
                expand_template(&mut out, template, &matched);
            }
            last_end = end;
            search = (search + 1).max(end);
        }
        out.extend(text.get(last_end..).unwrap_or_default());
        out
    }
}

/// The threads of the Pike VM at one position, in priority order, one per instruction.
struct Threads {
    list: Vec<(usize, usize)>,
    seen: Vec<bool>,
}

impl Threads {
    fn new(size: usize) -> Self {
        Threads {
            list: Vec::new(),
            seen: vec![false; size],
        }
    }

    fn clear(&mut self) {
        self.list.clear();
        self.seen.iter_mut().for_each(|seen| *seen = false);
    }

    /// Adds a thread at `pc` that started at `start`, following jumps and splits in
    /// priority order (with an explicit stack: long runs of `*` must not recurse deeply).
    fn add(&mut self, program: &[Inst], pc: usize, start: usize, stack: &mut Vec<usize>) {
        stack.clear();
        stack.push(pc);
        while let Some(pc) = stack.pop() {
            match self.seen.get_mut(pc) {
                Some(seen) if !*seen => *seen = true,
                _ => continue,
            }
            match program.get(pc) {
                Some(Inst::Jump(target)) => stack.push(*target),
                Some(Inst::Split(first, second)) => {
                    stack.push(*second);
                    stack.push(*first);
                }
                Some(_) => self.list.push((pc, start)),
                None => {}
            }
        }
    }
}

/// Appends `template` to `out` the way Go's `Regexp.Expand` does for a pattern without
/// groups: `$$` is `$`, `$0` or `${0}` is the match, any other well-formed `$name` or
/// `${name}` is empty, and a `$` that starts no reference is kept.
fn expand_template(out: &mut String, template: &str, matched: &str) {
    let mut rest = template;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        match template_reference(rest) {
            Some((name, after)) => {
                if name == "0" {
                    out.push_str(matched);
                }
                rest = after;
            }
            None => out.push('$'),
        }
    }
    out.push_str(rest);
}

/// The name of a `name` or `{name}` reference at the start of `text`, and what follows.
fn template_reference(text: &str) -> Option<(&str, &str)> {
    let (braced, body) = match text.strip_prefix('{') {
        Some(body) => (true, body),
        None => (false, text),
    };
    let len = body
        .char_indices()
        .find(|&(_, ch)| !(is_letter(ch) || is_digit(ch) || ch == '_'))
        .map_or(body.len(), |(index, _)| index);
    if len == 0 {
        return None;
    }
    let (name, mut after) = body.split_at(len);
    if braced {
        after = after.strip_prefix('}')?;
    }
    Some((name, after))
}

/// A letter as Go's `unicode.IsLetter` sees it: general category L (Unicode 15.0).
fn is_letter(ch: char) -> bool {
    if ch.is_ascii() {
        ch.is_ascii_alphabetic()
    } else {
        in_ranges(LETTER, ch)
    }
}

/// A digit as Go's `unicode.IsDigit` sees it: general category Nd (Unicode 15.0).
fn is_digit(ch: char) -> bool {
    if ch.is_ascii() {
        ch.is_ascii_digit()
    } else {
        in_ranges(DECIMAL_DIGIT, ch)
    }
}

fn in_ranges(ranges: &[(char, char)], ch: char) -> bool {
    ranges
        .binary_search_by(|&(low, high)| {
            if high < ch {
                Ordering::Less
            } else if low > ch {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

// Generated from UnicodeData.txt 15.0.0 (the version Go's `unicode` package implements):
// the ranges of general categories Lu, Ll, Lt, Lm and Lo, then of Nd.
#[rustfmt::skip]
const LETTER: &[(char, char)] = &[
    ('\u{41}', '\u{5a}'), ('\u{61}', '\u{7a}'), ('\u{aa}', '\u{aa}'), ('\u{b5}', '\u{b5}'),
    ('\u{ba}', '\u{ba}'), ('\u{c0}', '\u{d6}'), ('\u{d8}', '\u{f6}'), ('\u{f8}', '\u{2c1}'),
    ('\u{2c6}', '\u{2d1}'), ('\u{2e0}', '\u{2e4}'), ('\u{2ec}', '\u{2ec}'), ('\u{2ee}', '\u{2ee}'),
    ('\u{370}', '\u{374}'), ('\u{376}', '\u{377}'), ('\u{37a}', '\u{37d}'), ('\u{37f}', '\u{37f}'),
    ('\u{386}', '\u{386}'), ('\u{388}', '\u{38a}'), ('\u{38c}', '\u{38c}'), ('\u{38e}', '\u{3a1}'),
    ('\u{3a3}', '\u{3f5}'), ('\u{3f7}', '\u{481}'), ('\u{48a}', '\u{52f}'), ('\u{531}', '\u{556}'),
    ('\u{559}', '\u{559}'), ('\u{560}', '\u{588}'), ('\u{5d0}', '\u{5ea}'), ('\u{5ef}', '\u{5f2}'),
    ('\u{620}', '\u{64a}'), ('\u{66e}', '\u{66f}'), ('\u{671}', '\u{6d3}'), ('\u{6d5}', '\u{6d5}'),
    ('\u{6e5}', '\u{6e6}'), ('\u{6ee}', '\u{6ef}'), ('\u{6fa}', '\u{6fc}'), ('\u{6ff}', '\u{6ff}'),
    ('\u{710}', '\u{710}'), ('\u{712}', '\u{72f}'), ('\u{74d}', '\u{7a5}'), ('\u{7b1}', '\u{7b1}'),
    ('\u{7ca}', '\u{7ea}'), ('\u{7f4}', '\u{7f5}'), ('\u{7fa}', '\u{7fa}'), ('\u{800}', '\u{815}'),
    ('\u{81a}', '\u{81a}'), ('\u{824}', '\u{824}'), ('\u{828}', '\u{828}'), ('\u{840}', '\u{858}'),
    ('\u{860}', '\u{86a}'), ('\u{870}', '\u{887}'), ('\u{889}', '\u{88e}'), ('\u{8a0}', '\u{8c9}'),
    ('\u{904}', '\u{939}'), ('\u{93d}', '\u{93d}'), ('\u{950}', '\u{950}'), ('\u{958}', '\u{961}'),
    ('\u{971}', '\u{980}'), ('\u{985}', '\u{98c}'), ('\u{98f}', '\u{990}'), ('\u{993}', '\u{9a8}'),
    ('\u{9aa}', '\u{9b0}'), ('\u{9b2}', '\u{9b2}'), ('\u{9b6}', '\u{9b9}'), ('\u{9bd}', '\u{9bd}'),
    ('\u{9ce}', '\u{9ce}'), ('\u{9dc}', '\u{9dd}'), ('\u{9df}', '\u{9e1}'), ('\u{9f0}', '\u{9f1}'),
    ('\u{9fc}', '\u{9fc}'), ('\u{a05}', '\u{a0a}'), ('\u{a0f}', '\u{a10}'), ('\u{a13}', '\u{a28}'),
    ('\u{a2a}', '\u{a30}'), ('\u{a32}', '\u{a33}'), ('\u{a35}', '\u{a36}'), ('\u{a38}', '\u{a39}'),
    ('\u{a59}', '\u{a5c}'), ('\u{a5e}', '\u{a5e}'), ('\u{a72}', '\u{a74}'), ('\u{a85}', '\u{a8d}'),
    ('\u{a8f}', '\u{a91}'), ('\u{a93}', '\u{aa8}'), ('\u{aaa}', '\u{ab0}'), ('\u{ab2}', '\u{ab3}'),
    ('\u{ab5}', '\u{ab9}'), ('\u{abd}', '\u{abd}'), ('\u{ad0}', '\u{ad0}'), ('\u{ae0}', '\u{ae1}'),
    ('\u{af9}', '\u{af9}'), ('\u{b05}', '\u{b0c}'), ('\u{b0f}', '\u{b10}'), ('\u{b13}', '\u{b28}'),
    ('\u{b2a}', '\u{b30}'), ('\u{b32}', '\u{b33}'), ('\u{b35}', '\u{b39}'), ('\u{b3d}', '\u{b3d}'),
    ('\u{b5c}', '\u{b5d}'), ('\u{b5f}', '\u{b61}'), ('\u{b71}', '\u{b71}'), ('\u{b83}', '\u{b83}'),
    ('\u{b85}', '\u{b8a}'), ('\u{b8e}', '\u{b90}'), ('\u{b92}', '\u{b95}'), ('\u{b99}', '\u{b9a}'),
    ('\u{b9c}', '\u{b9c}'), ('\u{b9e}', '\u{b9f}'), ('\u{ba3}', '\u{ba4}'), ('\u{ba8}', '\u{baa}'),
    ('\u{bae}', '\u{bb9}'), ('\u{bd0}', '\u{bd0}'), ('\u{c05}', '\u{c0c}'), ('\u{c0e}', '\u{c10}'),
    ('\u{c12}', '\u{c28}'), ('\u{c2a}', '\u{c39}'), ('\u{c3d}', '\u{c3d}'), ('\u{c58}', '\u{c5a}'),
    ('\u{c5d}', '\u{c5d}'), ('\u{c60}', '\u{c61}'), ('\u{c80}', '\u{c80}'), ('\u{c85}', '\u{c8c}'),
    ('\u{c8e}', '\u{c90}'), ('\u{c92}', '\u{ca8}'), ('\u{caa}', '\u{cb3}'), ('\u{cb5}', '\u{cb9}'),
    ('\u{cbd}', '\u{cbd}'), ('\u{cdd}', '\u{cde}'), ('\u{ce0}', '\u{ce1}'), ('\u{cf1}', '\u{cf2}'),
    ('\u{d04}', '\u{d0c}'), ('\u{d0e}', '\u{d10}'), ('\u{d12}', '\u{d3a}'), ('\u{d3d}', '\u{d3d}'),
    ('\u{d4e}', '\u{d4e}'), ('\u{d54}', '\u{d56}'), ('\u{d5f}', '\u{d61}'), ('\u{d7a}', '\u{d7f}'),
    ('\u{d85}', '\u{d96}'), ('\u{d9a}', '\u{db1}'), ('\u{db3}', '\u{dbb}'), ('\u{dbd}', '\u{dbd}'),
    ('\u{dc0}', '\u{dc6}'), ('\u{e01}', '\u{e30}'), ('\u{e32}', '\u{e33}'), ('\u{e40}', '\u{e46}'),
    ('\u{e81}', '\u{e82}'), ('\u{e84}', '\u{e84}'), ('\u{e86}', '\u{e8a}'), ('\u{e8c}', '\u{ea3}'),
    ('\u{ea5}', '\u{ea5}'), ('\u{ea7}', '\u{eb0}'), ('\u{eb2}', '\u{eb3}'), ('\u{ebd}', '\u{ebd}'),
    ('\u{ec0}', '\u{ec4}'), ('\u{ec6}', '\u{ec6}'), ('\u{edc}', '\u{edf}'), ('\u{f00}', '\u{f00}'),
    ('\u{f40}', '\u{f47}'), ('\u{f49}', '\u{f6c}'), ('\u{f88}', '\u{f8c}'),
    ('\u{1000}', '\u{102a}'), ('\u{103f}', '\u{103f}'), ('\u{1050}', '\u{1055}'),
    ('\u{105a}', '\u{105d}'), ('\u{1061}', '\u{1061}'), ('\u{1065}', '\u{1066}'),
    ('\u{106e}', '\u{1070}'), ('\u{1075}', '\u{1081}'), ('\u{108e}', '\u{108e}'),
    ('\u{10a0}', '\u{10c5}'), ('\u{10c7}', '\u{10c7}'), ('\u{10cd}', '\u{10cd}'),
    ('\u{10d0}', '\u{10fa}'), ('\u{10fc}', '\u{1248}'), ('\u{124a}', '\u{124d}'),
    ('\u{1250}', '\u{1256}'), ('\u{1258}', '\u{1258}'), ('\u{125a}', '\u{125d}'),
    ('\u{1260}', '\u{1288}'), ('\u{128a}', '\u{128d}'), ('\u{1290}', '\u{12b0}'),
    ('\u{12b2}', '\u{12b5}'), ('\u{12b8}', '\u{12be}'), ('\u{12c0}', '\u{12c0}'),
    ('\u{12c2}', '\u{12c5}'), ('\u{12c8}', '\u{12d6}'), ('\u{12d8}', '\u{1310}'),
    ('\u{1312}', '\u{1315}'), ('\u{1318}', '\u{135a}'), ('\u{1380}', '\u{138f}'),
    ('\u{13a0}', '\u{13f5}'), ('\u{13f8}', '\u{13fd}'), ('\u{1401}', '\u{166c}'),
    ('\u{166f}', '\u{167f}'), ('\u{1681}', '\u{169a}'), ('\u{16a0}', '\u{16ea}'),
    ('\u{16f1}', '\u{16f8}'), ('\u{1700}', '\u{1711}'), ('\u{171f}', '\u{1731}'),
    ('\u{1740}', '\u{1751}'), ('\u{1760}', '\u{176c}'), ('\u{176e}', '\u{1770}'),
    ('\u{1780}', '\u{17b3}'), ('\u{17d7}', '\u{17d7}'), ('\u{17dc}', '\u{17dc}'),
    ('\u{1820}', '\u{1878}'), ('\u{1880}', '\u{1884}'), ('\u{1887}', '\u{18a8}'),
    ('\u{18aa}', '\u{18aa}'), ('\u{18b0}', '\u{18f5}'), ('\u{1900}', '\u{191e}'),
    ('\u{1950}', '\u{196d}'), ('\u{1970}', '\u{1974}'), ('\u{1980}', '\u{19ab}'),
    ('\u{19b0}', '\u{19c9}'), ('\u{1a00}', '\u{1a16}'), ('\u{1a20}', '\u{1a54}'),
    ('\u{1aa7}', '\u{1aa7}'), ('\u{1b05}', '\u{1b33}'), ('\u{1b45}', '\u{1b4c}'),
    ('\u{1b83}', '\u{1ba0}'), ('\u{1bae}', '\u{1baf}'), ('\u{1bba}', '\u{1be5}'),
    ('\u{1c00}', '\u{1c23}'), ('\u{1c4d}', '\u{1c4f}'), ('\u{1c5a}', '\u{1c7d}'),
    ('\u{1c80}', '\u{1c88}'), ('\u{1c90}', '\u{1cba}'), ('\u{1cbd}', '\u{1cbf}'),
    ('\u{1ce9}', '\u{1cec}'), ('\u{1cee}', '\u{1cf3}'), ('\u{1cf5}', '\u{1cf6}'),
    ('\u{1cfa}', '\u{1cfa}'), ('\u{1d00}', '\u{1dbf}'), ('\u{1e00}', '\u{1f15}'),
    ('\u{1f18}', '\u{1f1d}'), ('\u{1f20}', '\u{1f45}'), ('\u{1f48}', '\u{1f4d}'),
    ('\u{1f50}', '\u{1f57}'), ('\u{1f59}', '\u{1f59}'), ('\u{1f5b}', '\u{1f5b}'),
    ('\u{1f5d}', '\u{1f5d}'), ('\u{1f5f}', '\u{1f7d}'), ('\u{1f80}', '\u{1fb4}'),
    ('\u{1fb6}', '\u{1fbc}'), ('\u{1fbe}', '\u{1fbe}'), ('\u{1fc2}', '\u{1fc4}'),
    ('\u{1fc6}', '\u{1fcc}'), ('\u{1fd0}', '\u{1fd3}'), ('\u{1fd6}', '\u{1fdb}'),
    ('\u{1fe0}', '\u{1fec}'), ('\u{1ff2}', '\u{1ff4}'), ('\u{1ff6}', '\u{1ffc}'),
    ('\u{2071}', '\u{2071}'), ('\u{207f}', '\u{207f}'), ('\u{2090}', '\u{209c}'),
    ('\u{2102}', '\u{2102}'), ('\u{2107}', '\u{2107}'), ('\u{210a}', '\u{2113}'),
    ('\u{2115}', '\u{2115}'), ('\u{2119}', '\u{211d}'), ('\u{2124}', '\u{2124}'),
    ('\u{2126}', '\u{2126}'), ('\u{2128}', '\u{2128}'), ('\u{212a}', '\u{212d}'),
    ('\u{212f}', '\u{2139}'), ('\u{213c}', '\u{213f}'), ('\u{2145}', '\u{2149}'),
    ('\u{214e}', '\u{214e}'), ('\u{2183}', '\u{2184}'), ('\u{2c00}', '\u{2ce4}'),
    ('\u{2ceb}', '\u{2cee}'), ('\u{2cf2}', '\u{2cf3}'), ('\u{2d00}', '\u{2d25}'),
    ('\u{2d27}', '\u{2d27}'), ('\u{2d2d}', '\u{2d2d}'), ('\u{2d30}', '\u{2d67}'),
    ('\u{2d6f}', '\u{2d6f}'), ('\u{2d80}', '\u{2d96}'), ('\u{2da0}', '\u{2da6}'),
    ('\u{2da8}', '\u{2dae}'), ('\u{2db0}', '\u{2db6}'), ('\u{2db8}', '\u{2dbe}'),
    ('\u{2dc0}', '\u{2dc6}'), ('\u{2dc8}', '\u{2dce}'), ('\u{2dd0}', '\u{2dd6}'),
    ('\u{2dd8}', '\u{2dde}'), ('\u{2e2f}', '\u{2e2f}'), ('\u{3005}', '\u{3006}'),
    ('\u{3031}', '\u{3035}'), ('\u{303b}', '\u{303c}'), ('\u{3041}', '\u{3096}'),
    ('\u{309d}', '\u{309f}'), ('\u{30a1}', '\u{30fa}'), ('\u{30fc}', '\u{30ff}'),
    ('\u{3105}', '\u{312f}'), ('\u{3131}', '\u{318e}'), ('\u{31a0}', '\u{31bf}'),
    ('\u{31f0}', '\u{31ff}'), ('\u{3400}', '\u{4dbf}'), ('\u{4e00}', '\u{a48c}'),
    ('\u{a4d0}', '\u{a4fd}'), ('\u{a500}', '\u{a60c}'), ('\u{a610}', '\u{a61f}'),
    ('\u{a62a}', '\u{a62b}'), ('\u{a640}', '\u{a66e}'), ('\u{a67f}', '\u{a69d}'),
    ('\u{a6a0}', '\u{a6e5}'), ('\u{a717}', '\u{a71f}'), ('\u{a722}', '\u{a788}'),
    ('\u{a78b}', '\u{a7ca}'), ('\u{a7d0}', '\u{a7d1}'), ('\u{a7d3}', '\u{a7d3}'),
    ('\u{a7d5}', '\u{a7d9}'), ('\u{a7f2}', '\u{a801}'), ('\u{a803}', '\u{a805}'),
    ('\u{a807}', '\u{a80a}'), ('\u{a80c}', '\u{a822}'), ('\u{a840}', '\u{a873}'),
    ('\u{a882}', '\u{a8b3}'), ('\u{a8f2}', '\u{a8f7}'), ('\u{a8fb}', '\u{a8fb}'),
    ('\u{a8fd}', '\u{a8fe}'), ('\u{a90a}', '\u{a925}'), ('\u{a930}', '\u{a946}'),
    ('\u{a960}', '\u{a97c}'), ('\u{a984}', '\u{a9b2}'), ('\u{a9cf}', '\u{a9cf}'),
    ('\u{a9e0}', '\u{a9e4}'), ('\u{a9e6}', '\u{a9ef}'), ('\u{a9fa}', '\u{a9fe}'),
    ('\u{aa00}', '\u{aa28}'), ('\u{aa40}', '\u{aa42}'), ('\u{aa44}', '\u{aa4b}'),
    ('\u{aa60}', '\u{aa76}'), ('\u{aa7a}', '\u{aa7a}'), ('\u{aa7e}', '\u{aaaf}'),
    ('\u{aab1}', '\u{aab1}'), ('\u{aab5}', '\u{aab6}'), ('\u{aab9}', '\u{aabd}'),
    ('\u{aac0}', '\u{aac0}'), ('\u{aac2}', '\u{aac2}'), ('\u{aadb}', '\u{aadd}'),
    ('\u{aae0}', '\u{aaea}'), ('\u{aaf2}', '\u{aaf4}'), ('\u{ab01}', '\u{ab06}'),
    ('\u{ab09}', '\u{ab0e}'), ('\u{ab11}', '\u{ab16}'), ('\u{ab20}', '\u{ab26}'),
    ('\u{ab28}', '\u{ab2e}'), ('\u{ab30}', '\u{ab5a}'), ('\u{ab5c}', '\u{ab69}'),
    ('\u{ab70}', '\u{abe2}'), ('\u{ac00}', '\u{d7a3}'), ('\u{d7b0}', '\u{d7c6}'),
    ('\u{d7cb}', '\u{d7fb}'), ('\u{f900}', '\u{fa6d}'), ('\u{fa70}', '\u{fad9}'),
    ('\u{fb00}', '\u{fb06}'), ('\u{fb13}', '\u{fb17}'), ('\u{fb1d}', '\u{fb1d}'),
    ('\u{fb1f}', '\u{fb28}'), ('\u{fb2a}', '\u{fb36}'), ('\u{fb38}', '\u{fb3c}'),
    ('\u{fb3e}', '\u{fb3e}'), ('\u{fb40}', '\u{fb41}'), ('\u{fb43}', '\u{fb44}'),
    ('\u{fb46}', '\u{fbb1}'), ('\u{fbd3}', '\u{fd3d}'), ('\u{fd50}', '\u{fd8f}'),
    ('\u{fd92}', '\u{fdc7}'), ('\u{fdf0}', '\u{fdfb}'), ('\u{fe70}', '\u{fe74}'),
    ('\u{fe76}', '\u{fefc}'), ('\u{ff21}', '\u{ff3a}'), ('\u{ff41}', '\u{ff5a}'),
    ('\u{ff66}', '\u{ffbe}'), ('\u{ffc2}', '\u{ffc7}'), ('\u{ffca}', '\u{ffcf}'),
    ('\u{ffd2}', '\u{ffd7}'), ('\u{ffda}', '\u{ffdc}'), ('\u{10000}', '\u{1000b}'),
    ('\u{1000d}', '\u{10026}'), ('\u{10028}', '\u{1003a}'), ('\u{1003c}', '\u{1003d}'),
    ('\u{1003f}', '\u{1004d}'), ('\u{10050}', '\u{1005d}'), ('\u{10080}', '\u{100fa}'),
    ('\u{10280}', '\u{1029c}'), ('\u{102a0}', '\u{102d0}'), ('\u{10300}', '\u{1031f}'),
    ('\u{1032d}', '\u{10340}'), ('\u{10342}', '\u{10349}'), ('\u{10350}', '\u{10375}'),
    ('\u{10380}', '\u{1039d}'), ('\u{103a0}', '\u{103c3}'), ('\u{103c8}', '\u{103cf}'),
    ('\u{10400}', '\u{1049d}'), ('\u{104b0}', '\u{104d3}'), ('\u{104d8}', '\u{104fb}'),
    ('\u{10500}', '\u{10527}'), ('\u{10530}', '\u{10563}'), ('\u{10570}', '\u{1057a}'),
    ('\u{1057c}', '\u{1058a}'), ('\u{1058c}', '\u{10592}'), ('\u{10594}', '\u{10595}'),
    ('\u{10597}', '\u{105a1}'), ('\u{105a3}', '\u{105b1}'), ('\u{105b3}', '\u{105b9}'),
    ('\u{105bb}', '\u{105bc}'), ('\u{10600}', '\u{10736}'), ('\u{10740}', '\u{10755}'),
    ('\u{10760}', '\u{10767}'), ('\u{10780}', '\u{10785}'), ('\u{10787}', '\u{107b0}'),
    ('\u{107b2}', '\u{107ba}'), ('\u{10800}', '\u{10805}'), ('\u{10808}', '\u{10808}'),
    ('\u{1080a}', '\u{10835}'), ('\u{10837}', '\u{10838}'), ('\u{1083c}', '\u{1083c}'),
    ('\u{1083f}', '\u{10855}'), ('\u{10860}', '\u{10876}'), ('\u{10880}', '\u{1089e}'),
    ('\u{108e0}', '\u{108f2}'), ('\u{108f4}', '\u{108f5}'), ('\u{10900}', '\u{10915}'),
    ('\u{10920}', '\u{10939}'), ('\u{10980}', '\u{109b7}'), ('\u{109be}', '\u{109bf}'),
    ('\u{10a00}', '\u{10a00}'), ('\u{10a10}', '\u{10a13}'), ('\u{10a15}', '\u{10a17}'),
    ('\u{10a19}', '\u{10a35}'), ('\u{10a60}', '\u{10a7c}'), ('\u{10a80}', '\u{10a9c}'),
    ('\u{10ac0}', '\u{10ac7}'), ('\u{10ac9}', '\u{10ae4}'), ('\u{10b00}', '\u{10b35}'),
    ('\u{10b40}', '\u{10b55}'), ('\u{10b60}', '\u{10b72}'), ('\u{10b80}', '\u{10b91}'),
    ('\u{10c00}', '\u{10c48}'), ('\u{10c80}', '\u{10cb2}'), ('\u{10cc0}', '\u{10cf2}'),
    ('\u{10d00}', '\u{10d23}'), ('\u{10e80}', '\u{10ea9}'), ('\u{10eb0}', '\u{10eb1}'),
    ('\u{10f00}', '\u{10f1c}'), ('\u{10f27}', '\u{10f27}'), ('\u{10f30}', '\u{10f45}'),
    ('\u{10f70}', '\u{10f81}'), ('\u{10fb0}', '\u{10fc4}'), ('\u{10fe0}', '\u{10ff6}'),
    ('\u{11003}', '\u{11037}'), ('\u{11071}', '\u{11072}'), ('\u{11075}', '\u{11075}'),
    ('\u{11083}', '\u{110af}'), ('\u{110d0}', '\u{110e8}'), ('\u{11103}', '\u{11126}'),
    ('\u{11144}', '\u{11144}'), ('\u{11147}', '\u{11147}'), ('\u{11150}', '\u{11172}'),
    ('\u{11176}', '\u{11176}'), ('\u{11183}', '\u{111b2}'), ('\u{111c1}', '\u{111c4}'),
    ('\u{111da}', '\u{111da}'), ('\u{111dc}', '\u{111dc}'), ('\u{11200}', '\u{11211}'),
    ('\u{11213}', '\u{1122b}'), ('\u{1123f}', '\u{11240}'), ('\u{11280}', '\u{11286}'),
    ('\u{11288}', '\u{11288}'), ('\u{1128a}', '\u{1128d}'), ('\u{1128f}', '\u{1129d}'),
    ('\u{1129f}', '\u{112a8}'), ('\u{112b0}', '\u{112de}'), ('\u{11305}', '\u{1130c}'),
    ('\u{1130f}', '\u{11310}'), ('\u{11313}', '\u{11328}'), ('\u{1132a}', '\u{11330}'),
    ('\u{11332}', '\u{11333}'), ('\u{11335}', '\u{11339}'), ('\u{1133d}', '\u{1133d}'),
    ('\u{11350}', '\u{11350}'), ('\u{1135d}', '\u{11361}'), ('\u{11400}', '\u{11434}'),
    ('\u{11447}', '\u{1144a}'), ('\u{1145f}', '\u{11461}'), ('\u{11480}', '\u{114af}'),
    ('\u{114c4}', '\u{114c5}'), ('\u{114c7}', '\u{114c7}'), ('\u{11580}', '\u{115ae}'),
    ('\u{115d8}', '\u{115db}'), ('\u{11600}', '\u{1162f}'), ('\u{11644}', '\u{11644}'),
    ('\u{11680}', '\u{116aa}'), ('\u{116b8}', '\u{116b8}'), ('\u{11700}', '\u{1171a}'),
    ('\u{11740}', '\u{11746}'), ('\u{11800}', '\u{1182b}'), ('\u{118a0}', '\u{118df}'),
    ('\u{118ff}', '\u{11906}'), ('\u{11909}', '\u{11909}'), ('\u{1190c}', '\u{11913}'),
    ('\u{11915}', '\u{11916}'), ('\u{11918}', '\u{1192f}'), ('\u{1193f}', '\u{1193f}'),
    ('\u{11941}', '\u{11941}'), ('\u{119a0}', '\u{119a7}'), ('\u{119aa}', '\u{119d0}'),
    ('\u{119e1}', '\u{119e1}'), ('\u{119e3}', '\u{119e3}'), ('\u{11a00}', '\u{11a00}'),
    ('\u{11a0b}', '\u{11a32}'), ('\u{11a3a}', '\u{11a3a}'), ('\u{11a50}', '\u{11a50}'),
    ('\u{11a5c}', '\u{11a89}'), ('\u{11a9d}', '\u{11a9d}'), ('\u{11ab0}', '\u{11af8}'),
    ('\u{11c00}', '\u{11c08}'), ('\u{11c0a}', '\u{11c2e}'), ('\u{11c40}', '\u{11c40}'),
    ('\u{11c72}', '\u{11c8f}'), ('\u{11d00}', '\u{11d06}'), ('\u{11d08}', '\u{11d09}'),
    ('\u{11d0b}', '\u{11d30}'), ('\u{11d46}', '\u{11d46}'), ('\u{11d60}', '\u{11d65}'),
    ('\u{11d67}', '\u{11d68}'), ('\u{11d6a}', '\u{11d89}'), ('\u{11d98}', '\u{11d98}'),
    ('\u{11ee0}', '\u{11ef2}'), ('\u{11f02}', '\u{11f02}'), ('\u{11f04}', '\u{11f10}'),
    ('\u{11f12}', '\u{11f33}'), ('\u{11fb0}', '\u{11fb0}'), ('\u{12000}', '\u{12399}'),
    ('\u{12480}', '\u{12543}'), ('\u{12f90}', '\u{12ff0}'), ('\u{13000}', '\u{1342f}'),
    ('\u{13441}', '\u{13446}'), ('\u{14400}', '\u{14646}'), ('\u{16800}', '\u{16a38}'),
    ('\u{16a40}', '\u{16a5e}'), ('\u{16a70}', '\u{16abe}'), ('\u{16ad0}', '\u{16aed}'),
    ('\u{16b00}', '\u{16b2f}'), ('\u{16b40}', '\u{16b43}'), ('\u{16b63}', '\u{16b77}'),
    ('\u{16b7d}', '\u{16b8f}'), ('\u{16e40}', '\u{16e7f}'), ('\u{16f00}', '\u{16f4a}'),
    ('\u{16f50}', '\u{16f50}'), ('\u{16f93}', '\u{16f9f}'), ('\u{16fe0}', '\u{16fe1}'),
    ('\u{16fe3}', '\u{16fe3}'), ('\u{17000}', '\u{187f7}'), ('\u{18800}', '\u{18cd5}'),
    ('\u{18d00}', '\u{18d08}'), ('\u{1aff0}', '\u{1aff3}'), ('\u{1aff5}', '\u{1affb}'),
    ('\u{1affd}', '\u{1affe}'), ('\u{1b000}', '\u{1b122}'), ('\u{1b132}', '\u{1b132}'),
    ('\u{1b150}', '\u{1b152}'), ('\u{1b155}', '\u{1b155}'), ('\u{1b164}', '\u{1b167}'),
    ('\u{1b170}', '\u{1b2fb}'), ('\u{1bc00}', '\u{1bc6a}'), ('\u{1bc70}', '\u{1bc7c}'),
    ('\u{1bc80}', '\u{1bc88}'), ('\u{1bc90}', '\u{1bc99}'), ('\u{1d400}', '\u{1d454}'),
    ('\u{1d456}', '\u{1d49c}'), ('\u{1d49e}', '\u{1d49f}'), ('\u{1d4a2}', '\u{1d4a2}'),
    ('\u{1d4a5}', '\u{1d4a6}'), ('\u{1d4a9}', '\u{1d4ac}'), ('\u{1d4ae}', '\u{1d4b9}'),
    ('\u{1d4bb}', '\u{1d4bb}'), ('\u{1d4bd}', '\u{1d4c3}'), ('\u{1d4c5}', '\u{1d505}'),
    ('\u{1d507}', '\u{1d50a}'), ('\u{1d50d}', '\u{1d514}'), ('\u{1d516}', '\u{1d51c}'),
    ('\u{1d51e}', '\u{1d539}'), ('\u{1d53b}', '\u{1d53e}'), ('\u{1d540}', '\u{1d544}'),
    ('\u{1d546}', '\u{1d546}'), ('\u{1d54a}', '\u{1d550}'), ('\u{1d552}', '\u{1d6a5}'),
    ('\u{1d6a8}', '\u{1d6c0}'), ('\u{1d6c2}', '\u{1d6da}'), ('\u{1d6dc}', '\u{1d6fa}'),
    ('\u{1d6fc}', '\u{1d714}'), ('\u{1d716}', '\u{1d734}'), ('\u{1d736}', '\u{1d74e}'),
    ('\u{1d750}', '\u{1d76e}'), ('\u{1d770}', '\u{1d788}'), ('\u{1d78a}', '\u{1d7a8}'),
    ('\u{1d7aa}', '\u{1d7c2}'), ('\u{1d7c4}', '\u{1d7cb}'), ('\u{1df00}', '\u{1df1e}'),
    ('\u{1df25}', '\u{1df2a}'), ('\u{1e030}', '\u{1e06d}'), ('\u{1e100}', '\u{1e12c}'),
    ('\u{1e137}', '\u{1e13d}'), ('\u{1e14e}', '\u{1e14e}'), ('\u{1e290}', '\u{1e2ad}'),
    ('\u{1e2c0}', '\u{1e2eb}'), ('\u{1e4d0}', '\u{1e4eb}'), ('\u{1e7e0}', '\u{1e7e6}'),
    ('\u{1e7e8}', '\u{1e7eb}'), ('\u{1e7ed}', '\u{1e7ee}'), ('\u{1e7f0}', '\u{1e7fe}'),
    ('\u{1e800}', '\u{1e8c4}'), ('\u{1e900}', '\u{1e943}'), ('\u{1e94b}', '\u{1e94b}'),
    ('\u{1ee00}', '\u{1ee03}'), ('\u{1ee05}', '\u{1ee1f}'), ('\u{1ee21}', '\u{1ee22}'),
    ('\u{1ee24}', '\u{1ee24}'), ('\u{1ee27}', '\u{1ee27}'), ('\u{1ee29}', '\u{1ee32}'),
    ('\u{1ee34}', '\u{1ee37}'), ('\u{1ee39}', '\u{1ee39}'), ('\u{1ee3b}', '\u{1ee3b}'),
    ('\u{1ee42}', '\u{1ee42}'), ('\u{1ee47}', '\u{1ee47}'), ('\u{1ee49}', '\u{1ee49}'),
    ('\u{1ee4b}', '\u{1ee4b}'), ('\u{1ee4d}', '\u{1ee4f}'), ('\u{1ee51}', '\u{1ee52}'),
    ('\u{1ee54}', '\u{1ee54}'), ('\u{1ee57}', '\u{1ee57}'), ('\u{1ee59}', '\u{1ee59}'),
    ('\u{1ee5b}', '\u{1ee5b}'), ('\u{1ee5d}', '\u{1ee5d}'), ('\u{1ee5f}', '\u{1ee5f}'),
    ('\u{1ee61}', '\u{1ee62}'), ('\u{1ee64}', '\u{1ee64}'), ('\u{1ee67}', '\u{1ee6a}'),
    ('\u{1ee6c}', '\u{1ee72}'), ('\u{1ee74}', '\u{1ee77}'), ('\u{1ee79}', '\u{1ee7c}'),
    ('\u{1ee7e}', '\u{1ee7e}'), ('\u{1ee80}', '\u{1ee89}'), ('\u{1ee8b}', '\u{1ee9b}'),
    ('\u{1eea1}', '\u{1eea3}'), ('\u{1eea5}', '\u{1eea9}'), ('\u{1eeab}', '\u{1eebb}'),
    ('\u{20000}', '\u{2a6df}'), ('\u{2a700}', '\u{2b739}'), ('\u{2b740}', '\u{2b81d}'),
    ('\u{2b820}', '\u{2cea1}'), ('\u{2ceb0}', '\u{2ebe0}'), ('\u{2f800}', '\u{2fa1d}'),
    ('\u{30000}', '\u{3134a}'), ('\u{31350}', '\u{323af}'),
];
#[rustfmt::skip]
const DECIMAL_DIGIT: &[(char, char)] = &[
    ('\u{30}', '\u{39}'), ('\u{660}', '\u{669}'), ('\u{6f0}', '\u{6f9}'), ('\u{7c0}', '\u{7c9}'),
    ('\u{966}', '\u{96f}'), ('\u{9e6}', '\u{9ef}'), ('\u{a66}', '\u{a6f}'), ('\u{ae6}', '\u{aef}'),
    ('\u{b66}', '\u{b6f}'), ('\u{be6}', '\u{bef}'), ('\u{c66}', '\u{c6f}'), ('\u{ce6}', '\u{cef}'),
    ('\u{d66}', '\u{d6f}'), ('\u{de6}', '\u{def}'), ('\u{e50}', '\u{e59}'), ('\u{ed0}', '\u{ed9}'),
    ('\u{f20}', '\u{f29}'), ('\u{1040}', '\u{1049}'), ('\u{1090}', '\u{1099}'),
    ('\u{17e0}', '\u{17e9}'), ('\u{1810}', '\u{1819}'), ('\u{1946}', '\u{194f}'),
    ('\u{19d0}', '\u{19d9}'), ('\u{1a80}', '\u{1a89}'), ('\u{1a90}', '\u{1a99}'),
    ('\u{1b50}', '\u{1b59}'), ('\u{1bb0}', '\u{1bb9}'), ('\u{1c40}', '\u{1c49}'),
    ('\u{1c50}', '\u{1c59}'), ('\u{a620}', '\u{a629}'), ('\u{a8d0}', '\u{a8d9}'),
    ('\u{a900}', '\u{a909}'), ('\u{a9d0}', '\u{a9d9}'), ('\u{a9f0}', '\u{a9f9}'),
    ('\u{aa50}', '\u{aa59}'), ('\u{abf0}', '\u{abf9}'), ('\u{ff10}', '\u{ff19}'),
    ('\u{104a0}', '\u{104a9}'), ('\u{10d30}', '\u{10d39}'), ('\u{11066}', '\u{1106f}'),
    ('\u{110f0}', '\u{110f9}'), ('\u{11136}', '\u{1113f}'), ('\u{111d0}', '\u{111d9}'),
    ('\u{112f0}', '\u{112f9}'), ('\u{11450}', '\u{11459}'), ('\u{114d0}', '\u{114d9}'),
    ('\u{11650}', '\u{11659}'), ('\u{116c0}', '\u{116c9}'), ('\u{11730}', '\u{11739}'),
    ('\u{118e0}', '\u{118e9}'), ('\u{11950}', '\u{11959}'), ('\u{11c50}', '\u{11c59}'),
    ('\u{11d50}', '\u{11d59}'), ('\u{11da0}', '\u{11da9}'), ('\u{11f50}', '\u{11f59}'),
    ('\u{16a60}', '\u{16a69}'), ('\u{16ac0}', '\u{16ac9}'), ('\u{16b50}', '\u{16b59}'),
    ('\u{1d7ce}', '\u{1d7ff}'), ('\u{1e140}', '\u{1e149}'), ('\u{1e2f0}', '\u{1e2f9}'),
    ('\u{1e4f0}', '\u{1e4f9}'), ('\u{1e950}', '\u{1e959}'), ('\u{1fbf0}', '\u{1fbf9}'),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn expand(word: &str, pairs: &[(&str, &str)]) -> Result<String, ShellError> {
        Lexer::new('\\').process_word(word, &env(pairs))
    }

    fn ok(word: &str, pairs: &[(&str, &str)]) -> String {
        match expand(word, pairs) {
            Ok(result) => result,
            Err(err) => panic!("{word:?} failed: {err}"),
        }
    }

    #[test]
    fn plain_variables_and_defaults() {
        let vars = [("A", "x"), ("E", "")];
        assert_eq!(
            ok("$A-${A}-${A:-d}-${E:-d}-${E-d}-${U-d}", &vars),
            "x-x-x-d--d"
        );
        assert_eq!(ok("${A:+y}|${E:+y}|${E+y}|${U+y}", &vars), "y||y|");
        assert_eq!(ok("$", &vars), "$");
        assert_eq!(ok("$.x", &vars), "$.x");
        assert_eq!(ok("a$1b$12c", &vars), "abc");
        assert_eq!(ok("$@@", &vars), "@");
    }

    #[test]
    fn required_variables() {
        let vars = [("SET", "v"), ("EMPTY", "")];
        assert_eq!(ok("${SET:?no}", &vars), "v");
        assert_eq!(ok("${EMPTY?no}", &vars), "");
        let err = expand("${EMPTY:?must be set for $SET}", &vars).unwrap_err();
        assert_eq!(
            err,
            ShellError::Required {
                word: "${EMPTY:?must be set for $SET}".into(),
                name: "EMPTY".into(),
                message: "must be set for v".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "failed to process \"${EMPTY:?must be set for $SET}\": EMPTY: must be set for v"
        );
        let err = expand("${NOPE?}", &vars).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("NOPE: is not allowed to be unset")
        );
        let err = expand("${EMPTY:?}", &vars).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("EMPTY: is not allowed to be empty")
        );
    }

    #[test]
    fn syntax_errors() {
        type Check = fn(&ShellError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("${", |e| matches!(e, ShellError::MissingBrace { .. })),
            ("${A", |e| matches!(e, ShellError::MissingBrace { .. })),
            ("${A:-x", |e| matches!(e, ShellError::MissingBrace { .. })),
            ("${A:", |e| matches!(e, ShellError::MissingBrace { .. })),
            ("${}", |e| matches!(e, ShellError::BadSubstitution { .. })),
            ("${:-x}", |e| {
                matches!(e, ShellError::BadSubstitution { .. })
            }),
            ("${A/x}", |e| matches!(e, ShellError::MissingSlash { .. })),
            ("${A//}", |e| matches!(e, ShellError::MissingSlash { .. })),
            ("${A/x/y", |e| matches!(e, ShellError::MissingBrace { .. })),
            ("'abc", |e| {
                matches!(e, ShellError::UnterminatedSingleQuote { .. })
            }),
            ("\"abc", |e| {
                matches!(e, ShellError::UnterminatedDoubleQuote { .. })
            }),
            ("\"abc\\", |e| {
                matches!(e, ShellError::UnterminatedDoubleQuote { .. })
            }),
            (
                "${A:=x}",
                |e| matches!(e, ShellError::UnsupportedModifier { modifier, .. } if modifier == ":="),
            ),
            (
                "${A.}",
                |e| matches!(e, ShellError::UnsupportedModifier { modifier, .. } if modifier == "."),
            ),
            (
                "${A:#x}",
                |e| matches!(e, ShellError::UnsupportedModifier { modifier, .. } if modifier == ":#"),
            ),
            (
                "${A#\\x}",
                |e| matches!(e, ShellError::InvalidPattern { reason, .. } if reason == "invalid escape '\\x'"),
            ),
        ];
        for (word, check) in cases {
            match expand(word, &[("A", "abc")]) {
                Ok(result) => panic!("{word:?} should fail, got {result:?}"),
                Err(err) => assert!(check(&err), "{word:?}: unexpected error {err:?}"),
            }
        }
        assert_eq!(
            expand("${A:=x}", &[]).unwrap_err().to_string(),
            "failed to process \"${A:=x}\": unsupported modifier (:=) in substitution"
        );
    }

    #[test]
    fn prefix_and_suffix_patterns() {
        let vars = [("P", "/usr/local/bin/tool.tar.gz"), ("X", "xxyy")];
        assert_eq!(ok("${P#*/}", &vars), "usr/local/bin/tool.tar.gz");
        assert_eq!(ok("${P##*/}", &vars), "tool.tar.gz");
        assert_eq!(ok("${P%.*}", &vars), "/usr/local/bin/tool.tar");
        assert_eq!(ok("${P%%.*}", &vars), "/usr/local/bin/tool");
        assert_eq!(ok("${P#/usr}", &vars), "/local/bin/tool.tar.gz");
        assert_eq!(ok("${P#nomatch}", &vars), "/usr/local/bin/tool.tar.gz");
        assert_eq!(ok("${X#*x*y}", &vars), "y");
        assert_eq!(ok("${X##*x}", &vars), "yy");
        assert_eq!(ok("${X#?}", &vars), "xyy");
        assert_eq!(ok("${X%?}", &vars), "xxy");
        assert_eq!(
            ok("${X#*}|${X#}|${X##}|${X%}|${X%%}", &vars),
            "xxyy|xxyy|xxyy|xxyy|xxyy"
        );
        assert_eq!(ok("${X%%*}", &vars), "");
        assert_eq!(ok("${U#*}", &vars), "");
        // Escaped wildcards and regex metacharacters are literal.
        assert_eq!(ok("${F%%\\**}", &[("F", "xx**")]), "xx");
        assert_eq!(ok("${F%%\\**\\*}", &[("F", "a***yy*")]), "a");
        assert_eq!(ok("${F#?\\?}", &[("F", "???y")]), "?y");
        assert_eq!(
            ok("${F#()[]{\\}^$.\\*\\?|\\\\}", &[("F", "()[]{}^$.*?|\\x")]),
            "x"
        );
        // Brackets are not classes.
        assert_eq!(ok("${F#[ab]}", &[("F", "[ab]c")]), "c");
        assert_eq!(ok("${F#[ab]}", &[("F", "abc")]), "abc");
        // Wildcards do not cross a newline.
        assert_eq!(ok("${F#*b}", &[("F", "a\nb")]), "a\nb");
        assert_eq!(ok("${F#a?b}", &[("F", "a\nb")]), "a\nb");
        // The pattern can come from a variable, unicode is matched by character.
        assert_eq!(ok("${F#$N}", &[("F", "한국어"), ("N", "?")]), "국어");
        assert_eq!(ok("${F%\\}}", &[("F", "a}")]), "a");
    }

    #[test]
    fn replacements_cannot_exhaust_memory() {
        let env = vec![("P".to_string(), "x".repeat(2000))];
        let lexer = Lexer::new('\\');
        // An empty pattern with the value itself as the replacement: 2001 copies of it.
        let word = "${P///${P}}";
        assert!(matches!(
            lexer.process_word(word, &env),
            Err(ShellError::TooLarge { .. })
        ));
        assert_eq!(
            lexer.process_word("${P//x/y}", &env).unwrap(),
            "y".repeat(2000)
        );
    }

    #[test]
    fn replacement_patterns() {
        let vars = [("F", "/tmp/tmp/bar.txt"), ("N", "/tmp")];
        assert_eq!(ok("${F/$N/}", &vars), "/tmp/bar.txt");
        assert_eq!(ok("${F//$N/}", &vars), "/bar.txt");
        assert_eq!(ok("${F//\\//\\/}", &vars), "\\/tmp\\/tmp\\/bar.txt");
        assert_eq!(ok("${F/t*p/X}", &vars), "/X/bar.txt");
        assert_eq!(ok("${F/nomatch/X}", &vars), "/tmp/tmp/bar.txt");
        let glob = [("F", "/foo*/*/*.txt"), ("N", "\\*/")];
        assert_eq!(
            ok("${F/$N/.} - ${F//$N/.}", &glob),
            "/foo.*/*.txt - /foo..*.txt"
        );
        let wild = [("F", "/a/foo/b/c.txt"), ("N", "/?/"), ("R", "/")];
        assert_eq!(
            ok("${F/$N/$R} - ${F//$N/$R}", &wild),
            "/foo/b/c.txt - /foo/c.txt"
        );
        // Empty patterns match everywhere, as Go's regexp does.
        assert_eq!(ok("${F/$E/ww}", &[("F", "xxyy"), ("E", "")]), "wwxxyy");
        assert_eq!(ok("${F//$E/-}", &[("F", "ab"), ("E", "")]), "-a-b-");
        assert_eq!(ok("${F///}", &[("F", "xxyy")]), "xxyy");
        assert_eq!(ok("${F///}", &[]), "");
        // Replace-all expands Go template references in the replacement.
        let dollars = [("F", "ab"), ("R", "<$0>"), ("S", "$$|$1|${0}|$x|$")];
        assert_eq!(ok("${F//?/$R}", &dollars), "<a><b>");
        assert_eq!(ok("${F/?/$R}", &dollars), "<$0>b");
        assert_eq!(ok("${F//a/$S}", &dollars), "$||a||$b");
    }

    #[test]
    fn quotes_and_escapes() {
        let vars = [("A", "x y")];
        assert_eq!(ok("'$A'\"$A\"\\$A", &vars), "$Ax y$A");
        assert_eq!(ok("\"a\\b\\\"\\$\\\\\"", &vars), "a\\b\"$\\");
        assert_eq!(ok("a\\", &vars), "a");
        let backtick = Lexer::new('`');
        let env = env(&vars);
        assert_eq!(backtick.process_word("a`$A\\n", &env).unwrap(), "a$A\\n");
        assert_eq!(backtick.process_word("\"``\"", &env).unwrap(), "`");
    }

    #[test]
    fn raw_modes() {
        let env = env(&[("A", "x")]);
        let mut lexer = Lexer::new('\\');
        lexer.raw_quotes = true;
        assert_eq!(
            lexer.process_word("'a$A'\"b$A\"", &env).unwrap(),
            "'a$A'\"bx\""
        );
        lexer.raw_quotes = false;
        lexer.raw_escapes = true;
        assert_eq!(lexer.process_word("a\\$A\\b", &env).unwrap(), "a\\$A\\b");
        assert_eq!(lexer.process_word("\"\\$A\"", &env).unwrap(), "\\$A");
        // As in BuildKit, a non-special escape inside double quotes comes out twice.
        assert_eq!(lexer.process_word("\"\\b\"", &env).unwrap(), "\\\\b");
        // Default words of `${...}` never keep raw escapes.
        assert_eq!(lexer.process_word("${U:-\\$A}", &env).unwrap(), "$A");
        let mut lexer = Lexer::new('\\');
        lexer.skip_process_quotes = true;
        assert_eq!(lexer.process_word("'$A' \"b\"", &env).unwrap(), "'x' \"b\"");
    }

    #[test]
    fn skip_unset_env_keeps_references() {
        let env = env(&[("A", "x")]);
        let mut lexer = Lexer::new('\\');
        lexer.skip_unset_env = true;
        let word = "$A $U ${U} ${U:-d} ${U-d} ${U#p} ${U//p/r} ${U:=x}";
        assert_eq!(
            lexer.process_word(word, &env).unwrap(),
            "x $U ${U} ${U:-d} ${U-d} ${U#p} ${U/p/r} ${U:=x}"
        );
    }

    #[test]
    fn words_split_on_unquoted_space() {
        let lexer = Lexer::new('\\');
        let env = env(&[("S", " a  b "), ("E", "")]);
        let words = |word: &str| lexer.process_words(word, &env).unwrap();
        assert_eq!(words("x${S}y"), ["x", "a", "b", "y"]);
        assert_eq!(words("x\"${S}\"y"), ["x a  b y"]);
        assert_eq!(words("a\\ b c"), ["a b", "c"]);
        assert_eq!(words("a \"\" b"), ["a", "b"]);
        assert_eq!(words("$E"), Vec::<String>::new());
        assert_eq!(words(" \t "), Vec::<String>::new());
        // Nested expansions do not disturb the word being built.
        assert_eq!(words("pre${U:-mid}post end"), ["premidpost", "end"]);
    }

    #[test]
    fn matched_and_unmatched() {
        let lexer = Lexer::new('\\');
        let env = env(&[("FOO", "xxx"), ("BAR", "")]);
        let got = lexer
            .process_word_with_matches("${FOO:-a} ${BAR:-b} ${BAZ:-c} $FOO", &env)
            .unwrap();
        assert_eq!(got.result, "xxx b c xxx");
        assert_eq!(got.words, ["xxx", "b", "c", "xxx"]);
        assert_eq!(got.matched, BTreeSet::from(["FOO".into(), "BAR".into()]));
        assert_eq!(got.unmatched, BTreeSet::from(["BAZ".into()]));
        let none = lexer.process_word_with_matches("x", &env).unwrap();
        assert!(none.matched.is_empty() && none.unmatched.is_empty());
    }

    #[test]
    fn env_implementations() {
        let list = vec![
            ("A".to_string(), "1".to_string()),
            ("A".to_string(), "2".to_string()),
        ];
        assert_eq!(Env::get(&list, "A"), Some("2"));
        assert_eq!(Env::get(list.as_slice(), "B"), None);
        let lexer = Lexer::default();
        assert_eq!(lexer.process_word("$A", &list).unwrap(), "2");
        assert_eq!(lexer.process_word("$A", &list.as_slice()).unwrap(), "2");
        let map: HashMap<String, String> = list.into_iter().collect();
        assert_eq!(lexer.process_word("$A", &map).unwrap(), "2");
    }

    #[test]
    fn unicode_names() {
        let vars = [("한국어", "k"), ("x٣", "d")];
        assert_eq!(ok("$한국어!", &vars), "k!");
        // Arabic-Indic digits are digits, superscripts are not.
        assert_eq!(ok("$x٣", &vars), "d");
        assert_eq!(ok("$٣x", &vars), "x");
        assert_eq!(ok("$²", &vars), "$²");
        assert_eq!(ok("\u{feff}a", &vars), "a");
    }

    #[test]
    fn pattern_helpers() {
        assert_eq!(reverse_pattern("a\\*c"), "c\\*a");
        assert_eq!(reverse_pattern("\\\\\\ab"), "b\\a\\\\");
        assert_eq!(reverse_pattern("ab\\"), "\\ba");
        assert_eq!(reverse_pattern("👽\\🚀🖖"), "🖖\\🚀👽");
        assert!(Glob::compile("\\", true).is_err());
        assert!(Glob::compile("\\x", true).is_err());
        assert!(Glob::compile("\\\\\\", true).is_err());
        let lazy = Glob::compile("a*b", false).unwrap();
        let text: Vec<char> = "xxabab".chars().collect();
        assert_eq!(lazy.find(&text, 0, false), Some((2, 4)));
        assert_eq!(lazy.find(&text, 0, true), None);
        let greedy = Glob::compile("a*b", true).unwrap();
        assert_eq!(greedy.find(&text, 0, false), Some((2, 6)));
    }

    #[test]
    fn long_inputs_stay_fast() {
        // Patterns that make a backtracking matcher take exponential time.
        let pattern = "*a".repeat(40);
        let value = "a".repeat(3_000);
        let word = format!("${{V#{pattern}b}}|${{V%{pattern}b}}|${{V/{pattern}b/x}}");
        assert_eq!(
            ok(&word, &[("V", &value)]),
            format!("{value}|{value}|{value}")
        );
        let stars = "*".repeat(5_000);
        let word = format!("${{V##{stars}}}|${{V//{stars}/x}}");
        assert_eq!(ok(&word, &[("V", &value)]), "|x");
    }

    /// Every short word over the characters that matter, and some longer pseudo-random
    /// ones, expand without panicking under every flag combination.
    #[test]
    fn never_panics() {
        const ALPHABET: &[char] = &[
            '$', '{', '}', ':', '-', '+', '?', '#', '%', '/', '\\', '\'', '"', '*', '`', ' ', 'a',
            '0', '\n', '한',
        ];
        let env = env(&[("a", "a*\\"), ("E", "")]);
        let lexers: Vec<Lexer> = (0..32u32)
            .map(|bits| Lexer {
                escape: if bits & 1 == 0 { '\\' } else { '`' },
                raw_quotes: bits & 2 != 0,
                raw_escapes: bits & 4 != 0,
                skip_process_quotes: bits & 8 != 0,
                skip_unset_env: bits & 16 != 0,
            })
            .collect();
        let base = ALPHABET.len();
        for len in 0..=3u32 {
            for mut n in 0..base.pow(len) {
                let mut word = String::new();
                for _ in 0..len {
                    word.push(ALPHABET[n % base]);
                    n /= base;
                }
                for lexer in &lexers {
                    let _ = lexer.process_word_with_matches(&word, &env);
                }
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let mut word = String::from("${a");
            for _ in 0..12 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                word.push(ALPHABET[(seed % base as u64) as usize]);
            }
            for lexer in lexers.iter().step_by(3) {
                let _ = lexer.process_word_with_matches(&word, &env);
            }
        }
    }
}
