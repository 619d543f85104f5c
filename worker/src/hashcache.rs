//! A cache of file content hashes keyed by what the kernel says about the file: device, inode,
//! size, modification and change times (nanoseconds). Any write to a file changes its change
//! time, which no user can set, so an unchanged key means unchanged bytes and an unchanged
//! build context is not read again (BuildKit likewise re-hashes only the files whose metadata
//! changed). Files changed in the last seconds before hashing are not cached: a write in the
//! same clock tick could leave the times as they were ("racily clean" files, as git calls them).
//!
//! The cache is saved as a flat file (`version`, then fixed-size records) and loaded whole.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const VERSION: u32 = 1;
/// Files whose change time is this close to now are hashed but not remembered.
const RACY_NANOS: i128 = 2_000_000_000;
/// Past this many entries the cache starts over rather than grow without bound.
const MAX_ENTRIES: usize = 2_000_000;
const RECORD: usize = 8 * 6 + 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_ns: i64,
    ctime_ns: i128,
}

impl Key {
    fn of(meta: &Metadata) -> Key {
        Key {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// File hashes by file metadata, shared by every step of a worker.
#[derive(Debug, Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Key, [u8; 32]>,
    dirty: bool,
}

impl HashCache {
    /// An empty cache kept in memory only.
    pub fn in_memory() -> HashCache {
        HashCache::default()
    }

    /// Loads the cache saved at `path` (an unreadable or foreign file starts an empty cache).
    pub fn load(path: &Path) -> HashCache {
        let mut map = HashMap::new();
        if let Ok(bytes) = fs::read(path)
            && bytes.len() >= 4
            && bytes[..4] == VERSION.to_le_bytes()
        {
            for rec in bytes[4..].chunks_exact(RECORD) {
                let u = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&rec[i * 8..i * 8 + 8]);
                    u64::from_le_bytes(b)
                };
                let key = Key {
                    dev: u(0),
                    ino: u(1),
                    size: u(2),
                    mtime: u(3) as i64,
                    mtime_ns: u(4) as i64,
                    ctime_ns: i128::from(u(5) as i64),
                };
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&rec[48..80]);
                map.insert(key, hash);
            }
        }
        HashCache {
            path: Some(path.to_path_buf()),
            inner: Mutex::new(Inner { map, dirty: false }),
        }
    }

    /// The remembered hash of a file with this metadata.
    pub fn get(&self, meta: &Metadata) -> Option<blake3::Hash> {
        let inner = self.inner.lock().ok()?;
        inner
            .map
            .get(&Key::of(meta))
            .map(|h| blake3::Hash::from_bytes(*h))
    }

    /// Remembers a file's hash, unless the file changed too recently to be sure.
    pub fn put(&self, meta: &Metadata, hash: blake3::Hash) {
        let key = Key::of(meta);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now - key.ctime_ns < RACY_NANOS
            || now - (i128::from(key.mtime) * 1_000_000_000) < RACY_NANOS
        {
            return;
        }
        if let Ok(mut inner) = self.inner.lock() {
            if inner.map.len() >= MAX_ENTRIES {
                inner.map.clear();
            }
            inner.map.insert(key, *hash.as_bytes());
            inner.dirty = true;
        }
    }

    /// Writes the cache to its file if it changed (atomically: a temporary file renamed).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(());
        };
        if !inner.dirty {
            return Ok(());
        }
        let mut out = Vec::with_capacity(4 + inner.map.len() * RECORD);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for (k, h) in &inner.map {
            for v in [
                k.dev,
                k.ino,
                k.size,
                k.mtime as u64,
                k.mtime_ns as u64,
                k.ctime_ns as i64 as u64,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(h);
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        inner.dirty = false;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path) {
        let old = filetime::FileTime::from_unix_time(1_600_000_000, 0);
        filetime::set_file_mtime(path, old).unwrap();
    }

    #[test]
    fn a_changed_file_misses_and_the_cache_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"one").unwrap();
        age(&f);
        let cache = HashCache::load(&dir.path().join("cache"));
        let meta = fs::metadata(&f).unwrap();
        let h = blake3::hash(b"one");
        cache.put(&meta, h);
        // The change time is now: too recent to remember.
        assert_eq!(cache.get(&meta), None);

        // Remember it by pretending time has passed: insert directly.
        cache
            .inner
            .lock()
            .unwrap()
            .map
            .insert(Key::of(&meta), *h.as_bytes());
        cache.inner.lock().unwrap().dirty = true;
        assert_eq!(cache.get(&meta), Some(h));
        cache.save().unwrap();
        let again = HashCache::load(&dir.path().join("cache"));
        assert_eq!(again.get(&meta), Some(h));

        // Same size, same modification time forced back: the change time still tells.
        fs::write(&f, b"two").unwrap();
        age(&f);
        assert_eq!(again.get(&fs::metadata(&f).unwrap()), None);
    }

    #[test]
    fn a_foreign_file_gives_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        fs::write(&path, b"garbage that is not a cache").unwrap();
        assert!(HashCache::load(&path).is_empty());
    }
}
