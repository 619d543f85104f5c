//! The busybox OCI image layout, built from Debian's `busybox-static` packages.
//!
//! One gzip layer per platform holds `/bin/busybox`, a symlink in `/bin` for every applet the
//! amd64 binary lists, `/etc/passwd`, `/etc/group`, `/tmp` (1777), `/root` and `/home`. Every
//! timestamp is fixed, so two builds from the same packages give the same digests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};

use crate::{run_ok, run_tool, sha256_digest};

/// The `PATH` entry of the busybox image config's `Env`.
pub const BUSYBOX_ENV_PATH: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const FIXTURES: &str = "/var/tmp/strata-fixtures";
const LAYOUT_NAME: &str = "busybox-oci";
/// 2024-01-01T00:00:00Z, the mtime of every tar entry.
const EPOCH: u64 = 1_704_067_200;
const CREATED: &str = "2024-01-01T00:00:00Z";
const APT_HINT: &str = "apt-get install -y apt dpkg (this fixture needs a Debian machine)";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// An OCI image layout directory whose `index.json` names one image index (ref name `latest`)
/// of a linux/amd64 and a linux/arm64 (variant v8) busybox image, built from Debian's
/// `busybox-static` packages (`apt-get download busybox-static:amd64 busybox-static:arm64`;
/// when that fails the arm64 architecture is added to dpkg and `apt-get update` runs once).
/// Each image is a single gzip layer; its config has `Env` [`BUSYBOX_ENV_PATH`], `Cmd ["sh"]`,
/// the layer's diff_id, os and architecture.
///
/// Built once and cached under `/var/tmp/strata-fixtures/busybox-oci`, rebuilt when missing.
/// Safe to call from many threads and processes at once: a build happens in a private
/// directory that is renamed into place.
pub fn busybox_layout() -> PathBuf {
    static BUILDING: Mutex<()> = Mutex::new(());
    let dest = Path::new(FIXTURES).join(LAYOUT_NAME);
    if is_complete(&dest) {
        return dest;
    }
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if is_complete(&dest) {
        return dest;
    }
    fs::create_dir_all(FIXTURES).unwrap_or_else(|e| panic!("cannot create {FIXTURES}: {e}"));
    if dest.exists() {
        // Not made by us (ours appear complete, by rename): move it aside, then delete it.
        let trash = private_dir(".busybox-oci.broken.");
        let _ = fs::rename(&dest, trash.path().join("old"));
    }
    let work = private_dir(".busybox-oci.build.");
    let layout = build_layout(work.path());
    // A failed rename with a complete layout in place means another process finished first;
    // its layout is as good as ours.
    if let Err(e) = fs::rename(&layout, &dest)
        && !is_complete(&dest)
    {
        panic!(
            "cannot move {} to {}: {e}",
            layout.display(),
            dest.display()
        );
    }
    dest
}

/// Path of the blob `digest` (`sha256:<hex>`) inside an OCI layout.
pub fn layout_blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("not a digest: {digest:?}"));
    layout.join("blobs").join(algorithm).join(hex)
}

/// Bytes of the blob `digest` inside an OCI layout.
pub fn read_layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = layout_blob_path(layout, digest);
    fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn is_complete(dir: &Path) -> bool {
    dir.join("index.json").is_file() && dir.join("oci-layout").is_file()
}

fn private_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(FIXTURES)
        .unwrap_or_else(|e| panic!("cannot create a directory in {FIXTURES}: {e}"))
}

/// Builds the layout in `work/layout` and returns that path.
fn build_layout(work: &Path) -> PathBuf {
    let debs = work.join("debs");
    fs::create_dir_all(&debs).unwrap_or_else(|e| panic!("cannot create {}: {e}", debs.display()));
    download_debs(&debs);

    let mut roots = Vec::new();
    for arch in ["amd64", "arm64"] {
        let deb = find_deb(&debs, arch);
        let root = work.join(format!("root-{arch}"));
        run_ok(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
            APT_HINT,
        );
        let version = run_ok(
            Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"),
            APT_HINT,
        );
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        roots.push((arch, root, version));
    }

    // The applet list comes from the amd64 binary (run under binfmt/QEMU on other hosts).
    let amd64_busybox = work.join("root-amd64/bin/busybox");
    let list = run_ok(
        Command::new(&amd64_busybox).arg("--list"),
        "apt-get install -y qemu-user-static binfmt-support",
    );
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && *a != "." && *a != ".." && !a.contains('/'))
        .map(str::to_string)
        .collect();
    assert!(
        applets.iter().any(|a| a == "sh"),
        "{} --list printed no `sh` applet",
        amd64_busybox.display()
    );

    let layout = work.join("layout");
    fs::create_dir_all(layout.join("blobs/sha256"))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", layout.display()));
    let mut manifests = Vec::new();
    for (arch, root, version) in &roots {
        let binary_path = root.join("bin/busybox");
        let binary = fs::read(&binary_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", binary_path.display()));
        let tar = layer_tar(&binary, &applets);
        let diff_id = sha256_digest(&tar);
        let layer = write_blob(&layout, MEDIA_LAYER_GZIP, &gzip(&tar));

        let variant = if *arch == "arm64" { Some("v8") } else { None };
        let mut config = json!({
            "created": CREATED,
            "architecture": arch,
            "os": "linux",
            "config": { "Env": [BUSYBOX_ENV_PATH], "Cmd": ["sh"] },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{
                "created": CREATED,
                "created_by": format!("strata-testkit: Debian busybox-static {version} ({arch})"),
            }],
        });
        let mut platform = json!({ "architecture": arch, "os": "linux" });
        if let Some(v) = variant {
            config["variant"] = json!(v);
            platform["variant"] = json!(v);
        }
        let config = write_blob(&layout, MEDIA_CONFIG, &to_bytes(&config));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config,
            "layers": [layer],
        });
        let mut descriptor = write_blob(&layout, MEDIA_MANIFEST, &to_bytes(&manifest));
        descriptor["platform"] = platform;
        manifests.push(descriptor);
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests,
    });
    let mut index_descriptor = write_blob(&layout, MEDIA_INDEX, &to_bytes(&index));
    index_descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": "latest" });
    let top = json!({ "schemaVersion": 2, "manifests": [index_descriptor] });
    write_file(&layout.join("index.json"), &to_bytes(&top));
    write_file(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    layout
}

/// `apt-get download`s both packages into `dir`, preparing dpkg and apt once if needed.
fn download_debs(dir: &Path) {
    let download = || {
        run_tool(
            Command::new("apt-get")
                .args(["download", "busybox-static:amd64", "busybox-static:arm64"])
                .current_dir(dir),
            APT_HINT,
        )
    };
    let first = download();
    if first.status.success() {
        return;
    }
    let foreign = run_ok(
        Command::new("dpkg").arg("--print-foreign-architectures"),
        APT_HINT,
    );
    if !String::from_utf8_lossy(&foreign.stdout)
        .lines()
        .any(|l| l.trim() == "arm64")
    {
        run_ok(
            Command::new("dpkg").args(["--add-architecture", "arm64"]),
            APT_HINT,
        );
    }
    run_ok(Command::new("apt-get").arg("update"), APT_HINT);
    let second = download();
    if !second.status.success() {
        panic!(
            "apt-get download busybox-static:amd64 busybox-static:arm64 failed twice \
             (after dpkg --add-architecture arm64 and apt-get update):\n{}\n{}",
            String::from_utf8_lossy(&first.stderr),
            String::from_utf8_lossy(&second.stderr)
        );
    }
}

fn find_deb(dir: &Path, arch: &str) -> PathBuf {
    let suffix = format!("_{arch}.deb");
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("busybox-static_") && name.ends_with(&suffix) {
            return entry.path();
        }
    }
    panic!(
        "apt-get download left no busybox-static *{suffix} in {}",
        dir.display()
    )
}

/// The uncompressed layer: directories, the binary, applet symlinks, passwd and group.
fn layer_tar(busybox: &[u8], applets: &[String]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin/", 0o755),
        ("etc/", 0o755),
        ("home/", 0o755),
        ("root/", 0o700),
        ("tmp/", 0o1777),
    ] {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, dir, &[][..])
            .expect("append to an in-memory tar");
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    tar.append_data(&mut h, "bin/busybox", busybox)
        .expect("append to an in-memory tar");
    for applet in applets {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("append to an in-memory tar");
    }
    let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n";
    let group = "root:x:0:\nnobody:x:65534:\n";
    for (path, body) in [("etc/group", group), ("etc/passwd", passwd)] {
        let mut h = header(tar::EntryType::Regular, 0o644, body.len() as u64);
        tar.append_data(&mut h, path, body.as_bytes())
            .expect("append to an in-memory tar");
    }
    tar.into_inner().expect("finish an in-memory tar")
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(EPOCH);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("serialise JSON")
}

/// Stores `bytes` as a blob of `layout` and returns its descriptor.
fn write_blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Value {
    let digest = sha256_digest(bytes);
    write_file(&layout_blob_path(layout, &digest), bytes);
    json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() })
}

fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn blob_json(layout: &Path, digest: &str) -> Value {
        let bytes = read_layout_blob(layout, digest);
        assert_eq!(
            sha256_digest(&bytes),
            digest,
            "blob {digest} has other bytes"
        );
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The layout is an index of two platforms whose blobs all match their digests, whose
    /// diff_ids are the sha256 of the uncompressed layers, and whose layers hold what the
    /// fixture promises.
    #[test]
    fn busybox_layout_is_a_valid_two_platform_index() {
        let layout = busybox_layout();
        let top: Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let index_digest = top["manifests"][0]["digest"].as_str().unwrap();
        let index = blob_json(&layout, index_digest);
        assert_eq!(index["mediaType"], MEDIA_INDEX);
        let manifests = index["manifests"].as_array().unwrap();
        let platforms: Vec<String> = manifests
            .iter()
            .map(|m| {
                let p = &m["platform"];
                let mut s = format!(
                    "{}/{}",
                    p["os"].as_str().unwrap(),
                    p["architecture"].as_str().unwrap()
                );
                if let Some(v) = p["variant"].as_str() {
                    s.push('/');
                    s.push_str(v);
                }
                s
            })
            .collect();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8"]);

        for m in manifests {
            let manifest = blob_json(&layout, m["digest"].as_str().unwrap());
            let config = blob_json(&layout, manifest["config"]["digest"].as_str().unwrap());
            assert_eq!(config["architecture"], m["platform"]["architecture"]);
            assert_eq!(config["os"], "linux");
            assert_eq!(config["config"]["Cmd"], json!(["sh"]));
            assert_eq!(config["config"]["Env"], json!([BUSYBOX_ENV_PATH]));
            let layer = &manifest["layers"][0];
            let gz = read_layout_blob(&layout, layer["digest"].as_str().unwrap());
            assert_eq!(sha256_digest(&gz), layer["digest"]);
            assert_eq!(gz.len() as u64, layer["size"].as_u64().unwrap());
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut tar)
                .unwrap();
            assert_eq!(config["rootfs"]["diff_ids"], json!([sha256_digest(&tar)]));

            let mut entries = BTreeMap::new();
            for entry in tar::Archive::new(&tar[..]).entries().unwrap() {
                let entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let link = entry
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                entries.insert(path, (entry.header().mode().unwrap(), link));
            }
            assert_eq!(entries["tmp/"].0, 0o1777);
            assert_eq!(entries["root/"].0, 0o700);
            assert!(entries.contains_key("home/"));
            assert_eq!(entries["bin/busybox"].0, 0o755);
            assert_eq!(entries["bin/sh"].1.as_deref(), Some("busybox"));
            assert!(entries.contains_key("etc/passwd") && entries.contains_key("etc/group"));
            assert!(entries.len() > 100, "only {} entries", entries.len());
        }
    }
}
