//! OCI platforms: `os/architecture[/variant]`, parsed and normalised the way containerd does
//! (`aarch64` is `arm64`, `arm64/v8` is `arm64`, `x86_64` is `amd64`, `arm` means `arm/v7`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A normalised platform.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// Empty when the architecture has no variant or it is the default one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: &str) -> Self {
        let (architecture, variant) = normalize_arch(architecture, variant);
        Platform {
            os: normalize_os(os),
            architecture,
            variant,
        }
    }

    /// The platform of the machine this runs on.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform::new("linux", arch, "")
    }
}

impl Platform {
    /// The platform a machine of this platform presents as the build platform
    /// (`BUILDPLATFORM`), as BuildKit does: an `amd64` microarchitecture level (`v2` to `v4`)
    /// is what the machine can run, not what it is called, so it is dropped; an `arm` variant
    /// stays.
    pub fn as_build_platform(&self) -> Platform {
        let mut p = self.clone();
        if p.architecture == "amd64" {
            p.variant.clear();
        }
        p
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

impl Platform {
    /// Whether a machine (or an emulator) of platform `machine` runs binaries of `self`, as
    /// containerd matches: the same OS and architecture, and for `amd64` and `arm` a variant
    /// no newer than the machine's (an `amd64/v3` machine runs `amd64`, `v2` and `v3`; an
    /// `arm/v7` one runs `v5` to `v7`). `arm64/v8` is `arm64`.
    pub fn runs_on(&self, machine: &Platform) -> bool {
        if self.os != machine.os || self.architecture != machine.architecture {
            return false;
        }
        if self.variant == machine.variant {
            return true;
        }
        let default = match self.architecture.as_str() {
            "amd64" => 1,
            "arm" => 7,
            _ => return false,
        };
        let level = |v: &str| -> Option<u32> {
            if v.is_empty() {
                Some(default)
            } else {
                v.strip_prefix('v')?.parse().ok()
            }
        };
        matches!((level(&self.variant), level(&machine.variant)), (Some(want), Some(have)) if want <= have)
    }
}

/// The platforms one worker builds for: natively, and through user-mode emulation (QEMU
/// registered with binfmt_misc).
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct Capabilities {
    pub native: Vec<Platform>,
    pub emulated: Vec<Platform>,
}

impl Capabilities {
    /// Whether `p` runs natively here.
    pub fn native_for(&self, p: &Platform) -> bool {
        self.native.iter().any(|m| p.runs_on(m))
    }

    /// Whether `p` runs here under emulation.
    pub fn emulated_for(&self, p: &Platform) -> bool {
        self.emulated.iter().any(|m| p.runs_on(m))
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ps: &[Platform]| {
            if ps.is_empty() {
                "none".to_string()
            } else {
                ps.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        write!(
            f,
            "native {}; emulated {}",
            list(&self.native),
            list(&self.emulated)
        )
    }
}

/// Whether a build may run stages under emulation (QEMU) when no worker runs their platform
/// natively.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Emulation {
    /// Emulation where no native worker is registered (the default).
    #[default]
    Allow,
    /// Native workers only.
    Deny,
}

impl FromStr for Emulation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Emulation::Allow),
            "deny" => Ok(Emulation::Deny),
            other => Err(format!("unknown emulation policy {other:?} (allow, deny)")),
        }
    }
}

impl fmt::Display for Emulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Emulation::Allow => "allow",
            Emulation::Deny => "deny",
        })
    }
}

impl Serialize for Emulation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Emulation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Why a platform string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {input:?}: {reason}")]
pub struct PlatformError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Platform {
    type Err = PlatformError;

    /// Accepts `os/arch[/variant]` and a bare known architecture (`arm64`, taken as Linux).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| PlatformError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let lower = s.trim().to_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(fail("empty component"));
        }
        if parts.iter().any(|p| {
            !p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        }) {
            return Err(fail("unexpected character"));
        }
        match parts.as_slice() {
            [one] => {
                if is_known_os(one) {
                    Ok(Platform::new(
                        one,
                        Platform::host().architecture.as_str(),
                        "",
                    ))
                } else if is_known_arch(one) {
                    Ok(Platform::new("linux", one, ""))
                } else {
                    Err(fail("unknown operating system or architecture"))
                }
            }
            [os, arch] => {
                if !is_known_os(os) {
                    return Err(fail("unknown operating system"));
                }
                Ok(Platform::new(os, arch, ""))
            }
            [os, arch, variant] => {
                if !is_known_os(os) {
                    return Err(fail("unknown operating system"));
                }
                Ok(Platform::new(os, arch, variant))
            }
            _ => Err(fail("expected os/arch[/variant]")),
        }
    }
}

fn is_known_os(s: &str) -> bool {
    matches!(
        s,
        "linux"
            | "windows"
            | "darwin"
            | "freebsd"
            | "netbsd"
            | "openbsd"
            | "solaris"
            | "illumos"
            | "android"
            | "ios"
            | "aix"
            | "dragonfly"
            | "plan9"
            | "js"
            | "wasip1"
    )
}

fn is_known_arch(s: &str) -> bool {
    matches!(
        s,
        "amd64"
            | "x86_64"
            | "x86-64"
            | "arm64"
            | "aarch64"
            | "arm"
            | "armhf"
            | "armel"
            | "386"
            | "i386"
            | "i686"
            | "ppc64le"
            | "s390x"
            | "riscv64"
            | "mips64le"
            | "loong64"
            | "wasm"
    )
}

fn normalize_os(os: &str) -> String {
    match os.to_lowercase().as_str() {
        "macos" => "darwin".into(),
        other => other.into(),
    }
}

fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let arch = arch.to_lowercase();
    let variant = variant.to_lowercase();
    let (a, v): (&str, &str) = match arch.as_str() {
        "i386" | "i686" => ("386", ""),
        "x86_64" | "x86-64" | "amd64" => ("amd64", if variant == "v1" { "" } else { &variant }),
        "aarch64" | "arm64" => (
            "arm64",
            if variant == "8" || variant == "v8" {
                ""
            } else {
                &variant
            },
        ),
        "armhf" => ("arm", "v7"),
        "armel" => ("arm", "v6"),
        "arm" => (
            "arm",
            match variant.as_str() {
                "" | "7" => "v7",
                "5" | "6" | "8" => return ("arm".into(), format!("v{variant}")),
                v => v,
            },
        ),
        other => (other, &variant),
    };
    (a.to_string(), v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_platform_drops_amd64_levels_but_not_arm_variants() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        assert_eq!(p("linux/amd64/v4").as_build_platform(), p("linux/amd64"));
        assert_eq!(p("linux/arm/v7").as_build_platform(), p("linux/arm/v7"));
        assert_eq!(p("linux/arm64").as_build_platform(), p("linux/arm64"));
    }

    #[test]
    fn variants_match_as_containerd_does() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        assert!(p("linux/amd64").runs_on(&p("linux/amd64/v3")));
        assert!(p("linux/amd64/v2").runs_on(&p("linux/amd64/v3")));
        assert!(!p("linux/amd64/v4").runs_on(&p("linux/amd64/v3")));
        assert!(!p("linux/amd64/v2").runs_on(&p("linux/amd64")));
        assert!(p("linux/arm64/v8").runs_on(&p("linux/arm64")));
        assert!(p("linux/arm/v6").runs_on(&p("linux/arm/v7")));
        assert!(!p("linux/arm64").runs_on(&p("linux/amd64/v3")));
        let caps = Capabilities {
            native: vec![p("linux/amd64/v3")],
            emulated: vec![p("linux/arm64")],
        };
        assert!(caps.native_for(&p("linux/amd64")) && !caps.native_for(&p("linux/arm64")));
        assert!(caps.emulated_for(&p("linux/arm64/v8")));
        assert_eq!(
            caps.to_string(),
            "native linux/amd64/v3; emulated linux/arm64"
        );
    }

    #[test]
    fn parse_and_normalise() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64");
        assert_eq!(
            "linux/aarch64".parse::<Platform>().unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            "linux/x86_64".parse::<Platform>().unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            "linux/arm".parse::<Platform>().unwrap().to_string(),
            "linux/arm/v7"
        );
        assert_eq!(
            "arm64".parse::<Platform>().unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!("linux/amd64/v3".parse::<Platform>().unwrap().variant, "v3");
        assert!("linux/".parse::<Platform>().is_err());
        assert!("plan10/amd64".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
    }
}
