//! Build-step cache keys, with BuildKit's semantics: a step's key is a hash of its parent's
//! key, the platform, and what the step does after expansion — for RUN the command, the
//! environment, user, working directory, network and mounts; for COPY and ADD the content of
//! the selected source files (path, mode, owner, size, link target, bytes; never mtimes) and
//! the destination and flags. Secrets never enter a key. Keys are blake3, hex.

use crate::platform::Platform;

/// Bumped whenever what goes into a key changes, so old cache entries stop matching.
pub const KEY_VERSION: &str = "strata-cache-v1";

/// Builds one key from labelled parts.
#[derive(Debug, Clone)]
pub struct KeyBuilder {
    hasher: blake3::Hasher,
}

impl KeyBuilder {
    /// Starts a key for a step of kind `op` on top of `parent` for `platform`.
    pub fn new(op: &str, parent: &str, platform: &Platform) -> Self {
        let mut k = KeyBuilder {
            hasher: blake3::Hasher::new(),
        };
        k.field("version", KEY_VERSION);
        k.field("op", op);
        k.field("parent", parent);
        k.field("platform", &platform.to_string());
        k
    }

    /// Adds a labelled value; lengths are included so that no two sequences of fields collide.
    pub fn field(&mut self, name: &str, value: &str) -> &mut Self {
        for part in [name.as_bytes(), value.as_bytes()] {
            self.hasher.update(&(part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// Adds a list of values under one label.
    pub fn list<S: AsRef<str>>(&mut self, name: &str, values: &[S]) -> &mut Self {
        self.field(name, &values.len().to_string());
        for v in values {
            self.field(name, v.as_ref());
        }
        self
    }

    pub fn finish(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }
}

/// The key of a base image: its platform-specific manifest digest.
pub fn image_key(manifest_digest: &str, platform: &Platform) -> String {
    KeyBuilder::new("image", "", platform)
        .field("manifest", manifest_digest)
        .finish()
}

/// The key of the empty filesystem.
pub fn scratch_key(platform: &Platform) -> String {
    KeyBuilder::new("scratch", "", platform).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_part() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let a = KeyBuilder::new("run", "parent", &p)
            .field("args", "make")
            .finish();
        let b = KeyBuilder::new("run", "parent", &p)
            .field("args", "make")
            .finish();
        assert_eq!(a, b);
        let c = KeyBuilder::new("run", "other", &p)
            .field("args", "make")
            .finish();
        let d = KeyBuilder::new("run", "parent", &"linux/arm64".parse().unwrap())
            .field("args", "make")
            .finish();
        let e = KeyBuilder::new("run", "parent", &p)
            .field("args", "make ")
            .finish();
        // Field boundaries are part of the key.
        let f = KeyBuilder::new("run", "parent", &p)
            .field("arg", "smake")
            .finish();
        for other in [c, d, e, f] {
            assert_ne!(a, other);
        }
        assert_ne!(scratch_key(&p), image_key("sha256:x", &p));
    }
}
