//! Runs BuildKit's own shell-expansion data files (`envVarTest`, `wordsTest`) against
//! `strata_shared::dockerfile::shell`, reading them the way BuildKit's `lex_test.go` does.
//!
//! The files live outside the repository, in `../shared/conformance` next to it; when that
//! folder is missing the tests say they skipped and pass.

use std::fmt::Write as _;
use std::path::PathBuf;

use strata_shared::dockerfile::shell::Lexer;

/// Lines of `envVarTest` that are cases, Windows ones included (see the folder's README).
const ENV_VAR_CASES: usize = 230;
/// Of those, the Windows-only (`W`) ones, which are not run here.
const ENV_VAR_WINDOWS_CASES: usize = 2;
/// Cases of `wordsTest`.
const WORDS_CASES: usize = 24;

fn shell_data_dir() -> Option<PathBuf> {
    let root = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance"
    ));
    if root.is_dir() {
        Some(root.join("buildkit/frontend/dockerfile/shell"))
    } else {
        println!("SKIPPED: ../shared/conformance not found (looked for {root:?})");
        None
    }
}

fn read(dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {path:?}: {err}"))
}

/// `PLATFORM | input | expected` lines: comment lines start with `#` (checked before
/// trimming), blank lines are skipped, every field is trimmed, `error` means must fail.
#[test]
fn env_var_test() {
    let Some(dir) = shell_data_dir() else { return };
    let text = read(&dir, "envVarTest");
    let env: Vec<(String, String)> = [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect();
    let lexer = Lexer::new('\\');

    let (mut cases, mut skipped, mut failures) = (0, 0, String::new());
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.starts_with('#') {
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        let [platform, input, expected] = fields[..] else {
            panic!("envVarTest:{line_number}: expected 3 fields in {line:?}");
        };
        let (platform, input, expected) = (platform.trim(), input.trim(), expected.trim());
        cases += 1;
        match platform {
            "W" => {
                skipped += 1;
                continue;
            }
            "A" | "U" => {}
            other => panic!("envVarTest:{line_number}: unknown platform {other:?}"),
        }

        let got = lexer.process_word(input, &env);
        let failed = match (&got, expected) {
            (Err(_), "error") => false,
            (Ok(result), expected) => expected == "error" || result != expected,
            (Err(_), _) => true,
        };
        if failed {
            let _ = writeln!(
                failures,
                "envVarTest:{line_number}: input {input:?}: expected {expected:?}, got {got:?}"
            );
        }
    }

    assert!(failures.is_empty(), "envVarTest failures:\n{failures}");
    assert_eq!(cases, ENV_VAR_CASES, "number of cases in envVarTest");
    assert_eq!(
        skipped, ENV_VAR_WINDOWS_CASES,
        "number of Windows-only cases"
    );
    println!(
        "envVarTest: {} cases passed, {skipped} Windows-only skipped",
        cases - skipped
    );
}

/// `input | w1,w2,...` lines, checked with `process_words`; `ENV k=v` lines add to the
/// environment of the cases after them; `#` lines are comments. As in BuildKit's test, the
/// input is trimmed but the expected list only loses its leading spaces, and a failure
/// counts as the single word `error`.
#[test]
fn words_test() {
    let Some(dir) = shell_data_dir() else { return };
    let text = read(&dir, "wordsTest");
    let lexer = Lexer::new('\\');
    let mut env: Vec<(String, String)> = Vec::new();

    let (mut cases, mut failures) = (0, String::new());
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.starts_with('#') {
            continue;
        }
        if let Some(definition) = line.strip_prefix("ENV ") {
            let definition = definition.trim_start_matches(' ');
            let (key, value) = definition.split_once('=').unwrap_or((definition, ""));
            env.push((key.to_string(), value.to_string()));
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        let [input, expected] = fields[..] else {
            panic!("wordsTest:{line_number}: expected exactly one '|' in {line:?}");
        };
        let input = input.trim();
        let expected: Vec<&str> = expected.trim_start_matches(' ').split(',').collect();
        cases += 1;

        let got = lexer
            .process_words(input, &env)
            .unwrap_or_else(|_| vec!["error".to_string()]);
        if got != expected {
            let _ = writeln!(
                failures,
                "wordsTest:{line_number}: input {input:?}: expected {expected:?}, got {got:?}"
            );
        }
    }

    assert!(failures.is_empty(), "wordsTest failures:\n{failures}");
    assert_eq!(cases, WORDS_CASES, "number of cases in wordsTest");
    println!("wordsTest: {cases} cases passed");
}
