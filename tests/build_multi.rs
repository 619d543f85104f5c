//! Multi-platform builds end to end: linux/amd64 natively and linux/arm64 under QEMU in one
//! run, one OCI index, placement refusals, and base images lacking a platform.

use std::fs;
use std::process::Command;

use crate::fixture::{Fixture, oci_platform_configs, read, require_arm64_emulation, tool};

const BOTH: &str = "linux/amd64,linux/arm64";

#[test]
fn cross_compile_stage_is_built_once_and_each_platform_gets_its_arguments() {
    require_arm64_emulation();
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        r#"FROM --platform=$BUILDPLATFORM {BUSYBOX} AS compiler
ARG BUILDPLATFORM
RUN echo "compiled on $(uname -m) for all" > /tool

FROM --platform=$BUILDPLATFORM {BUSYBOX} AS cross
ARG TARGETPLATFORM TARGETARCH BUILDPLATFORM TARGETOS
RUN echo "$BUILDPLATFORM -> $TARGETPLATFORM ($TARGETOS $TARGETARCH) on $(uname -m)" > /artifact

FROM {BUSYBOX}
ARG TARGETARCH
COPY --from=compiler /tool /tool
COPY --from=cross /artifact /artifact
RUN echo "$TARGETARCH $(uname -m)" > /runtime
"#,
    );
    let oci = f.out("multi.tar");
    let (dir, log) = f.build_local(
        "out",
        &[
            "--platform",
            BOTH,
            "--output",
            &format!("type=oci,dest={}", oci.display()),
        ],
    );
    // One compiler instance for both targets, one cross instance per target.
    let compiler_runs = log
        .lines()
        .filter(|l| l.contains("compiler 2/2] RUN"))
        .count();
    assert_eq!(compiler_runs, 1, "{log}");
    assert!(
        log.contains("[linux/amd64 compiler 2/2] RUN"),
        "progress names the platform:\n{log}"
    );
    assert!(log.contains("[linux/arm64 stage-2 4/4] RUN"), "{log}");
    assert_eq!(
        read(&dir.join("linux_amd64/tool")),
        "compiled on x86_64 for all\n"
    );
    assert_eq!(
        read(&dir.join("linux_arm64/tool")),
        "compiled on x86_64 for all\n"
    );
    assert_eq!(
        read(&dir.join("linux_amd64/artifact")),
        "linux/amd64 -> linux/amd64 (linux amd64) on x86_64\n"
    );
    assert_eq!(
        read(&dir.join("linux_arm64/artifact")),
        "linux/amd64 -> linux/arm64 (linux arm64) on x86_64\n"
    );
    assert_eq!(read(&dir.join("linux_amd64/runtime")), "amd64 x86_64\n");
    assert_eq!(
        read(&dir.join("linux_arm64/runtime")),
        "arm64 aarch64\n",
        "the final stage ran under QEMU"
    );

    // The arm64 image's binaries are aarch64 ELF files (e_machine 183).
    let busybox = fs::read(dir.join("linux_arm64/bin/busybox")).expect("busybox");
    assert_eq!(&busybox[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([busybox[18], busybox[19]]), 183);

    // One index with both platforms, each config naming its own.
    let (index, configs) = oci_platform_configs(&oci);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64/v8"]);
    assert_eq!(configs[1].1["architecture"], "arm64");
    let raw = tool(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &format!("oci-archive:{}", oci.display()),
    ]));
    assert!(raw.contains("\"variant\":\"v8\""), "{raw}");
    let copied = f.out("copied");
    tool(Command::new("skopeo").args([
        "copy",
        "--all",
        &format!("oci-archive:{}", oci.display()),
        &format!("oci:{}", copied.display()),
    ]));
}

#[test]
fn plan_shows_placement_and_denied_emulation_is_refused() {
    require_arm64_emulation();
    let f = Fixture::new();
    f.write("Dockerfile", "FROM {BUSYBOX}\nRUN uname -m > /m\n");
    let plan = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["plan", "--platform", BOTH])
        .arg(f.ctx.path())
        .output()
        .expect("strata plan");
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("linux/amd64  FROM") && text.contains("on local (native)"),
        "{text}"
    );
    assert!(
        text.contains("linux/arm64  FROM") && text.contains("on local (emulated)"),
        "{text}"
    );

    let err = f.build_err(&["--platform", BOTH, "--emulation=deny"]);
    assert!(
        err.contains("no worker runs linux/arm64 natively and emulation is denied (--emulation=deny); workers: local (native linux/amd64"),
        "{err}"
    );
    assert!(!err.contains("#1 "), "nothing ran:\n{err}");
    let err = f.build_err(&["--platform", "linux/riscv64"]);
    assert!(
        err.contains("no worker can build linux/riscv64; workers: local"),
        "{err}"
    );
}

#[test]
fn a_base_image_without_the_platform_names_what_it_has() {
    require_arm64_emulation();
    let f = Fixture::new();
    // An amd64-only copy of busybox.
    let amd64_only = format!("{}/library/busybox-amd64:1", f.registry.addr());
    tool(Command::new("skopeo").args([
        "copy",
        "--override-arch=amd64",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}", f.busybox()),
        &format!("docker://{amd64_only}"),
    ]));
    f.write("Dockerfile", &format!("FROM {amd64_only}\nRUN true\n"));
    let err = f.build_err(&["--platform", BOTH]);
    assert!(
        err.contains("Dockerfile:1:") && err.contains("busybox-amd64"),
        "{err}"
    );
    assert!(
        err.contains("linux/arm64") && err.contains("linux/amd64"),
        "names wanted and available:\n{err}"
    );
}

#[test]
fn a_two_platform_image_is_pushed_and_read_back() {
    require_arm64_emulation();
    let mut f = Fixture::new();
    // Reproducible configs: the same build makes the same image.
    f.env
        .push(("SOURCE_DATE_EPOCH".into(), "1700000000".into()));
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nARG TARGETARCH\nRUN echo \"$TARGETARCH $(uname -m)\" > /built-for\n",
    );
    let name = format!("{}/team/hello:1", f.registry.addr());
    let log = f.build_ok(&[
        "--platform",
        BOTH,
        "--output",
        &format!("type=image,name={name},push=true"),
    ]);
    assert!(log.contains(&format!("pushed {name}@sha256:")), "{log}");

    let raw = tool(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]));
    let index: serde_json::Value = serde_json::from_str(&raw).expect("index");
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or(""),
                m["platform"]["architecture"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let copied = f.out("copied");
    tool(Command::new("skopeo").args([
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}", copied.display()),
    ]));

    // A second push of the same build finds every blob in place.
    let again = f.build_ok(&[
        "--platform",
        BOTH,
        "--output",
        &format!("type=image,name={name},push=true"),
    ]);
    assert!(
        again.contains("(0 blobs uploaded, 6 already there"),
        "{again}"
    );
    let first_digest = log
        .split(&format!("{name}@"))
        .nth(1)
        .and_then(|s| s.split(' ').next());
    assert!(
        first_digest.is_some_and(|d| again.contains(d)),
        "same digest:\n{log}\n{again}"
    );

    // The pushed image is a base like any other: its arm64 half runs aarch64 binaries.
    f.write(
        "Dockerfile",
        &format!("FROM {name}\nRUN cat /built-for > /seen && uname -m >> /seen\n"),
    );
    let (dir, _) = f.build_local("child", &["--platform", "linux/arm64"]);
    assert_eq!(read(&dir.join("seen")), "arm64 aarch64\naarch64\n");
}
