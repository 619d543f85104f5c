//! `strata plan` end to end: the real binary on real files.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn strata(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("strata starts");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("strata runs")
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let out = strata(args, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Runs `strata plan -f -` on a Dockerfile that must be refused; returns stderr.
fn refused(dockerfile: &str, extra: &[&str]) -> String {
    let mut args = vec!["plan", "-f", "-"];
    args.extend_from_slice(extra);
    let out = strata(&args, Some(dockerfile));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "must fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn example_plan_prunes_unused_stages() {
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/hello/Dockerfile")
            .exists()
    );
    let v = plan_json(&[
        "plan",
        "examples/hello",
        "--platform",
        "linux/amd64",
        "--format",
        "json",
    ]);
    let stages = v["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, vec!["tools", "build", "stage-3"]);
    assert!(!names.contains(&"docs"));
    let last = &stages[2];
    assert_eq!(last["index"], 3);
    assert_eq!(last["depends_on"], serde_json::json!([0, 1]));
    assert_eq!(last["base"], "docker.io/library/busybox:latest");
}

#[test]
fn multi_platform_plan_shares_build_platform_stage() {
    let v = plan_json(&[
        "plan",
        "examples/hello",
        "--platform",
        "linux/amd64,linux/arm64",
        "--format",
        "json",
    ]);
    let stages = v["stages"].as_array().expect("stages");
    let tools: Vec<&serde_json::Value> = stages.iter().filter(|s| s["name"] == "tools").collect();
    assert_eq!(tools.len(), 1, "the BUILDPLATFORM stage is built once");
    assert_eq!(
        tools[0]["targets"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    let builds: Vec<&str> = stages
        .iter()
        .filter(|s| s["name"] == "build")
        .map(|s| s["platform"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(builds, vec!["linux/amd64", "linux/arm64"]);
    assert_eq!(v["targets"].as_array().map(Vec::len), Some(2));
}

#[test]
fn target_and_build_args() {
    let v = plan_json(&[
        "plan",
        "examples/hello",
        "--target",
        "DOCS",
        "--build-arg",
        "BUSYBOX=127.0.0.1:5000/base/busybox:1",
        "--format",
        "json",
    ]);
    let stages = v["stages"].as_array().expect("stages");
    assert_eq!(stages.len(), 1);
    assert_eq!(stages[0]["name"], "docs");
    assert_eq!(stages[0]["base"], "127.0.0.1:5000/base/busybox:1");
}

#[test]
fn text_and_dot_formats() {
    let out = strata(&["plan", "examples/hello"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("critical path:"), "{text}");
    let out = strata(&["plan", "examples/hello", "--format", "dot"], None);
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph build {"), "{dot}");
    assert!(dot.contains("s0 -> s2;"), "{dot}");
}

#[test]
fn unknown_instruction_names_line_and_suggests() {
    let e = refused("FROM busybox\n\n\nRUN true\n\n\nRUNN make\n", &[]);
    assert!(
        e.contains("<stdin>:7: unknown instruction \"RUNN\" (did you mean RUN?)"),
        "{e}"
    );
    assert!(e.contains(" 7 | RUNN make"), "{e}");
}

#[test]
fn unknown_target_lists_stages() {
    let e = refused(
        "FROM busybox AS build\nFROM busybox AS test\n",
        &["--target", "nope"],
    );
    assert!(
        e.contains("target stage \"nope\" could not be found"),
        "{e}"
    );
    assert!(e.contains("stages: build, test"), "{e}");
}

#[test]
fn cycle_names_its_stages() {
    let e = refused(
        "FROM busybox AS a\nCOPY --from=b / /\nFROM busybox AS b\nCOPY --from=a / /\n",
        &[],
    );
    assert!(e.contains("circular dependency"), "{e}");
    assert!(e.contains("a -> b -> a"), "{e}");
}

#[test]
fn undefined_variable_in_from_is_named() {
    let e = refused("FROM ${BASE_IMAGE}\n", &[]);
    assert!(e.contains("$BASE_IMAGE is not defined"), "{e}");
    assert!(e.contains("<stdin>:1:"), "{e}");
}

#[test]
fn structural_errors_are_clear() {
    let e = refused("", &[]);
    assert!(e.contains("empty"), "{e}");
    let e = refused("# only a comment\n", &[]);
    assert!(e.contains("no instructions"), "{e}");
    let e = refused("ARG X=1\n", &[]);
    assert!(e.contains("no FROM"), "{e}");
    let e = refused("FROM busybox\nCOPY --chwon=1 a b\n", &[]);
    assert!(
        e.contains("unknown flag --chwon for COPY (did you mean --chown?)"),
        "{e}"
    );
    let e = refused("FROM busybox\nCMD [\"echo\", [\"nested\"]]\n", &[]);
    assert!(
        e.contains("arrays must be comprised of strings only"),
        "{e}"
    );
    let e = refused("FROM busybox\nRUN <<EOF\necho\n", &[]);
    assert!(e.contains("unterminated heredoc"), "{e}");
    let e = refused(
        "FROM busybox\nCOPY --from=later / /\nFROM busybox AS later\nFROM busybox\nCOPY --from=0 / /\n",
        &[],
    );
    assert!(e.contains("needs to be defined before"), "{e}");
    let e = refused("FROM busybox\n", &["--platform", "linux/"]);
    assert!(e.contains("invalid platform"), "{e}");
}

/// `strata plan --format json` of `tests/dockerfiles/farm-patterns` for one platform: the
/// stage names it keeps, and each stage's JSON by name.
fn farm_plan(platform: &str) -> (Vec<String>, serde_json::Value) {
    let v = plan_json(&[
        "plan",
        "tests/dockerfiles/farm-patterns",
        "--platform",
        platform,
        "--format",
        "json",
    ]);
    let names = v["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| format!("{} {}", s["name"].as_str().unwrap_or(""), s["platform"]))
        .collect();
    (names, v)
}

#[test]
fn real_world_patterns_select_stages_as_buildkit_does() {
    // linux/amd64: the platform ARGs computed into a stage name pick profiler-present, the
    // TARGETOS name picks shim-linux; unused stages are pruned.
    let (names, _) = farm_plan("linux/amd64");
    assert_eq!(
        names,
        [
            "profiler-src \"linux/amd64\"",
            "profiler-present \"linux/amd64\"",
            "profiler \"linux/amd64\"",
            "shim-linux \"linux/amd64\"",
            "shim \"linux/amd64\"",
            "amd64-tools \"linux/amd64\"",
            "stage-9 \"linux/amd64\"",
        ]
    );
    // linux/s390x: the pattern operators leave a platform string, ${X:+"missing"} turns it
    // into "missing" (so the profiler's sources are not needed); the amd64-pinned stage stays
    // amd64; the others are for s390x, which no worker here runs: marked, not refused.
    let (names, v) = farm_plan("linux/s390x");
    assert_eq!(
        names,
        [
            "profiler-missing \"linux/s390x\"",
            "profiler \"linux/s390x\"",
            "shim-linux \"linux/s390x\"",
            "shim \"linux/s390x\"",
            "amd64-tools \"linux/amd64\"",
            "stage-9 \"linux/s390x\"",
        ]
    );
    // A stage that runs no command (`FROM profiler-missing AS profiler`) goes to any worker.
    for stage in v["stages"].as_array().expect("stages") {
        if stage["platform"] == "linux/s390x" && stage["executes"] == true {
            assert_eq!(
                stage["unplaceable"], "no worker runs linux/s390x",
                "{stage}"
            );
        } else {
            assert_eq!(stage["worker"], "local", "{stage}");
        }
    }
}

#[test]
fn a_plan_for_a_platform_no_worker_runs_marks_it_and_succeeds() {
    let out = strata(
        &[
            "plan",
            "tests/dockerfiles/farm-patterns",
            "--platform",
            "windows/amd64",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        text.contains("shim-windows [5] windows/amd64")
            && text.contains("unplaceable: no worker runs windows/amd64"),
        "{text}"
    );
    assert!(text.contains("amd64-tools [7] linux/amd64"), "{text}");
    assert!(
        stderr.contains(
            "note: using the built-in Dockerfile frontend for docker/dockerfile-upstream:master"
        ),
        "{stderr}"
    );
}
