//! Can the jail uid open the VM's files? Checked on the host before any namespace is entered,
//! so a kernel, rootfs or `--drive` the jail uid may not open is one line naming the host path
//! (inside the jail the open would fail on `/drives/0` and the like, which names nothing the
//! caller knows).
//!
//! host-vmm never chowns or copies the caller's files (a bind mount costs nothing); the caller
//! grants the access. The check reads the permission bits only: it is skipped for a file with a
//! POSIX ACL (the ACL decides) and for a rootless jail (the caller's own ids, supplementary
//! groups included, are what the kernel checks there).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{JailError, JailIds};

/// Whether permission bits `mode` of a file owned by `owner:group` let `uid:gid` (with no
/// supplementary groups and no capabilities, as in the jail) read it, and write it if `write`.
/// The kernel uses the first class that matches: owner, then group, then others.
pub fn mode_allows(mode: u32, owner: u32, group: u32, ids: JailIds, write: bool) -> bool {
    let class = if ids.uid == owner {
        (mode >> 6) & 0o7
    } else if ids.gid == group {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    let need = if write { 0o6 } else { 0o4 };
    class & need == need
}

/// Whether `path` carries a POSIX access ACL (then the bits alone do not decide).
fn has_acl(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated and live; a zero-sized query writes nothing.
    let n = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

/// Fails with [`JailError::NoAccess`] when the jail ids cannot open `path` (`what` is the
/// option naming it, e.g. `--drive`) for reading, and writing if `write`.
pub fn check(what: &'static str, path: &Path, write: bool, ids: JailIds) -> Result<(), JailError> {
    if ids.rootless {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|source| JailError::File {
        what,
        path: path.to_owned(),
        source,
    })?;
    if mode_allows(meta.mode(), meta.uid(), meta.gid(), ids, write) || has_acl(path) {
        return Ok(());
    }
    Err(JailError::NoAccess {
        what,
        path: path.to_owned(),
        access: if write {
            "readable and writable"
        } else {
            "readable"
        },
        uid: ids.uid,
        gid: ids.gid,
        owner: meta.uid(),
        group: meta.gid(),
        mode: meta.mode() & 0o7777,
    })
}
