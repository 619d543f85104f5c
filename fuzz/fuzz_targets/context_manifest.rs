//! Any bytes as a stored build-context manifest: decoding must refuse without panicking, and a
//! manifest it accepts keeps every entry inside the context: plain relative paths, each once,
//! each below a directory listed before it.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use strata_worker::context::{ContextManifest, EntryKind};

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = ContextManifest::decode(data) else {
        return;
    };
    let mut kinds: HashMap<&str, EntryKind> = HashMap::new();
    for e in &manifest.entries {
        assert!(!e.path.starts_with('/'), "{:?}", e.path);
        assert!(
            e.path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
            "{:?}",
            e.path
        );
        if let Some((parent, _)) = e.path.rsplit_once('/') {
            assert_eq!(kinds.get(parent), Some(&EntryKind::Dir), "{:?}", e.path);
        }
        assert!(kinds.insert(&e.path, e.kind).is_none(), "{:?}", e.path);
    }
});
