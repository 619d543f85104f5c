//! `strata build` end to end, as root: the real binary runs real containers with runc on
//! busybox images served by Debian's `docker-registry` on loopback, and other tools (skopeo,
//! umoci) read what it writes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use strata_testkit::Registry;

use crate::fixture::{
    Fixture, blob_name, oci_config, process_running, read, step_results, tar_member, tool,
};

#[test]
fn example_builds_and_other_tools_read_every_output() {
    let f = Fixture::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    for entry in fs::read_dir(&example).expect("example") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), f.ctx.path().join(entry.file_name())).expect("copy");
    }
    let oci = f.out("hello.oci.tar");
    let docker = f.out("hello.docker.tar");
    let local = f.out("rootfs");
    let bb = format!("BUSYBOX={}", f.busybox());
    let log = f.build_ok(&[
        "--build-arg",
        &bb,
        "-t",
        "hello:dev",
        "--output",
        &format!("type=oci,dest={}", oci.display()),
        "--output",
        &format!("type=docker,dest={}", docker.display()),
        "--output",
        &format!("type=local,dest={}", local.display()),
    ]);
    assert!(
        !log.contains("[docs"),
        "the unused stage must not run:\n{log}"
    );
    assert!(log.contains("[build 3/3] RUN <<EOF"), "{log}");

    // skopeo reads both archives.
    let inspect: Value = serde_json::from_str(&tool(
        Command::new("skopeo").args(["inspect", &format!("oci-archive:{}", oci.display())]),
    ))
    .expect("json");
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Labels"]["org.opencontainers.image.title"], "hello");
    assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(3));
    let config: Value = serde_json::from_str(&tool(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("docker-archive:{}", docker.display()),
    ])))
    .expect("json");
    assert_eq!(config["config"]["Cmd"][0], "/usr/local/bin/hello");
    assert!(
        config["config"]["Env"]
            .as_array()
            .expect("env")
            .contains(&Value::from("GREETING=hello from strata"))
    );
    let manifest = tar_member(&docker, "manifest.json");
    let manifest: Value = serde_json::from_slice(&manifest).expect("manifest.json");
    assert_eq!(manifest[0]["RepoTags"][0], "hello:dev");

    // umoci unpacks the OCI layout by its tag.
    let layout = f.out("layout");
    fs::create_dir_all(&layout).expect("mkdir");
    tool(
        Command::new("tar")
            .arg("-xf")
            .arg(&oci)
            .arg("-C")
            .arg(&layout),
    );
    let bundle = f.out("bundle");
    tool(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:dev", layout.display()))
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    assert_eq!(read(&rootfs.join("usr/local/bin/arch")).trim(), "amd64");
    assert_eq!(
        read(&rootfs.join("etc/generated.txt")).trim(),
        "generated on x86_64"
    );

    // The local output holds the same files, the hello script executable.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(local.join("usr/local/bin/hello"))
        .expect("hello")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(read(&local.join("usr/local/bin/arch")).trim(), "amd64");
    assert!(local.join("bin/busybox").exists());
}

#[test]
fn cache_reruns_exactly_the_steps_whose_inputs_changed() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nCOPY a.txt /a.txt\nRUN cat /a.txt > /a.copy\nCOPY b.txt /b.txt\nRUN cat /a.copy /b.txt > /both\n",
    );
    f.write("a.txt", "alpha\n");
    f.write("b.txt", "beta\n");
    let first = f.build_ok(&[]);
    assert!(
        step_results(&first).iter().all(|(_, r)| r == "DONE"),
        "{first}"
    );

    let second = f.build_ok(&[]);
    let results = step_results(&second);
    assert_eq!(results.len(), 5, "{second}");
    assert!(
        results.iter().all(|(_, r)| r == "CACHED"),
        "everything cached:\n{second}"
    );

    // A new modification time alone changes nothing: keys hash content, not mtimes.
    let b = f.ctx.path().join("b.txt");
    let later = filetime::FileTime::from_unix_time(2_000_000_000, 0);
    filetime::set_file_mtime(&b, later).expect("touch");
    let touched = f.build_ok(&[]);
    assert!(
        step_results(&touched).iter().all(|(_, r)| r == "CACHED"),
        "{touched}"
    );

    // New content in b.txt re-runs its COPY and the RUN after it, nothing before.
    f.write("b.txt", "gamma\n");
    let (dir, changed) = f.build_local("after-change", &[]);
    let results = step_results(&changed);
    let outcome: Vec<&str> = results.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        outcome,
        ["CACHED", "CACHED", "CACHED", "DONE", "DONE"],
        "{changed}"
    );
    assert_eq!(read(&dir.join("both")), "alpha\ngamma\n");

    let fresh = f.build_ok(&["--no-cache"]);
    let results = step_results(&fresh);
    assert!(
        results.iter().skip(1).all(|(_, r)| r == "DONE"),
        "--no-cache runs every step:\n{fresh}"
    );
}

#[test]
fn run_steps_get_their_environment_user_mounts_and_no_network() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        r#"FROM {BUSYBOX}
RUN echo 'app:x:1234:2345:app:/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:2345:' >> /etc/group
ARG VERSION=1.0
ENV MODE=release
WORKDIR /work
RUN echo "$MODE $VERSION $(pwd)" > /out-env
USER app
RUN id -u > /tmp/uid && id -g >> /tmp/uid
USER root
RUN cp /tmp/uid /out-uid
SHELL ["/bin/sh", "-c", "echo shell-form: \"$0\" > /out-shell"]
RUN ignored
SHELL ["/bin/sh", "-c"]
RUN ["/bin/sh", "-c", "echo exec form > /out-exec"]
RUN <<EOF
#!/bin/sh
echo "script $1" > /out-heredoc
EOF
RUN cat /proc/net/dev | awk 'NR>2 {print $1}' > /out-net
RUN --mount=type=secret,id=token cat /run/secrets/token | wc -c > /out-secret-len
RUN --mount=type=secret,id=token,env=TOKEN echo "$TOKEN" | md5sum | cut -c1-8 > /out-secret-env
RUN --mount=type=tmpfs,target=/scratch touch /scratch/x && mount | grep /scratch | cut -d' ' -f5 > /out-tmpfs
RUN --mount=type=bind,source=data,target=/data cat /data/input > /out-bind
RUN --mount=type=cache,id=shared,target=/cache echo run >> /cache/log && wc -l < /cache/log > /out-cache
"#,
    );
    f.write("data/input", "from the context\n");
    let secret = f.out("token");
    fs::write(&secret, "s3cr3t-value").expect("secret");
    let secret_arg = format!("id=token,src={}", secret.display());
    let (dir, log) = f.build_local(
        "rootfs",
        &["--secret", &secret_arg, "--build-arg", "VERSION=2.5"],
    );
    assert_eq!(read(&dir.join("out-env")), "release 2.5 /work\n");
    assert_eq!(read(&dir.join("out-uid")), "1234\n2345\n");
    assert_eq!(read(&dir.join("out-shell")), "shell-form: ignored\n");
    assert_eq!(read(&dir.join("out-exec")), "exec form\n");
    assert_eq!(read(&dir.join("out-heredoc")), "script \n");
    assert_eq!(
        read(&dir.join("out-net")).trim(),
        "lo:",
        "only loopback without --network=host"
    );
    assert_eq!(read(&dir.join("out-secret-len")).trim(), "12");
    // md5("s3cr3t-value\n")
    let expected = tool(Command::new("sh").args(["-c", "echo s3cr3t-value | md5sum | cut -c1-8"]));
    assert_eq!(read(&dir.join("out-secret-env")), expected);
    assert_eq!(read(&dir.join("out-tmpfs")).trim(), "tmpfs");
    assert_eq!(read(&dir.join("out-bind")), "from the context\n");
    assert_eq!(read(&dir.join("out-cache")).trim(), "1");
    assert!(
        !dir.join("run/secrets/token").exists(),
        "the secret is not in a layer"
    );
    assert!(
        !log.contains("s3cr3t-value"),
        "the secret is not in the log"
    );

    // The cache mount persists into the next build, even one that re-runs every step.
    let (again, _) = f.build_local("again", &["--secret", &secret_arg, "--no-cache"]);
    assert_eq!(read(&again.join("out-cache")).trim(), "2");
    // The secret's value is in no stored blob or record.
    let leaked = Command::new("grep")
        .args(["-rl", "s3cr3t-value"])
        .arg(f.state.path().join("store"))
        .output()
        .expect("grep");
    assert!(
        leaked.stdout.is_empty(),
        "secret found in {}",
        String::from_utf8_lossy(&leaked.stdout)
    );
}

#[test]
fn host_network_needs_to_be_allowed() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nRUN --network=host cat /proc/net/dev | awk 'NR>2 {print $1}' > /out-net\n",
    );
    let err = f.build_err(&[]);
    assert!(
        err.contains("Dockerfile:2: RUN --network=host needs"),
        "{err}"
    );
    assert!(err.contains("--allow network.host"), "{err}");
    let (dir, _) = f.build_local("rootfs", &["--allow", "network.host"]);
    let ifaces = read(&dir.join("out-net"));
    assert!(
        ifaces.lines().count() >= 1 && ifaces.contains("lo:"),
        "{ifaces}"
    );
}

#[test]
fn a_failing_run_names_its_line_command_exit_code_and_output() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nRUN echo fine\nRUN echo compiling; echo 'error: missing semicolon' >&2; exit 3\nRUN echo never\n",
    );
    let err = f.build_err(&[]);
    assert!(
        err.contains("error: Dockerfile:3: RUN echo compiling; echo 'error: missing semicolon' >&2; exit 3: exit code 3"),
        "{err}"
    );
    assert!(
        err.contains("error: missing semicolon"),
        "the last output lines are shown:\n{err}"
    );
    assert!(
        err.contains(" >>> RUN echo compiling") || err.contains("RUN echo compiling"),
        "{err}"
    );
    assert!(!err.contains("never"), "{err}");
}

#[test]
fn copy_and_add_follow_docker_semantics() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        r#"FROM {BUSYBOX} AS src
RUN mkdir -p /opt/tool && echo v1 > /opt/tool/version

FROM {BUSYBOX}
RUN echo 'app:x:1234:2345::/:/bin/sh' >> /etc/passwd && echo 'grp:x:2345:' >> /etc/group
COPY dir /dir-contents/
COPY *.md /docs/
COPY --chown=app:grp --chmod=640 dir/one.txt /owned
COPY --chmod=u+x,g-r dir/two.txt /symbolic
COPY --from=src /opt/tool /tool
COPY --link dir/one.txt /linked
COPY --exclude=*.log logs /logs/
COPY --parents ./nested/a/file.txt /parents/
ADD archive.tar /unpacked/
COPY archive.tar /kept.tar
COPY <<EOF /inline.txt
inline $((1+1))
EOF
RUN stat -c '%u:%g %a' /owned > /out-owned && stat -c '%a' /symbolic > /out-symbolic
"#,
    );
    f.write("dir/one.txt", "one\n");
    f.write("dir/two.txt", "two\n");
    f.write("README.md", "readme\n");
    f.write("NOTES.md", "notes\n");
    f.write("logs/keep.txt", "keep\n");
    f.write("logs/drop.log", "drop\n");
    f.write("nested/a/file.txt", "nested\n");
    f.write("ignored.md", "ignored\n");
    f.write(
        ".dockerignore",
        "ignored.md\nlogs/*\n!logs/keep.txt\n!logs/drop.log\n",
    );
    let tar_src = f.out("tarsrc");
    fs::create_dir_all(tar_src.join("inner")).expect("mkdir");
    fs::write(tar_src.join("inner/from-tar.txt"), "tarred\n").expect("write");
    tool(
        Command::new("tar")
            .arg("-cf")
            .arg(f.ctx.path().join("archive.tar"))
            .arg("-C")
            .arg(&tar_src)
            .arg("inner"),
    );
    let (dir, _) = f.build_local("rootfs", &[]);
    assert_eq!(read(&dir.join("dir-contents/one.txt")), "one\n");
    assert!(
        !dir.join("dir-contents/dir").exists(),
        "a directory copies its contents"
    );
    assert_eq!(read(&dir.join("docs/README.md")), "readme\n");
    assert_eq!(read(&dir.join("docs/NOTES.md")), "notes\n");
    assert!(
        !dir.join("docs/ignored.md").exists(),
        ".dockerignore applies"
    );
    assert_eq!(read(&dir.join("out-owned")).trim(), "1234:2345 640");
    assert_eq!(read(&dir.join("out-symbolic")).trim(), "704");
    assert_eq!(read(&dir.join("tool/version")), "v1\n");
    assert_eq!(read(&dir.join("linked")), "one\n");
    assert_eq!(read(&dir.join("logs/keep.txt")), "keep\n", "! re-includes");
    assert!(!dir.join("logs/drop.log").exists(), "--exclude applies");
    assert_eq!(read(&dir.join("parents/nested/a/file.txt")), "nested\n");
    assert_eq!(
        read(&dir.join("unpacked/inner/from-tar.txt")),
        "tarred\n",
        "ADD extracts tars"
    );
    assert!(dir.join("kept.tar").is_file(), "COPY does not extract");
    assert_eq!(read(&dir.join("inline.txt")), "inline $((1+1))\n");
}

#[test]
fn add_downloads_urls_and_checks_their_checksum() {
    let f = Fixture::new();
    // The registry serves blobs over plain HTTP: a real URL with a known sha256.
    let layout = strata_testkit::busybox_layout();
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("index")).expect("json");
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let blob_digest = {
        let idx: Value =
            serde_json::from_slice(&strata_testkit::read_layout_blob(&layout, &digest))
                .expect("json");
        let manifest = idx["manifests"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_string();
        let m: Value =
            serde_json::from_slice(&strata_testkit::read_layout_blob(&layout, &manifest))
                .expect("json");
        m["config"]["digest"]
            .as_str()
            .expect("config digest")
            .to_string()
    };
    let blob_url = format!(
        "{}/v2/library/busybox/blobs/{blob_digest}",
        f.registry.url()
    );
    f.write(
        "Dockerfile",
        &format!("FROM {{BUSYBOX}}\nADD --checksum={blob_digest} {blob_url} /config.json\nADD local.txt {blob_url} /both/\n"),
    );
    f.write("local.txt", "local\n");
    let (dir, _) = f.build_local("rootfs", &[]);
    let got = fs::read(dir.join("config.json")).expect("downloaded");
    assert_eq!(strata_testkit::sha256_digest(&got), blob_digest);
    assert_eq!(read(&dir.join("both/local.txt")), "local\n");
    assert!(
        dir.join("both").read_dir().expect("dir").count() == 2,
        "the URL lands beside the local file"
    );

    let wrong = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    f.write(
        "Dockerfile",
        &format!("FROM {{BUSYBOX}}\nADD --checksum={wrong} {blob_url} /x\n"),
    );
    let err = f.build_err(&[]);
    assert!(
        err.contains("Dockerfile:2:") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn paths_escaping_the_context_are_refused() {
    let f = Fixture::new();
    f.write("Dockerfile", "FROM {BUSYBOX}\nCOPY ../outside /x\n");
    let err = f.build_err(&[]);
    assert!(err.contains("Dockerfile:2:"), "{err}");
    std::os::unix::fs::symlink("/etc/passwd", f.ctx.path().join("link")).expect("symlink");
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nCOPY link/../../etc/shadow /x\nCOPY link /y\n",
    );
    let err = f.build_err(&[]);
    assert!(err.contains("Dockerfile:2:"), "{err}");
    // A symlink source is followed inside the context, as BuildKit does: `/etc/passwd` means
    // CONTEXT/etc/passwd, which does not exist.
    f.write("Dockerfile", "FROM {BUSYBOX}\nCOPY link /y\n");
    let err = f.build_err(&[]);
    assert!(
        err.contains("Dockerfile:2:") && err.contains("not found"),
        "{err}"
    );
    // A symlink inside a copied directory is copied as a symlink, never followed.
    fs::create_dir_all(f.ctx.path().join("d")).expect("mkdir");
    std::os::unix::fs::symlink("/etc/passwd", f.ctx.path().join("d/link")).expect("symlink");
    f.write("Dockerfile", "FROM {BUSYBOX}\nCOPY d /d\n");
    let (dir, _) = f.build_local("rootfs", &[]);
    assert_eq!(
        fs::read_link(dir.join("d/link")).expect("symlink kept"),
        PathBuf::from("/etc/passwd")
    );
}

#[test]
fn missing_stages_and_images_are_clear_errors() {
    let f = Fixture::new();
    f.write("Dockerfile", "FROM {BUSYBOX} AS base\nRUN true\n");
    let err = f.build_err(&["--target", "nope"]);
    assert!(
        err.contains("nope") && err.contains("base"),
        "lists the stages:\n{err}"
    );
    let missing = format!("{}/library/nothere:1", f.registry.addr());
    f.write(
        "Dockerfile",
        &format!("FROM {{BUSYBOX}}\nCOPY --from={missing} /x /x\n"),
    );
    let err = f.build_err(&[]);
    assert!(
        err.contains("Dockerfile:2:") && err.contains("nothere"),
        "{err}"
    );
}

#[test]
fn a_corrupt_blob_from_the_registry_fails_the_build() {
    let f = Fixture::new();
    // Corrupt every layer blob in the registry's own storage: it then serves wrong bytes.
    let blobs = f
        .registry
        .storage_dir()
        .join("docker/registry/v2/blobs/sha256");
    let mut corrupted = 0;
    for prefix in fs::read_dir(&blobs).expect("blobs") {
        for blob in fs::read_dir(prefix.expect("dir").path()).expect("blob dirs") {
            let data = blob.expect("blob").path().join("data");
            let bytes = fs::read(&data).expect("data");
            if bytes.starts_with(&[0x1f, 0x8b]) {
                let mut bad = bytes.clone();
                let mid = bad.len() / 2;
                bad[mid] ^= 0xff;
                fs::write(&data, bad).expect("corrupt");
                corrupted += 1;
            }
        }
    }
    assert!(corrupted >= 2, "the fixture has gzip layers");
    f.write("Dockerfile", "FROM {BUSYBOX}\nRUN true\n");
    let err = f.build_err(&[]);
    assert!(err.contains("Dockerfile:1:"), "{err}");
    assert!(err.contains("sha256:"), "names the digest:\n{err}");
    assert!(
        fs::read_dir(f.state.path().join("store/blobs")).is_err() || !has_layers(f.state.path()),
        "nothing corrupt stored"
    );
}

fn has_layers(state: &Path) -> bool {
    fs::read_dir(state.join("store/blobs/b3")).is_ok_and(|mut d| d.next().is_some())
}

#[test]
fn image_config_holds_every_metadata_instruction_and_onbuild_runs() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        r#"FROM {BUSYBOX}
ENV A=1 B="two words"
LABEL version="1.0" team=build
EXPOSE 80/tcp 53/udp
VOLUME ["/data"]
WORKDIR /srv
USER 1000:1000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s --retries=4 CMD wget -q -O- localhost || exit 1
SHELL ["/bin/sh", "-ec"]
ONBUILD RUN echo triggered > /tmp/onbuild.txt
ENTRYPOINT ["/bin/sh"]
CMD ["-c", "echo hi"]
"#,
    );
    let oci = f.out("base.tar");
    f.build_ok(&["--output", &format!("type=oci,dest={}", oci.display())]);
    let archive = format!("oci-archive:{}", oci.display());
    // Raw from the archive: `skopeo inspect --config` drops Docker's extensions (Healthcheck,
    // Shell, OnBuild).
    let config = oci_config(&oci);
    let c = &config["config"];
    let env: Vec<&str> = c["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        env.contains(&"A=1") && env.contains(&"B=two words"),
        "{env:?}"
    );
    assert_eq!(c["Labels"]["version"], "1.0");
    assert_eq!(c["Labels"]["team"], "build");
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"80/tcp": {}, "53/udp": {}})
    );
    assert_eq!(c["Volumes"], serde_json::json!({"/data": {}}));
    assert_eq!(c["WorkingDir"], "/srv");
    assert_eq!(c["User"], "1000:1000");
    assert_eq!(c["StopSignal"], "SIGTERM");
    assert_eq!(
        c["Healthcheck"],
        serde_json::json!({"Test": ["CMD-SHELL", "wget -q -O- localhost || exit 1"], "Interval": 5_000_000_000u64, "Timeout": 2_000_000_000u64, "Retries": 4})
    );
    assert_eq!(c["Shell"], serde_json::json!(["/bin/sh", "-ec"]));
    assert_eq!(
        c["OnBuild"],
        serde_json::json!(["RUN echo triggered > /tmp/onbuild.txt"])
    );
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh"]));
    assert_eq!(c["Cmd"], serde_json::json!(["-c", "echo hi"]));
    let history = config["history"].as_array().expect("history");
    let env_entry = history
        .iter()
        .find(|h| h["created_by"] == "ENV A=1 B=two words")
        .expect("ENV history");
    assert_eq!(env_entry["empty_layer"], true);
    assert_eq!(env_entry["comment"], "buildkit.dockerfile.v0");
    let with_layers = history.iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(
        with_layers,
        config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len)
    );

    // As a base image (pushed with skopeo), its ONBUILD trigger runs in the child build and the
    // child's image does not keep it.
    let base = format!("{}/team/onbuild-base:1", f.registry.addr());
    tool(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &archive,
        &format!("docker://{base}"),
    ]));
    f.write(
        "Dockerfile",
        &format!("FROM {base}\nRUN cat /tmp/onbuild.txt > /tmp/seen\n"),
    );
    let child = f.out("child.tar");
    let (dir, log) = f.build_local(
        "child",
        &["--output", &format!("type=oci,dest={}", child.display())],
    );
    assert_eq!(read(&dir.join("tmp/seen")), "triggered\n", "{log}");
    let config = oci_config(&child);
    assert!(config["config"]["OnBuild"].is_null(), "{config}");
    assert_eq!(
        config["config"]["Healthcheck"]["Retries"], 4,
        "the rest is inherited"
    );
}

#[test]
fn zstd_layers_on_request() {
    let f = Fixture::new();
    f.write("Dockerfile", "FROM {BUSYBOX}\nRUN echo zstd > /z\n");
    let oci = f.out("z.tar");
    f.build_ok(&[
        "-t",
        "z:latest",
        "--output",
        &format!("type=oci,dest={},compression=zstd", oci.display()),
    ]);
    let manifest: Value = serde_json::from_str(&tool(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &format!("oci-archive:{}", oci.display()),
    ])))
    .expect("json");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(
        layers.last().expect("layer")["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    // Debian's zstd decodes the new layer (umoci does not read zstd layers).
    let digest = layers.last().expect("layer")["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let blob = f.out("layer.tar.zst");
    fs::write(
        &blob,
        tar_member(
            &oci,
            &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
        ),
    )
    .expect("write");
    let listing = tool(
        Command::new("sh")
            .arg("-c")
            .arg(format!("zstd -dc {} | tar -t", blob.display())),
    );
    assert_eq!(listing.trim(), "z");
}

#[test]
fn independent_stages_run_at_once_and_progress_has_three_forms() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX} AS left\nRUN sleep 2 && echo left > /l\n\
         FROM {BUSYBOX} AS right\nRUN sleep 2 && echo right > /r\n\
         FROM {BUSYBOX} AS unused\nRUN echo unused\n\
         FROM {BUSYBOX}\nCOPY --from=left /l /l\nCOPY --from=right /r /r\n",
    );
    let out = f.build(&["--progress=rawjson"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let events: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let position = |kind: &str, text: &str| {
        events.iter().position(|e| {
            e["event"] == kind && e["text"].as_str().is_some_and(|t| t.contains(text))
        })
    };
    let started_left = position("started", "echo left").expect("left runs");
    let started_right = position("started", "echo right").expect("right runs");
    let first_done = events
        .iter()
        .position(|e| e["event"] == "done" && e["n"] == 2)
        .expect("a RUN finishes");
    assert!(
        started_left < first_done && started_right < first_done,
        "both RUNs overlap:\n{stderr}"
    );
    assert!(
        position("started", "unused").is_none(),
        "the unused stage never runs"
    );

    let tty = f.build(&["--progress=tty", "--no-cache"]);
    let text = String::from_utf8_lossy(&tty.stderr);
    assert!(tty.status.success(), "{text}");
    assert!(
        text.contains(" => [left 2/2] RUN sleep 2 && echo left > /l"),
        "{text}"
    );
    assert!(text.contains("\x1b["), "the live view redraws:\n{text}");

    let plain = f.build_ok(&[]);
    assert!(
        plain.contains("] RUN sleep 2 && echo right > /r\n"),
        "{plain}"
    );
    assert!(
        plain
            .lines()
            .any(|l| l.starts_with('#') && l.ends_with(" CACHED")),
        "{plain}"
    );
}

#[test]
fn both_snapshotters_record_deletions_links_and_modes() {
    for snapshotter in ["overlay", "copy"] {
        let mut f = Fixture::new();
        f.env
            .push(("STRATA_SNAPSHOTTER".into(), snapshotter.into()));
        f.write(
            "Dockerfile",
            "FROM {BUSYBOX}\n\
             RUN mkdir -p /etc/old && echo o > /etc/old/f\n\
             RUN rm /etc/passwd && rm -rf /etc/old && mkdir /etc/old && echo new > /etc/old/g \\\n\
               && ln -s /etc/old/g /link && ln /etc/old/g /hard && chmod 4750 /etc/old/g\n",
        );
        let oci = f.out("img.tar");
        let (dir, log) = f.build_local(
            "rootfs",
            &["--output", &format!("type=oci,dest={}", oci.display())],
        );
        assert!(
            !dir.join("etc/passwd").exists(),
            "{snapshotter}: deleted file stays deleted"
        );
        assert!(
            !dir.join("etc/old/f").exists(),
            "{snapshotter}: replaced dir hides the old entries\n{log}"
        );
        assert_eq!(read(&dir.join("etc/old/g")), "new\n");
        assert_eq!(
            fs::read_link(dir.join("link")).expect("symlink"),
            PathBuf::from("/etc/old/g")
        );
        use std::os::unix::fs::MetadataExt;
        let g = fs::metadata(dir.join("etc/old/g")).expect("g");
        let hard = fs::metadata(dir.join("hard")).expect("hard");
        assert_eq!(g.ino(), hard.ino(), "{snapshotter}: hard link kept");
        assert_eq!(g.mode() & 0o7777, 0o4750);
        // The last layer spells the deletion as a whiteout.
        let index: Value = serde_json::from_slice(&tar_member(&oci, "index.json")).expect("index");
        let manifest_digest = index["manifests"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_string();
        let manifest: Value =
            serde_json::from_slice(&tar_member(&oci, &blob_name(&manifest_digest)))
                .expect("manifest");
        let last = manifest["layers"]
            .as_array()
            .and_then(|l| l.last())
            .expect("layer");
        let blob = f.out("last.tar.gz");
        fs::write(
            &blob,
            tar_member(&oci, &blob_name(last["digest"].as_str().expect("digest"))),
        )
        .expect("write");
        let listing = tool(Command::new("tar").arg("-tzf").arg(&blob));
        assert!(
            listing.lines().any(|l| l == "etc/.wh.passwd"),
            "{snapshotter}:\n{listing}"
        );
    }
}

#[test]
fn base_images_by_digest_from_a_registry_with_basic_auth() {
    let registry = Registry::start_with_basic_auth("builder", "pa55word");
    registry.push_layout(&strata_testkit::busybox_layout(), "library/busybox:latest");
    let mut f = Fixture::with_registry(registry);
    let index: Value = serde_json::from_slice(
        &fs::read(strata_testkit::busybox_layout().join("index.json")).expect("index"),
    )
    .expect("json");
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    f.write(
        "Dockerfile",
        &format!(
            "FROM {}/library/busybox@{digest}\nRUN echo pulled > /p\n",
            f.registry.addr()
        ),
    );
    let err = f.build_err(&[]);
    assert!(
        err.contains("Dockerfile:1:") && err.contains("has no credentials for"),
        "no credentials:\n{err}"
    );

    // Credentials from a Docker config file, as `docker login` writes it.
    let config_dir = f.out("docker-config");
    fs::create_dir_all(&config_dir).expect("mkdir");
    let auth = tool(Command::new("sh").args(["-c", "printf builder:pa55word | base64"]));
    let config = serde_json::json!({"auths": {f.registry.addr(): {"auth": auth.trim()}}});
    fs::write(config_dir.join("config.json"), config.to_string()).expect("write");
    f.env
        .push(("DOCKER_CONFIG".into(), config_dir.display().to_string()));
    let (dir, _) = f.build_local("rootfs", &[]);
    assert_eq!(read(&dir.join("p")), "pulled\n");

    // Every layer is in the store under the blake3 of its bytes, with its sha256 beside it.
    let store = f.state.path().join("store");
    let mut layers = 0;
    for entry in fs::read_dir(store.join("blobs/b3")).expect("blobs/b3") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let bytes = fs::read(&path).expect("blob");
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), name);
        let meta: Value =
            serde_json::from_slice(&fs::read(store.join("meta/b3").join(&name)).expect("meta"))
                .expect("json");
        assert_eq!(meta["digest"], strata_testkit::sha256_digest(&bytes));
        layers += 1;
    }
    assert!(layers >= 2, "the base layer and the RUN layer are stored");
}

#[test]
fn an_interrupted_build_stops_its_containers_and_releases_its_mounts() {
    let f = Fixture::new();
    f.write("Dockerfile", "FROM {BUSYBOX}\nRUN sleep 293\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["build", "--progress=plain"])
        .arg(f.ctx.path())
        .env("STRATA_STATE_DIR", f.state.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strata build");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !process_running("sleep 293") {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().ok().flatten().is_none(),
            "the step never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("strata build ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("build interrupted: its running steps were stopped"),
        "{err}"
    );
    // The container was killed, not left behind, and no mount of the state is left.
    assert!(
        !process_running("sleep 293"),
        "the container outlived the build"
    );
    let state = f.state.path().to_string_lossy().into_owned();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    assert!(
        !mounts.lines().any(|l| l.contains(&state)),
        "mounts left under {state}:\n{mounts}"
    );
}

#[test]
fn real_world_patterns_build_and_mounts_without_a_target_land_in_the_workdir() {
    let f = Fixture::new();
    let dockerfile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dockerfiles/farm-patterns/Dockerfile");
    f.write("Dockerfile", &read(&dockerfile));
    let base = format!("BASE={}", f.busybox());
    let (root, log) = f.build_local("rootfs", &["--build-arg", &base]);
    assert!(
        log.contains(
            "using the built-in Dockerfile frontend for docker/dockerfile-upstream:master"
        ),
        "{log}"
    );
    assert!(!log.contains("never-used"), "{log}");
    // The bind mount without a target was the working directory: the step read the sources'
    // VERSION there, and its write went to the mount (rw), not into the image.
    assert_eq!(read(&root.join("profiler")), "v1.4\n");
    assert_eq!(read(&root.join("shim")), "linux\n");
    assert_eq!(read(&root.join("tools-arch")), "x86_64\n");

    // A build is not a plan: a platform no worker runs is refused before anything runs.
    let err = f.build_err(&["--build-arg", &base, "--platform", "windows/amd64"]);
    assert!(err.contains("no worker can build windows/amd64"), "{err}");
}
