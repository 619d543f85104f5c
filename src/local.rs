//! `--output type=local,dest=DIR`: the image's files unpacked into a directory; one
//! subdirectory per platform (`linux_amd64/`) for a multi-platform build, as buildx does.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use strata_shared::job::StageOutput;
use strata_shared::platform::Platform;
use strata_shared::store::BlobStore;
use strata_worker::layer::{UnpackMode, unpack_layer};

pub async fn export(
    store: &BlobStore,
    images: &[(Platform, StageOutput)],
    dest: &Path,
    scratch: &Path,
) -> Result<()> {
    for (platform, out) in images {
        let dir = if images.len() > 1 {
            dest.join(format!(
                "{}_{}{}",
                platform.os,
                platform.architecture,
                variant_suffix(platform)
            ))
        } else {
            dest.to_path_buf()
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for layer in &out.layers {
            let tmp = scratch.join(format!("local-{}", layer.blake3));
            store.get_to_file(&layer.blake3, &tmp).await?;
            let (blob, target) = (tmp.clone(), dir.clone());
            let unpacked = tokio::task::spawn_blocking(move || {
                unpack_layer(&blob, &target, UnpackMode::Apply)
            })
            .await
            .map_err(|e| anyhow!("unpacking layer {}: {e}", layer.digest));
            let _ = std::fs::remove_file(&tmp);
            let diff_id = unpacked?.with_context(|| {
                format!("unpacking layer {} into {}", layer.digest, dir.display())
            })?;
            if layer.diff_id.as_deref().is_some_and(|d| d != diff_id) {
                return Err(anyhow!(
                    "layer {} unpacked to diff-id {diff_id}, the store says {}",
                    layer.digest,
                    layer.diff_id.as_deref().unwrap_or("")
                ));
            }
        }
    }
    Ok(())
}

fn variant_suffix(p: &Platform) -> String {
    if p.variant.is_empty() {
        String::new()
    } else {
        format!("_{}", p.variant)
    }
}
