//! rootfs-builder: bootable block images for kiln from container images.
//!
//! Inputs: a root file system directory, a rootfs tarball (plain, gzip, zstd), an OCI image
//! layout directory, an `oci-archive` or a `docker-archive` tarball ([`InputKind`]). Layers are
//! verified (sha256 and size of every blob) and applied with whiteouts into a private staging
//! tree, which `mkfs.ext4 -d` or `mkfs.erofs` turns into an image ([`Format`]).
//!
//! Image layout ([`Layout::Agent`], the default for kiln): `/kiln/guest-init` (the agent, booted
//! with `init=/kiln/guest-init`), the container's files untouched under `/rootfs/`, and empty
//! `/proc /sys /dev /run /tmp` for the agent. [`Layout::Plain`] puts the container's files at
//! the image root (for booting with the image's own init).
//!
//! Finished images are kept in a content-addressed cache ([`BuildOptions::cache`]); building the
//! same input again returns the cached image. This crate never writes outside the output path,
//! its temporary siblings and the cache, and leaves no partial output on error.
//!
//! ```no_run
//! use rootfs_builder::{build_image, BuildOptions, InputKind, Layout};
//!
//! let mut opts = BuildOptions::new("/run/bundle/rootfs", Some("/run/kiln/ctr.ext4".into()));
//! opts.input_kind = InputKind::Dir;
//! opts.layout = Layout::Agent { guest_init: "/usr/lib/kiln/guest-init".into() };
//! let built = build_image(&opts)?;
//! println!("{} (cache hit: {})", built.path.display(), built.cache_hit);
//! # Ok::<(), rootfs_builder::BuildError>(())
//! ```
#![forbid(unsafe_code)]

mod bundle;
mod cache;
mod compress;
mod copy;
mod error;
mod fsops;
mod image;
mod layer;
mod mkfs;
mod pipeline;
pub mod progress;
mod source;

use std::path::PathBuf;
use std::sync::Arc;

pub use bundle::{build_bundle, BuiltBundle, BundleOptions};
pub use cache::{prune as prune_cache, PruneStats};
pub use error::BuildError;
pub use image::{ContainerConfig, ImageConfig};
pub use mkfs::{parse_size, Format};
pub use pipeline::build_image;
pub use progress::Progress;
pub use source::InputKind;

/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kiln/images";

/// Where the agent binary goes inside agent-layout images (`init=` on the kernel command line).
pub const GUEST_INIT_PATH: &str = "/kiln/guest-init";

/// Where the container's files go inside agent-layout images.
pub const CONTAINER_ROOT: &str = "/rootfs";

/// How the image is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `/kiln/guest-init` plus the container under `/rootfs/`; boot with
    /// `init=/kiln/guest-init`.
    Agent {
        /// The static guest-init binary to install.
        guest_init: PathBuf,
    },
    /// The container's files at the image root, nothing added.
    Plain,
}

/// What to build.
#[derive(Clone)]
pub struct BuildOptions {
    /// The input (directory, tarball, OCI layout, archive).
    pub from: PathBuf,
    /// Input kind, normally [`InputKind::Auto`].
    pub input_kind: InputKind,
    /// Where to write the image. `None` returns the image inside the cache (which the caller must
    /// treat as read-only); then `cache` is required.
    pub out: Option<PathBuf>,
    /// Image format.
    pub format: Format,
    /// Image size in bytes (ext4 only); `None` sizes from the content plus headroom.
    pub size: Option<u64>,
    /// Image layout.
    pub layout: Layout,
    /// EROFS compressor (`lz4`, `lz4hc`); `None` writes an uncompressed EROFS image.
    pub erofs_compression: Option<String>,
    /// Cache directory; `None` disables the cache.
    pub cache: Option<PathBuf>,
    /// Progress reporter; `None` uses `log`.
    pub progress: Option<Arc<dyn Progress>>,
    /// fsync the output copied from the cache before it is renamed into place (default). A
    /// caller whose copy is scratch space that a host crash makes worthless anyway (the runtime's
    /// per-container disk) turns it off: under host I/O load the fsync costs hundreds of ms.
    pub sync_output: bool,
}

impl BuildOptions {
    /// Options with defaults: auto-detected input, ext4, automatic size, plain layout, the
    /// default cache directory.
    pub fn new(from: impl Into<PathBuf>, out: Option<PathBuf>) -> Self {
        BuildOptions {
            from: from.into(),
            input_kind: InputKind::Auto,
            out,
            format: Format::Ext4,
            size: None,
            layout: Layout::Plain,
            erofs_compression: None,
            cache: Some(PathBuf::from(DEFAULT_CACHE_DIR)),
            progress: None,
            sync_output: true,
        }
    }
}

/// A finished image.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The image file (the output path, or the cache entry when no output was asked for).
    pub path: PathBuf,
    /// True when the image came from the cache.
    pub cache_hit: bool,
    /// The cache key (hex sha256), or `None` without a cache.
    pub key: Option<String>,
    /// Image file size in bytes (apparent size; the file is sparse).
    pub size: u64,
    /// The image configuration, for OCI and docker inputs built now (not on cache hits).
    pub config: Option<ImageConfig>,
}

#[cfg(test)]
mod tests;
