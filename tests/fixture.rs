//! The fixture end-to-end build tests share: a loopback registry serving the busybox images,
//! a state directory, a build context, and helpers that read what strata wrote.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use strata_testkit::{Registry, busybox_registry};

/// A registry, a state directory and a build context for one test.
pub struct Fixture {
    pub registry: Registry,
    pub state: tempfile::TempDir,
    pub ctx: tempfile::TempDir,
    pub out: tempfile::TempDir,
    /// Extra environment for `strata`.
    pub env: Vec<(String, String)>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with_registry(busybox_registry())
    }

    pub fn with_registry(registry: Registry) -> Fixture {
        Fixture {
            registry,
            state: tempfile::tempdir().expect("tempdir"),
            ctx: tempfile::tempdir().expect("tempdir"),
            out: tempfile::tempdir().expect("tempdir"),
            env: Vec::new(),
        }
    }

    /// The busybox image on the fixture registry.
    pub fn busybox(&self) -> String {
        format!("{}/library/busybox:latest", self.registry.addr())
    }

    /// Writes a context file (parents created); `{BUSYBOX}` is replaced by the image.
    pub fn write(&self, rel: &str, content: &str) {
        let path = self.ctx.path().join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, content.replace("{BUSYBOX}", &self.busybox())).expect("write");
    }

    pub fn out(&self, rel: &str) -> PathBuf {
        self.out.path().join(rel)
    }

    /// Runs `strata build --progress=plain CONTEXT ARGS...`.
    pub fn build(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("build");
        if !args.iter().any(|a| a.starts_with("--progress")) {
            cmd.arg("--progress=plain");
        }
        cmd.arg(self.ctx.path())
            .args(args)
            .env("STRATA_STATE_DIR", self.state.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.output().expect("strata runs")
    }

    /// A build that must succeed; returns its progress output.
    pub fn build_ok(&self, args: &[&str]) -> String {
        let out = self.build(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build failed:\n{stderr}");
        stderr
    }

    /// A build that must fail; returns its output.
    pub fn build_err(&self, args: &[&str]) -> String {
        let out = self.build(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "build must fail:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    }

    /// Builds to a local directory and returns it.
    pub fn build_local(&self, name: &str, args: &[&str]) -> (PathBuf, String) {
        let dir = self.out(name);
        let spec = format!("type=local,dest={}", dir.display());
        let mut all = vec!["--output", spec.as_str()];
        all.extend_from_slice(args);
        let log = self.build_ok(&all);
        (dir, log)
    }
}

pub fn tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of a plain progress log that end a step, by step title.
pub fn step_results(log: &str) -> Vec<(String, String)> {
    let mut titles = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in log.lines() {
        let Some((num, rest)) = line.split_once(' ') else {
            continue;
        };
        if !num.starts_with('#') {
            continue;
        }
        if rest.starts_with('[') {
            titles.insert(num.to_string(), rest.to_string());
        } else if rest == "CACHED" || rest.starts_with("DONE") || rest.starts_with("ERROR") {
            let title = titles.get(num).cloned().unwrap_or_default();
            let word = rest
                .split(' ')
                .next()
                .unwrap_or("")
                .trim_end_matches(':')
                .to_string();
            out.push((title, word));
        }
    }
    out
}

/// The image config of a single-platform OCI archive, as stored.
pub fn oci_config(archive: &Path) -> Value {
    let blob = |digest: &str| {
        let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        serde_json::from_slice::<Value>(&tar_member(archive, &name)).expect("JSON blob")
    };
    let index: Value =
        serde_json::from_slice(&tar_member(archive, "index.json")).expect("index.json");
    let manifest = blob(
        index["manifests"][0]["digest"]
            .as_str()
            .expect("manifest digest"),
    );
    blob(
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    )
}

pub fn tar_member(archive: &Path, name: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(name)
        .output()
        .expect("tar");
    assert!(out.status.success(), "{name} in {}", archive.display());
    out.stdout
}

pub fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// A JSON blob of an OCI archive.
pub fn oci_json(archive: &Path, digest: &str) -> Value {
    serde_json::from_slice(&tar_member(archive, &blob_name(digest))).expect("JSON blob")
}

/// The image index an OCI archive's `index.json` points at, and each platform's config.
pub fn oci_platform_configs(archive: &Path) -> (Value, Vec<(String, Value)>) {
    let layout: Value =
        serde_json::from_slice(&tar_member(archive, "index.json")).expect("index.json");
    let index = oci_json(
        archive,
        layout["manifests"][0]["digest"].as_str().expect("digest"),
    );
    let mut configs = Vec::new();
    for m in index["manifests"].as_array().expect("manifests") {
        let p = &m["platform"];
        let mut name = format!(
            "{}/{}",
            p["os"].as_str().unwrap_or(""),
            p["architecture"].as_str().unwrap_or("")
        );
        if let Some(v) = p["variant"].as_str() {
            name = format!("{name}/{v}");
        }
        let manifest = oci_json(archive, m["digest"].as_str().expect("digest"));
        configs.push((
            name,
            oci_json(
                archive,
                manifest["config"]["digest"].as_str().expect("config"),
            ),
        ));
    }
    (index, configs)
}

/// Panics with the way to enable it unless QEMU runs arm64 binaries here.
pub fn require_arm64_emulation() {
    let entry = Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64");
    let text = fs::read_to_string(entry).unwrap_or_default();
    assert!(
        text.lines().next() == Some("enabled") && text.contains("flags: ") && text.contains('F'),
        "arm64 emulation is not available: install qemu-user-static and binfmt-support, then \
         `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64` \
         (tests/run.sh does this)"
    );
}

/// Whether a process whose command line is exactly `cmdline` runs on this machine (the
/// containers' processes are visible from the host).
pub fn process_running(cmdline: &str) -> bool {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries.flatten().any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|raw| {
                        raw.split(|b| *b == 0)
                            .filter(|a| !a.is_empty())
                            .collect::<Vec<_>>()
                            .join(&b' ')
                            == cmdline.as_bytes()
                    })
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}
