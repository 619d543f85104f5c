//! What this machine builds for: its own platform natively (for amd64, the newest
//! microarchitecture level its CPU supports), and every platform a user-mode emulator is
//! registered for in `binfmt_misc` with the fix-binary flag (`F`), which makes the kernel open
//! the interpreter at registration so it works inside containers whose root filesystem does not
//! hold it. Debian's `qemu-user-static` with `binfmt-support` registers QEMU that way.

use std::fs;
use std::path::Path;

use strata_shared::platform::{Capabilities, Platform};

/// Where the kernel exposes binfmt_misc.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// Detects this machine's platforms. When binfmt_misc is not mounted and this process may mount
/// it, it is mounted first (it only exposes what the kernel already knows).
pub fn detect() -> Capabilities {
    let native = host_platform(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    let dir = Path::new(BINFMT_MISC);
    if !dir.join("status").exists() {
        let _ = nix::mount::mount(
            Some("binfmt_misc"),
            dir,
            Some("binfmt_misc"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let mut emulated = emulators(dir);
    emulated.retain(|p| !p.runs_on(&native));
    Capabilities {
        native: vec![native],
        emulated,
    }
}

/// The host's platform; for amd64 with the x86-64 level of its CPU (`v2`, `v3`, `v4`), read
/// from the `flags` line of `/proc/cpuinfo`.
pub fn host_platform(cpuinfo: &str) -> Platform {
    let host = Platform::host();
    if host.architecture != "amd64" {
        return host;
    }
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let has = |want: &[&str]| want.iter().all(|w| flags.contains(w));
    let v2 = has(&["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"]);
    let v3 = v2
        && has(&[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
        ]);
    let v4 = v3 && has(&["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]);
    let variant = if v4 {
        "v4"
    } else if v3 {
        "v3"
    } else if v2 {
        "v2"
    } else {
        ""
    };
    Platform::new(&host.os, "amd64", variant)
}

/// The platforms of the enabled binfmt_misc entries with the fix-binary flag.
pub fn emulators(dir: &Path) -> Vec<Platform> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Platform> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == "status" || name == "register" {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(p) = parse_entry(&text)
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The platform an enabled, fix-binary ELF entry runs, from its magic (the ELF class, byte
/// order and machine); `None` for anything else.
pub fn parse_entry(text: &str) -> Option<Platform> {
    let mut enabled = false;
    let mut flags = "";
    let mut magic = "";
    let mut offset = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "enabled" {
            enabled = true;
        } else if let Some(f) = line.strip_prefix("flags:") {
            flags = f.trim();
        } else if let Some(m) = line.strip_prefix("magic ") {
            magic = m.trim();
        } else if let Some(o) = line.strip_prefix("offset ") {
            offset = o.trim().parse::<usize>().ok();
        }
    }
    if !enabled || !flags.contains('F') || offset != Some(0) {
        return None;
    }
    let bytes: Vec<u8> = (0..magic.len() / 2)
        .map(|i| u8::from_str_radix(magic.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    let class64 = bytes[4] == 2;
    let little = bytes[5] == 1;
    let machine = if little {
        u16::from_le_bytes([bytes[18], bytes[19]])
    } else {
        u16::from_be_bytes([bytes[18], bytes[19]])
    };
    let arch = match (machine, class64, little) {
        (62, true, true) => "amd64",
        (3, false, true) => "386",
        (183, true, true) => "arm64",
        (40, false, true) => "arm",
        (21, true, true) => "ppc64le",
        (22, true, false) => "s390x",
        (243, true, true) => "riscv64",
        (8, false, false) => "mips",
        (8, false, true) => "mipsle",
        (8, true, true) => "mips64le",
        _ => return None,
    };
    Some(Platform::new("linux", arch, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n\
        magic 7f454c460201010000000000000000000200b700\n\
        mask ffffffffffffff00fffffffffffffffffeffffff\n";

    #[test]
    fn binfmt_entries_name_their_platform() {
        assert_eq!(parse_entry(AARCH64), Some("linux/arm64".parse().unwrap()));
        let s390x = "enabled\ninterpreter /usr/bin/qemu-s390x-static\nflags: F\noffset 0\n\
            magic 7f454c4602020100000000000000000000020016\nmask ff\n";
        assert_eq!(parse_entry(s390x), Some("linux/s390x".parse().unwrap()));
    }

    #[test]
    fn disabled_or_without_fix_binary_is_not_usable_in_containers() {
        assert_eq!(parse_entry(&AARCH64.replace("enabled", "disabled")), None);
        assert_eq!(parse_entry(&AARCH64.replace("flags: PF", "flags: P")), None);
        assert_eq!(
            parse_entry("enabled\nflags: F\noffset 0\nmagic 4d5a\n"),
            None
        );
    }

    #[test]
    fn amd64_level_from_cpu_flags() {
        if Platform::host().architecture != "amd64" {
            return;
        }
        let v3 = "flags\t\t: fpu cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma abm movbe xsave\n";
        assert_eq!(host_platform(v3).to_string(), "linux/amd64/v3");
        assert_eq!(
            host_platform("flags : fpu sse2\n").to_string(),
            "linux/amd64"
        );
    }

    #[test]
    fn this_machine_runs_its_own_platform() {
        let caps = detect();
        assert!(caps.native_for(&Platform::host()), "{caps}");
        assert!(!caps.emulated_for(&Platform::host()), "{caps}");
    }
}
