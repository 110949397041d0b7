//! File-system primitives for the staging tree: path normalisation, symlink resolution confined
//! to the staging root, and creation of entries with their metadata (owner, mode, xattrs, times).
//!
//! Nothing here ever follows a symlink on the host side: every path handed to a system call has
//! been resolved component by component with `lstat`, and symlinks met on the way are resolved
//! against the staging root. A symlink whose target is absolute or climbs above the root is never
//! written through.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::stat::{utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// At most this many symlinks are followed while resolving one path (as Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// Normalises a path from a layer or archive: drops `.` and a leading `./`, refuses `..` and
/// absolute paths. Returns the path as a list of components (empty for the root itself).
pub fn normalize(raw: &Path) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for comp in raw.components() {
        match comp {
            Component::CurDir => {}
            Component::Normal(c) => out.push(c.to_os_string()),
            Component::ParentDir => return Err("path contains '..' (path traversal)".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute path (path traversal)".into())
            }
        }
    }
    Ok(out)
}

/// Joins components into a relative path.
pub fn join(parts: &[OsString]) -> PathBuf {
    parts.iter().collect()
}

/// What to do when a component of the path does not exist.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Create it, the last component included, as a directory (mode 0755, owned by root), as
    /// tar extractors do for parents that a layer does not list.
    Create,
    /// Report `NotFound`, except for a missing last component, which is returned as is.
    Fail,
}

/// Why a path could not be resolved inside the staging root.
#[derive(Debug)]
pub enum ResolveError {
    /// A component does not exist (only with [`Missing::Fail`]).
    NotFound(String),
    /// Traversal, escaping symlink, non-directory parent or an I/O error.
    Refused(String),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::NotFound(s) | ResolveError::Refused(s) => f.write_str(s),
        }
    }
}

impl From<String> for ResolveError {
    fn from(s: String) -> Self {
        ResolveError::Refused(s)
    }
}

impl From<&str> for ResolveError {
    fn from(s: &str) -> Self {
        ResolveError::Refused(s.to_string())
    }
}

/// Resolves `parts` (already normalised) inside `root`, following symlinks in every component
/// (including the last one when `follow_last`), confined to `root`. Returns the real path relative
/// to `root`, as components.
pub fn resolve(
    root: &Path,
    parts: &[OsString],
    follow_last: bool,
    missing: Missing,
) -> Result<Vec<OsString>, ResolveError> {
    let mut pending: VecDeque<(OsString, bool)> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), i + 1 == parts.len()))
        .collect();
    let mut real: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some((comp, is_last)) = pending.pop_front() {
        if comp == "." {
            continue;
        }
        if comp == ".." {
            if real.pop().is_none() {
                return Err("a symlink climbs above the root (path traversal)".into());
            }
            continue;
        }
        real.push(comp);
        if is_last && !follow_last {
            break;
        }
        let host = root.join(join(&real));
        let meta = match fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match missing {
                    Missing::Create => {
                        create_dir_default(&host)
                            .map_err(|e| format!("mkdir {}: {e}", show(&real)))?;
                        continue;
                    }
                    // A missing last component is the caller's business (it may create it).
                    Missing::Fail if is_last => break,
                    Missing::Fail => {
                        return Err(ResolveError::NotFound(format!(
                            "{} does not exist",
                            show(&real)
                        )))
                    }
                }
            }
            Err(e) => return Err(format!("lstat {}: {e}", show(&real)).into()),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err("too many levels of symbolic links".into());
            }
            let target =
                fs::read_link(&host).map_err(|e| format!("readlink {}: {e}", show(&real)))?;
            if target.is_absolute() {
                return Err(format!(
                    "refusing to write through {} -> {} (absolute symlink escapes the root)",
                    show(&real),
                    target.display()
                )
                .into());
            }
            let link_shown = show(&real);
            real.pop();
            let mut expanded: Vec<(OsString, bool)> = Vec::new();
            let comps: Vec<OsString> = target
                .components()
                .map(|c| match c {
                    Component::ParentDir => OsString::from(".."),
                    Component::CurDir => OsString::from("."),
                    other => other.as_os_str().to_os_string(),
                })
                .collect();
            let n = comps.len();
            for (i, c) in comps.into_iter().enumerate() {
                expanded.push((c, is_last && i + 1 == n));
            }
            let depth_before = real.len();
            // Check that the link target stays inside the root before following it.
            let mut probe = depth_before as isize;
            for (c, _) in &expanded {
                if c == ".." {
                    probe -= 1;
                    if probe < 0 {
                        return Err(format!(
                            "refusing to write through {} -> {} (symlink escapes the root)",
                            link_shown,
                            target.display()
                        )
                        .into());
                    }
                } else if c != "." {
                    probe += 1;
                }
            }
            for item in expanded.into_iter().rev() {
                pending.push_front(item);
            }
        } else if !meta.is_dir() && !is_last {
            return Err(format!("{} is not a directory", show(&real)).into());
        }
    }
    Ok(real)
}

fn show(parts: &[OsString]) -> String {
    format!("/{}", join(parts).display())
}

/// Creates a directory with mode 0755 (not subject to the umask).
pub fn create_dir_default(path: &Path) -> io::Result<()> {
    fs::create_dir(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

/// Removes whatever is at `path` (a directory recursively), without following symlinks.
/// A missing path is not an error.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Metadata applied to a created entry.
#[derive(Clone, Debug, Default)]
pub struct EntryMeta {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Extended attributes.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

static CHOWN_WARNED: AtomicBool = AtomicBool::new(false);
static XATTR_WARNED: AtomicBool = AtomicBool::new(false);

/// Applies owner, mode, xattrs and (unless it is a directory, whose times are set at the end)
/// the modification time. Symlinks get owner, xattrs and times but no mode.
pub fn apply_meta(
    path: &Path,
    meta: &EntryMeta,
    is_symlink: bool,
    set_time: bool,
) -> io::Result<()> {
    if let Err(e) = std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)) {
        if e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc_eperm()) {
            if !CHOWN_WARNED.swap(true, Ordering::Relaxed) {
                log::warn!("not running as root: file ownership is not preserved ({e})");
            }
        } else {
            return Err(e);
        }
    }
    if !is_symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode & 0o7777))?;
    }
    for (name, value) in &meta.xattrs {
        if let Err(e) = xattr::set(path, name, value) {
            if !XATTR_WARNED.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "{}: cannot set xattr {:?}: {e} (further xattr warnings suppressed)",
                    path.display(),
                    name
                );
            }
        }
    }
    if set_time {
        set_mtime(path, meta.mtime)?;
    }
    Ok(())
}

fn libc_eperm() -> i32 {
    nix::errno::Errno::EPERM as i32
}

/// Sets atime and mtime of `path` without following a final symlink.
pub fn set_mtime(path: &Path, (sec, nsec): (i64, i64)) -> io::Result<()> {
    let ts = TimeSpec::new(sec, nsec.clamp(0, 999_999_999));
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Kinds of special files.
#[derive(Clone, Copy, Debug)]
pub enum Special {
    /// Character device (major, minor).
    Char(u64, u64),
    /// Block device (major, minor).
    Block(u64, u64),
    /// Named pipe.
    Fifo,
}

/// Creates a device node or FIFO. Returns `Ok(false)` when a device node cannot be created
/// because we are not root (the caller warns and skips it).
pub fn make_special(path: &Path, kind: Special) -> io::Result<bool> {
    let (flag, dev) = match kind {
        Special::Char(ma, mi) => (SFlag::S_IFCHR, nix::sys::stat::makedev(ma, mi)),
        Special::Block(ma, mi) => (SFlag::S_IFBLK, nix::sys::stat::makedev(ma, mi)),
        Special::Fifo => (SFlag::S_IFIFO, 0),
    };
    match nix::sys::stat::mknod(path, flag, Mode::from_bits_truncate(0o600), dev) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EPERM) if !matches!(kind, Special::Fifo) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reads xattrs of `path` (not following symlinks). Unreadable attributes are skipped.
pub fn read_xattrs(path: &Path) -> Vec<(OsString, Vec<u8>)> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    names
        .filter_map(|n| match xattr::get(path, &n) {
            Ok(Some(v)) => Some((n, v)),
            _ => None,
        })
        .collect()
}

/// Metadata of an existing file as an [`EntryMeta`].
pub fn meta_of(path: &Path, m: &fs::Metadata) -> EntryMeta {
    EntryMeta {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode() & 0o7777,
        mtime: (m.mtime(), m.mtime_nsec()),
        xattrs: read_xattrs(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_traversal() {
        assert!(normalize(Path::new("../etc/passwd")).is_err());
        assert!(normalize(Path::new("a/../../b")).is_err());
        assert!(normalize(Path::new("/etc/passwd")).is_err());
        assert_eq!(
            normalize(Path::new("./a/./b/")).unwrap(),
            vec![OsString::from("a"), OsString::from("b")]
        );
        assert!(normalize(Path::new("./")).unwrap().is_empty());
    }

    #[test]
    fn resolve_follows_relative_links_inside_root() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", t.path().join("bin")).unwrap();
        let parts = normalize(Path::new("bin/sh")).unwrap();
        let real = resolve(t.path(), &parts, false, Missing::Fail).unwrap();
        assert_eq!(join(&real), PathBuf::from("usr/bin/sh"));
    }

    #[test]
    fn resolve_refuses_escaping_links() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        std::os::unix::fs::symlink("../..", t.path().join("d/up")).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("abs")).unwrap();
        let up = normalize(Path::new("d/up/x")).unwrap();
        let err = resolve(t.path(), &up, false, Missing::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("escapes the root"), "{err}");
        let abs = normalize(Path::new("abs/passwd")).unwrap();
        let err = resolve(t.path(), &abs, false, Missing::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute symlink"), "{err}");
    }
}
