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
