//! Behaviours BuildKit's own Dockerfile integration tests check (`frontend/dockerfile/*_test.go`
//! in moby/buildkit), rewritten as strata builds on the busybox fixture: each test names the
//! BuildKit test it follows and asserts what BuildKit produces.

use crate::fixture::{Fixture, read};

/// `testCopyChown`/`testCopyFromStage`: a COPY from a stage without `--chown` keeps the owners
/// of what it copies.
#[test]
fn copy_from_a_stage_keeps_owners() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX} AS base\n\
         RUN mkdir -p /dir/subdir && touch /file /dir/subdir/nestedfile \\\n \
         && chown 100:200 /file && chown 101:201 /dir/subdir && chown 102:202 /dir/subdir/nestedfile\n\
         FROM {BUSYBOX}\n\
         RUN mkdir /existing && chown 7:8 /existing\n\
         COPY --from=base /file /file\n\
         COPY --from=base /dir /dir\n\
         COPY --from=base /dir /existing\n\
         COPY --from=base --chown=5:6 /file /chowned\n\
         COPY Dockerfile /from-context\n\
         RUN stat -c '%n %u:%g' /file /dir/subdir /dir/subdir/nestedfile /existing \\\n \
         /existing/subdir /chowned /from-context > /owners\n",
    );
    let (root, _) = f.build_local("rootfs", &[]);
    assert_eq!(
        read(&root.join("owners")),
        "/file 100:200\n/dir/subdir 101:201\n/dir/subdir/nestedfile 102:202\n\
         /existing 7:8\n/existing/subdir 101:201\n/chowned 5:6\n/from-context 0:0\n"
    );
}

/// `testUser` and the supplementary groups of CVE-2023-25173: every USER form runs with its
/// primary group among its groups, and root's memberships (`wheel`) when no USER is given.
/// `testNoNewPrivs`: steps may gain privileges through set-user-id programs (BuildKit sets
/// `oci.WithNewPrivileges`), so `NoNewPrivs` is 0.
#[test]
fn users_get_their_groups_and_may_gain_privileges() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\n\
         RUN echo 'daemon:x:1:1:daemon:/:/bin/false' >> /etc/passwd \
         && printf 'daemon:x:1:\\nwheel:x:10:root\\n' >> /etc/group\n\
         RUN mkdir -m 777 /out && id > /out/none && grep NoNewPrivs /proc/self/status > /out/nnp\n\
         USER 1234\n\
         RUN id > /out/1234\n\
         USER 1234:1234\n\
         RUN id > /out/1234-1234\n\
         USER daemon\n\
         RUN id > /out/daemon\n\
         USER root\n\
         RUN id > /out/root\n",
    );
    let (root, _) = f.build_local("rootfs", &[]);
    let out = |name: &str| read(&root.join("out").join(name));
    assert_eq!(
        out("none"),
        "uid=0(root) gid=0(root) groups=0(root),10(wheel)\n"
    );
    assert_eq!(
        out("root"),
        "uid=0(root) gid=0(root) groups=0(root),10(wheel)\n"
    );
    assert_eq!(out("1234"), "uid=1234 gid=0(root) groups=0(root)\n");
    assert_eq!(out("1234-1234"), "uid=1234 gid=1234 groups=1234\n");
    assert_eq!(
        out("daemon"),
        "uid=1(daemon) gid=1(daemon) groups=1(daemon)\n"
    );
    assert_eq!(out("nnp"), "NoNewPrivs:\t0\n");
}

/// `testCopyDuplicates`-style chains: steps that produce the same layer twice, adjacent or
/// apart, stack like any others, and the next step runs on them.
#[test]
fn identical_layers_may_repeat_in_a_chain() {
    let f = Fixture::new();
    f.write("a", "a\n");
    f.write("b", "b\n");
    f.write("c", "c\n");
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\n\
         COPY a a\n\
         COPY a a\n\
         RUN cat a > /adjacent\n\
         COPY a /a\n\
         COPY b /b\n\
         COPY a /a\n\
         COPY c /c\n\
         RUN cat /a /b /c > /apart\n",
    );
    let (root, _) = f.build_local("rootfs", &[]);
    assert_eq!(read(&root.join("adjacent")), "a\n");
    assert_eq!(read(&root.join("apart")), "a\nb\nc\n");
}

/// The cross-compilation pattern for any target (`testExportMultiPlatform` with platforms no
/// worker runs): the target-platform stages only copy, so no worker of their platform is
/// needed; the plan says they run no command.
#[test]
fn platforms_whose_stages_run_nothing_need_no_worker_of_theirs() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM --platform=$BUILDPLATFORM {BUSYBOX} AS build\n\
         ARG TARGETPLATFORM\n\
         RUN echo \"built for $TARGETPLATFORM\" > /out\n\
         FROM scratch\n\
         COPY --from=build /out /out\n",
    );
    let platforms = "linux/arm/v7,linux/arm/v6,darwin/ppc64le";
    let (root, log) = f.build_local("out", &["--platform", platforms]);
    for (dir, platform) in [
        ("linux_arm_v7", "linux/arm/v7"),
        ("linux_arm_v6", "linux/arm/v6"),
        ("darwin_ppc64le", "darwin/ppc64le"),
    ] {
        assert_eq!(
            read(&root.join(dir).join("out")),
            format!("built for {platform}\n"),
            "{log}"
        );
    }
    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["plan", "--platform", platforms])
        .arg(f.ctx.path())
        .output()
        .expect("strata plan runs");
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(
        text.contains("stage-1 [1] darwin/ppc64le")
            && text.contains("on local (runs no command: any platform)"),
        "{text}"
    );
    // A stage that runs a command still needs a worker of its platform.
    f.write("Dockerfile", "FROM scratch\nCOPY Dockerfile /\nRUN true\n");
    let err = f.build_err(&["--platform", "darwin/ppc64le"]);
    assert!(err.contains("no worker can build darwin/ppc64le"), "{err}");
}

/// `testCopyWildcards` / `testAddMultipleFiles`: one wildcard argument is one source, whatever
/// it matches, so a destination without a slash takes its matches as a directory.
#[test]
fn one_wildcard_argument_may_match_several_files() {
    let f = Fixture::new();
    f.write("foo.txt", "foo\n");
    f.write("bar.txt", "bar\n");
    f.write("one.md", "one\n");
    for (dir, file) in [("ta", "a"), ("tb", "b")] {
        f.write(&format!("{dir}/{file}"), &format!("{file}\n"));
        let status = std::process::Command::new("tar")
            .args(["-cf", &format!("{dir}.tar"), "-C", dir, file])
            .current_dir(f.ctx.path())
            .status()
            .expect("tar runs");
        assert!(status.success());
    }
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nCOPY *.txt /dest\nCOPY *.md /single\nADD *.tar /tars\n",
    );
    let (root, _) = f.build_local("rootfs", &[]);
    assert_eq!(read(&root.join("dest/foo.txt")), "foo\n");
    assert_eq!(read(&root.join("dest/bar.txt")), "bar\n");
    assert_eq!(read(&root.join("single")), "one\n");
    assert_eq!(read(&root.join("tars/a")), "a\n");
    assert_eq!(read(&root.join("tars/b")), "b\n");
}

/// `testDockerfileDockerignore...`: an ignore file named after the Dockerfile wins over the
/// context's `.dockerignore`; a context with a lowercase `dockerfile` is built from it.
#[test]
fn the_dockerfiles_own_ignore_file_wins_and_lowercase_dockerfile_is_found() {
    let f = Fixture::new();
    f.write("a.txt", "a\n");
    f.write("b.txt", "b\n");
    f.write(".dockerignore", "b.txt\n");
    f.write("Dockerfile.dockerignore", "a.txt\n");
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nCOPY . /ctx\nRUN ls /ctx | grep txt > /listed\n",
    );
    let (root, _) = f.build_local("rootfs", &[]);
    assert_eq!(read(&root.join("listed")), "b.txt\n");

    let g = Fixture::new();
    g.write("dockerfile", "FROM {BUSYBOX}\nRUN echo lower > /which\n");
    let (root, _) = g.build_local("rootfs", &[]);
    assert_eq!(read(&root.join("which")), "lower\n");
}

/// `testEmptyWorkdir` / `testScratchImage`: an image built from scratch has `/` as its working
/// directory. `testMountTypeVariable`-style: a mount's type may be a variable. The
/// suggestions BuildKit gives for a lowercase instruction and a mount type.
#[test]
fn scratch_has_a_working_directory_mount_types_expand_and_typos_get_suggestions() {
    let f = Fixture::new();
    f.write("file", "x\n");
    f.write("Dockerfile", "FROM scratch\nCOPY file /file\n");
    let oci = f.out("scratch.tar");
    f.build_ok(&["--output", &format!("type=oci,dest={}", oci.display())]);
    let config = crate::fixture::oci_config(&oci);
    assert_eq!(config["config"]["WorkingDir"], "/", "{config}");

    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nARG MNT_TYPE=tmpfs\n\
         RUN --mount=type=$MNT_TYPE,target=/scratch touch /scratch/x && grep -q ' /scratch tmpfs ' /proc/mounts\n",
    );
    f.build_ok(&[]);

    f.write("Dockerfile", "FROM {BUSYBOX}\nfoo bar\n");
    let err = f.build_err(&[]);
    assert!(
        err.contains("unknown instruction \"foo\" (did you mean from?)"),
        "{err}"
    );
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX}\nRUN --mount=type=tmp,target=/t true\n",
    );
    let err = f.build_err(&[]);
    assert!(
        err.contains("unsupported mount type \"tmp\" (did you mean tmpfs?)"),
        "{err}"
    );
}

/// `testProxyEnv` (proxy build arguments reach RUN undeclared and stay out of the image),
/// `testHostnameArg`-style (`BUILDKIT_SANDBOX_HOSTNAME` names RUN's host), and
/// `testOnBuildHeredoc` (a heredoc is part of its ONBUILD trigger).
#[test]
fn proxies_hostname_and_onbuild_heredocs() {
    let f = Fixture::new();
    f.write(
        "Dockerfile",
        "FROM {BUSYBOX} AS base\n\
         ONBUILD RUN <<EOF\n\
         echo from-trigger > /triggered\n\
         echo second line >> /triggered\n\
         EOF\n\
         FROM base\n\
         RUN env | grep -i _proxy | sort > /proxies && hostname > /hostname \\\n \
         && grep -c ' farm-host$' /etc/hosts > /hosts\n",
    );
    let oci = f.out("img.tar");
    let (root, _) = f.build_local(
        "rootfs",
        &[
            "--build-arg",
            "HTTP_PROXY=http://proxy.example:3128",
            "--build-arg",
            "no_proxy=localhost",
            "--build-arg",
            "BUILDKIT_SANDBOX_HOSTNAME=farm-host",
            "--output",
            &format!("type=oci,dest={}", oci.display()),
        ],
    );
    assert_eq!(
        read(&root.join("proxies")),
        "HTTP_PROXY=http://proxy.example:3128\nno_proxy=localhost\n"
    );
    assert_eq!(read(&root.join("hostname")), "farm-host\n");
    assert_eq!(read(&root.join("hosts")), "1\n");
    assert_eq!(read(&root.join("triggered")), "from-trigger\nsecond line\n");
    let config = crate::fixture::oci_config(&oci);
    let text = config.to_string();
    assert!(!text.contains("proxy.example"), "{text}");
}
