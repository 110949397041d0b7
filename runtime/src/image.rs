//! The container's disk: the bundle's root filesystem packed by rootfs-builder into an ext4
//! image with guest-init (agent layout), taken from the content-addressed cache when the
//! directory is unchanged, then copied (sparsely) into the container's state directory so the
//! container can write to its root without touching the shared cached image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rootfs_builder::{build_image, BuildError, BuildOptions, Format, InputKind, Layout};
use thiserror::Error;

use crate::config::RuntimeConfig;

/// Packing failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// No guest-init binary is configured or found.
    #[error("no guest-init binary: set guest_init in the runtime config or KILN_GUEST_INIT")]
    NoGuestInit,
    /// rootfs-builder failed.
    #[error("packing {rootfs} into a disk image failed")]
    Build {
        /// The root filesystem directory.
        rootfs: PathBuf,
        /// Why.
        #[source]
        source: BuildError,
    },
}

/// A packed disk.
#[derive(Debug, Clone)]
pub struct PackedImage {
    /// The container's private copy.
    pub path: PathBuf,
    /// True when the cache already had the image.
    pub cache_hit: bool,
    /// Time spent.
    pub elapsed: Duration,
}

/// Packs `rootfs` (or reuses the cached image) and writes the container's copy to `out`.
pub fn pack_rootfs(
    cfg: &RuntimeConfig,
    rootfs: &Path,
    out: &Path,
) -> Result<PackedImage, ImageError> {
    let started = Instant::now();
    let guest_init = cfg.guest_init.clone().ok_or(ImageError::NoGuestInit)?;
    let mut opts = BuildOptions::new(rootfs, Some(out.to_path_buf()));
    opts.input_kind = InputKind::Auto;
    opts.format = Format::Ext4;
    opts.layout = Layout::Agent { guest_init };
    opts.cache = Some(cfg.image_cache.clone());
    let built = build_image(&opts).map_err(|source| ImageError::Build {
        rootfs: rootfs.to_path_buf(),
        source,
    })?;
    Ok(PackedImage {
        path: built.path,
        cache_hit: built.cache_hit,
        elapsed: started.elapsed(),
    })
}
