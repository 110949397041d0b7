//! The container's disk: the bundle's root filesystem packed by rootfs-builder into an ext4
//! image with guest-init (agent layout), taken from the content-addressed cache when the
//! directory is unchanged, then copied (sparsely) into the container's state directory so the
//! container can write to its root without touching the shared cached image.
//!
//! Host directory binds ([`pack_bind`]) are packed the same way (plain layout, no guest-init):
//! a read-only bind uses the cached image itself (hard-linked into the state directory, so
//! pruning the cache cannot pull it away), a read-write bind gets a private copy. Either is a
//! copy of the directory taken at `create`: nothing the container writes reaches the host
//! directory. Directories above [`MAX_BIND_BYTES`] or [`MAX_BIND_ENTRIES`] are refused before
//! anything is built.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rootfs_builder::{build_image, BuildError, BuildOptions, Format, InputKind, Layout};
use thiserror::Error;

use crate::bundle::HostBind;
use crate::config::RuntimeConfig;
use crate::vm::Drive;

/// Largest host directory (sum of its regular files) a bind mount may carry into the VM.
pub const MAX_BIND_BYTES: u64 = 1 << 30;
/// Most entries (files, directories, links) in a bound host directory.
pub const MAX_BIND_ENTRIES: u64 = 100_000;

/// Packing failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// No guest-init binary is configured or found.
    #[error("no guest-init binary: set guest_init in the runtime config or KILN_GUEST_INIT")]
    NoGuestInit,
    /// A bound host directory is too big to copy into the VM, or cannot be read.
    #[error("bind mount of {source_dir} on {destination}: {problem}")]
    Bind {
        /// The host directory.
        source_dir: PathBuf,
        /// Its destination in the container.
        destination: String,
        /// What is wrong.
        problem: String,
    },
    /// The packed image could not be placed in the state directory.
    #[error("cannot place the disk image at {path}")]
    Place {
        /// The destination.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
    // The container's private copy dies with the container; no fsync on its creation path.
    opts.sync_output = false;
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

/// A host directory packed for a bind mount.
#[derive(Debug, Clone)]
pub struct PackedBind {
    /// The disk to attach.
    pub drive: Drive,
    /// True when the cache already had the image.
    pub cache_hit: bool,
    /// Bytes of regular files in the directory.
    pub content_bytes: u64,
    /// Time spent (size check, build or cache lookup, placing the image).
    pub elapsed: Duration,
}

/// Packs `bind.source` into `<dir>/<serial>.ext4` (see the module documentation).
pub fn pack_bind(
    cfg: &RuntimeConfig,
    bind: &HostBind,
    dir: &Path,
) -> Result<PackedBind, ImageError> {
    let started = Instant::now();
    let bind_err = |problem: String| ImageError::Bind {
        source_dir: bind.source.clone(),
        destination: bind.destination.clone(),
        problem,
    };
    let content_bytes =
        directory_size(&bind.source, MAX_BIND_BYTES, MAX_BIND_ENTRIES).map_err(bind_err)?;
    let out = dir.join(format!("{}.ext4", bind.serial));
    let mut opts = BuildOptions::new(&bind.source, None);
    opts.input_kind = InputKind::Dir;
    opts.format = Format::Ext4;
    opts.layout = Layout::Plain;
    opts.cache = Some(cfg.image_cache.clone());
    opts.sync_output = false;
    if !bind.read_only {
        opts.out = Some(out.clone());
    }
    let built = build_image(&opts).map_err(|source| ImageError::Build {
        rootfs: bind.source.clone(),
        source,
    })?;
    if bind.read_only {
        place_shared(&built.path, &out)?;
    }
    Ok(PackedBind {
        drive: Drive {
            path: out,
            read_only: bind.read_only,
            serial: bind.serial.clone(),
        },
        cache_hit: built.cache_hit,
        content_bytes,
        elapsed: started.elapsed(),
    })
}

/// Hard-links the (never modified) cached image to `out`, copying when they are on different
/// filesystems.
fn place_shared(cached: &Path, out: &Path) -> Result<(), ImageError> {
    let place_err = |source| ImageError::Place {
        path: out.to_path_buf(),
        source,
    };
    match std::fs::remove_file(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(place_err(e)),
    }
    match std::fs::hard_link(cached, out) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(cached, out).map(|_| ()).map_err(place_err)
        }
        Err(e) => Err(place_err(e)),
    }
}

/// Sum of the sizes of the regular files under `root` (symlinks not followed), failing with a
/// one-line reason above `max_bytes` or `max_entries`.
pub fn directory_size(root: &Path, max_bytes: u64, max_entries: u64) -> Result<u64, String> {
    let mut pending = vec![root.to_path_buf()];
    let (mut bytes, mut entries) = (0u64, 0u64);
    while let Some(dir) = pending.pop() {
        let list =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in list {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            entries += 1;
            if entries > max_entries {
                return Err(format!(
                    "more than {max_entries} files: too many to copy into the VM"
                ));
            }
            let meta = entry
                .metadata()
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                bytes = bytes.saturating_add(meta.len());
                if bytes > max_bytes {
                    return Err(format!(
                        "more than {} MiB of files: too big to copy into the VM",
                        max_bytes >> 20
                    ));
                }
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs a small directory for a ro bind twice (the second is a cache hit, hard-linked) and
    /// for a rw bind (a private copy). Needs mkfs.ext4 (e2fsprogs), as rootfs-builder does.
    #[test]
    fn pack_bind_links_ro_and_copies_rw() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), "hello\n").unwrap();
        let cfg = RuntimeConfig {
            image_cache: d.path().join("cache"),
            ..RuntimeConfig::default()
        };
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let bind = |read_only, serial: &str| HostBind {
            source: src.clone(),
            destination: "/data".into(),
            read_only,
            serial: serial.into(),
        };
        let first = pack_bind(&cfg, &bind(true, "kiln-bind-0"), &state).unwrap();
        assert!(!first.cache_hit);
        let again = pack_bind(&cfg, &bind(true, "kiln-bind-0"), &state).unwrap();
        assert!(again.cache_hit);
        eprintln!(
            "ro bind: built in {:?}, cache hit in {:?}",
            first.elapsed, again.elapsed
        );
        assert_eq!(again.drive.path, state.join("kiln-bind-0.ext4"));
        assert!(again.drive.read_only);
        let meta = std::fs::metadata(&again.drive.path).unwrap();
        assert_eq!(meta.nlink(), 2, "hard link of the cached image");
        assert_eq!(again.content_bytes, 6);
        let rw = pack_bind(&cfg, &bind(false, "kiln-bind-1"), &state).unwrap();
        eprintln!("rw bind (cache hit, private copy) in {:?}", rw.elapsed);
        assert!(rw.cache_hit && !rw.drive.read_only);
        let meta = std::fs::metadata(&rw.drive.path).unwrap();
        assert_eq!(meta.nlink(), 1, "a private copy");
        assert_ne!(
            meta.ino(),
            std::fs::metadata(&again.drive.path).unwrap().ino()
        );
    }

    #[test]
    fn directory_size_counts_and_limits() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        assert_eq!(directory_size(d.path(), 1 << 20, 100).unwrap(), 1024);
        let e = directory_size(d.path(), 1000, 100).unwrap_err();
        assert!(e.contains("too big to copy into the VM"), "{e}");
        let e = directory_size(d.path(), 1 << 20, 2).unwrap_err();
        assert!(e.contains("more than 2 files"), "{e}");
        assert!(directory_size(&d.path().join("missing"), 1, 1).is_err());
    }
}
