//! BuildKit's own parser test data, run against strata's parser: every golden file must
//! reproduce its `result` byte for byte, every negative file must fail, and the line-number
//! file must give BuildKit's ranges.
//!
//! The data lives in `../shared/conformance` beside the repository (CI always has it); when
//! it is missing the tests say so and skip.

use std::path::PathBuf;

use strata_shared::dockerfile::parser;

fn conformance_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance"
    ))
    .join("buildkit/frontend/dockerfile/parser");
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "SKIPPED: ../shared/conformance not found at {}",
            dir.display()
        );
        None
    }
}

fn case_dirs(dir: PathBuf) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

#[test]
fn golden_files_reproduce_results() {
    let Some(dir) = conformance_dir() else { return };
    let cases = case_dirs(dir.join("testfiles"));
    assert_eq!(cases.len(), 33, "expected BuildKit's 33 golden cases");
    let mut failures = Vec::new();
    for case in &cases {
        let src = std::fs::read(case.join("Dockerfile")).expect("Dockerfile");
        let want = std::fs::read_to_string(case.join("result")).expect("result");
        match parser::parse_bytes(&src) {
            Ok(ast) => {
                let got = ast.dump();
                if got != want {
                    failures.push(format!(
                        "{}:\n--- want\n{want}--- got\n{got}",
                        case.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: parse failed: {e}", case.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden files differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn negative_files_fail() {
    let Some(dir) = conformance_dir() else { return };
    let cases = case_dirs(dir.join("testfiles-negative"));
    assert_eq!(cases.len(), 4, "expected BuildKit's 4 negative cases");
    for case in &cases {
        let src = std::fs::read(case.join("Dockerfile")).expect("Dockerfile");
        let text = String::from_utf8_lossy(&src);
        // BuildKit rejects these in its parser or when it gives the nodes their meaning.
        let result = strata_shared::dockerfile::Dockerfile::parse(&text);
        assert!(result.is_err(), "{} parsed but must fail", case.display());
    }
}

#[test]
fn line_numbers_match() {
    let Some(dir) = conformance_dir() else { return };
    let src = std::fs::read(dir.join("testfile-line/Dockerfile")).expect("Dockerfile");
    let ast = parser::parse_bytes(&src).expect("parses");
    let ranges: Vec<(usize, usize)> = ast
        .children
        .iter()
        .map(|c| (c.start_line, c.end_line))
        .collect();
    assert_eq!(ranges, vec![(5, 5), (11, 12), (17, 31)]);
}
