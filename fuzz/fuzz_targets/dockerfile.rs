//! Any bytes through the whole frontend: parse, type, resolve, plan for two platforms, and
//! print-then-reparse. Nothing may panic; a Dockerfile that parses must print to text that
//! parses to the same instructions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_shared::dag;
use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::dockerfile::{Dockerfile, parser};
use strata_shared::platform::Platform;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(ast) = parser::parse(&text) {
        let printed = ast.to_dockerfile();
        let again = parser::parse(&printed).expect("printed Dockerfile parses");
        assert_eq!(again.dump(), ast.dump(), "print/parse changed the tree:\n{printed}");
    }
    if let Ok(df) = Dockerfile::parse(&text) {
        let platforms: Vec<Platform> = ["linux/amd64", "linux/arm64"]
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        let _ = dag::plan(&df, &BuildOptions::default(), &platforms[0], &platforms);
    }
});
