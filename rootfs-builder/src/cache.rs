//! The content-addressed image cache.
//!
//! Layout under the cache directory: `images/<key>.<ext4|erofs>` (finished images, never
//! modified), `locks/<key>.lock` (flock held while a key is built) and `tmp/` (staging trees and
//! half-written images, cleaned for a key by the next builder holding its lock). A finished image
//! appears under its final name only through `rename`, so readers never see a partial file.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};

/// An open cache directory.
pub struct Cache {
    dir: PathBuf,
}

/// An exclusive lock on one key; released on drop.
pub struct KeyLock {
    _lock: Flock<File>,
}

impl Cache {
    /// Opens (creating if needed) the cache at `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in ["images", "locks", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| BuildError::io(&p, "create cache directory", e))?;
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the finished image for `key` lives.
    pub fn image_path(&self, key: &str, ext: &str) -> PathBuf {
        self.dir.join("images").join(format!("{key}.{ext}"))
    }

    /// Directory for temporary files.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Blocks until this process holds the build lock for `key`, then removes leftovers of
    /// earlier, interrupted builds of the same key.
    pub fn lock(&self, key: &str) -> Result<KeyLock> {
        let path = self.dir.join("locks").join(format!("{key}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| BuildError::io(&path, "open lock", e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| BuildError::io(&path, "flock", e.into()))?;
        if let Ok(entries) = fs::read_dir(self.tmp_dir()) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{key}."))
                {
                    let _ = crate::fsops::remove_any(&entry.path());
                }
            }
        }
        Ok(KeyLock { _lock: lock })
    }
}

/// What [`prune`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// Images removed.
    pub removed: usize,
    /// Bytes (allocated) freed.
    pub freed: u64,
    /// Images kept.
    pub kept: usize,
    /// Bytes (allocated) still used by the kept images.
    pub used: u64,
}

/// Records a use of a cached image (its mtime), so [`prune`] removes the least recently used.
pub fn touch(image: &Path) {
    if let Ok(f) = File::options().write(true).open(image) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Removes least recently used images (by mtime, which builds and cache hits update) until the
/// images use at most `max_bytes` of disk. An image whose key is being built (lock held) is
/// skipped; a process copying an image keeps reading it after the unlink.
pub fn prune(dir: &Path, max_bytes: u64) -> Result<PruneStats> {
    let images = dir.join("images");
    let mut entries = Vec::new();
    let listing = match fs::read_dir(&images) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PruneStats::default()),
        Err(e) => return Err(BuildError::io(&images, "read cache", e)),
    };
    for entry in listing {
        let entry = entry.map_err(|e| BuildError::io(&images, "read cache", e))?;
        let Ok(m) = entry.metadata() else { continue };
        if m.is_file() {
            entries.push((m.mtime(), m.blocks() * 512, entry.path()));
        }
    }
    entries.sort();
    let mut stats = PruneStats {
        kept: entries.len(),
        used: entries.iter().map(|e| e.1).sum(),
        ..PruneStats::default()
    };
    let cache = Cache {
        dir: dir.to_path_buf(),
    };
    for (_, bytes, path) in entries {
        if stats.used <= max_bytes {
            break;
        }
        let key = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lock_path = cache.dir.join("locks").join(format!("{key}.lock"));
        let Ok(file) = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
        else {
            continue;
        };
        let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        fs::remove_file(&path).map_err(|e| BuildError::io(&path, "remove", e))?;
        // The (empty) lock file stays: deleting it could let two builders lock different inodes.
        stats.removed += 1;
        stats.kept -= 1;
        stats.freed += bytes;
        stats.used -= bytes;
    }
    Ok(stats)
}

/// Incremental key builder: a sha256 over tagged fields.
pub struct KeyHasher(Sha256);

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyHasher {
    /// A hasher seeded with the builder version (a new version never reuses old images).
    pub fn new() -> Self {
        let mut h = Sha256::new();
        h.update(b"kiln-rootfs-builder\0");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(b"\0layout-v1\0");
        KeyHasher(h)
    }

    /// Adds a named field.
    pub fn field(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let value = value.as_ref();
        self.0.update(name.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
    }

    /// Adds the identity of a file by its metadata (path, device, inode, size, mtime, ctime):
    /// any rewrite of the file changes its ctime, so a changed input gets a new key.
    pub fn file_identity(&mut self, name: &str, path: &Path) -> io::Result<()> {
        let canonical = fs::canonicalize(path)?;
        let m = fs::metadata(&canonical)?;
        self.field(name, canonical.as_os_str().as_encoded_bytes());
        self.field("stat", stat_bytes(&m));
        Ok(())
    }

    /// Adds a directory tree by walking it: every path (sorted), its lstat metadata (mode,
    /// owner, size, inode, mtime, ctime, rdev) and symlink targets. File contents are not read.
    pub fn tree_identity(&mut self, root: &Path) -> io::Result<()> {
        let canonical = fs::canonicalize(root)?;
        self.field("tree", canonical.as_os_str().as_encoded_bytes());
        self.field("root", stat_bytes(&fs::metadata(&canonical)?));
        let mut stack = vec![canonical];
        while let Some(dir) = stack.pop() {
            let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<io::Result<_>>()?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let path = entry.path();
                let m = fs::symlink_metadata(&path)?;
                self.field("p", path.as_os_str().as_encoded_bytes());
                self.field("m", stat_bytes(&m));
                if m.file_type().is_symlink() {
                    self.field("l", fs::read_link(&path)?.as_os_str().as_encoded_bytes());
                } else if m.is_dir() {
                    stack.push(path);
                }
            }
        }
        Ok(())
    }

    /// The key (hex).
    pub fn finish(self) -> String {
        crate::image::hex(&self.0.finalize())
    }
}

fn stat_bytes(m: &fs::Metadata) -> Vec<u8> {
    let fields = [
        m.dev(),
        m.ino(),
        u64::from(m.mode()),
        u64::from(m.uid()),
        u64::from(m.gid()),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
        m.rdev(),
    ];
    fields.iter().flat_map(|f| f.to_le_bytes()).collect()
}
