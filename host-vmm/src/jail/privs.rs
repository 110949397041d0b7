//! Privileges of the jailed process: user namespace (rootless), inherited fds, rlimits,
//! `no_new_privs`, uid/gid and capabilities.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use super::{JailError, JailIds};

/// Open files allowed: 256 vsock connections (the muxer's cap), up to 32 vCPU fds, the VM's
/// eventfds, epoll and timer fds, stdio, with room to spare.
pub const NOFILE_LIMIT: u64 = 1024;

/// Resource limits applied in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE: the largest disk's size (rootfs or `--drive`), so every disk can be
    /// written to its end and no file can grow past that (`None`: no disk, unchanged).
    pub fsize: Option<u64>,
}

impl Limits {
    /// Limits for a VM with these disk images (rootfs and drives).
    pub fn for_disks<'a>(disks: impl IntoIterator<Item = &'a Path>) -> Result<Self, JailError> {
        let mut fsize: Option<u64> = None;
        for disk in disks {
            let size = image_size(disk).map_err(|e| JailError::Sys("disk image size", e))?;
            fsize = Some(fsize.map_or(size, |f| f.max(size)));
        }
        Ok(Self {
            nofile: NOFILE_LIMIT,
            fsize,
        })
    }
}

/// Size of a regular file or block device.
fn image_size(path: &Path) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::End(0))
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    JailError::sys(what)
}

fn last_err(what: &'static str) -> JailError {
    JailError::Sys(what, io::Error::last_os_error())
}

/// Rootless: a new user namespace where only the caller's own uid and gid are mapped (to
/// themselves), which gives the process the capabilities to build the jail inside it.
pub fn enter_user_namespace(ids: JailIds) -> Result<(), JailError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(sys(
        "unshare(CLONE_NEWUSER) (are unprivileged user namespaces enabled?)",
    ))?;
    let write = |file: &str, text: String| {
        std::fs::write(file, text)
            .map_err(|e| JailError::Sys("writing the user namespace id maps", e))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{0} {0} 1\n", ids.uid))?;
    write("/proc/self/gid_map", format!("{0} {0} 1\n", ids.gid))?;
    Ok(())
}

fn close_range(first: u32, last: u32) -> Result<(), JailError> {
    if first > last {
        return Ok(());
    }
    // SAFETY: close_range has no memory-safety preconditions; the callers own no fd in the
    // range (the jail runs before the VM opens anything).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r != 0 {
        return Err(last_err("close_range"));
    }
    Ok(())
}

/// Closes every fd above stderr (nothing else is open yet in the monitor).
pub fn close_inherited_fds() -> Result<(), JailError> {
    close_range(3, u32::MAX)
}

/// Closes every fd above stderr except `keep`, which is moved to fd 3 and returned.
pub fn close_inherited_fds_except(keep: OwnedFd) -> Result<OwnedFd, JailError> {
    let fd = keep.into_raw_fd();
    let kept = if fd == 3 {
        3
    } else {
        // SAFETY: duplicates our own fd onto 3 (closing whatever inherited fd was there);
        // the original is closed right after.
        let r = unsafe { libc::dup3(fd, 3, libc::O_CLOEXEC) };
        if r != 3 {
            return Err(last_err("dup3"));
        }
        // SAFETY: `fd` was ours (from `into_raw_fd`) and is no longer used.
        unsafe { libc::close(fd) };
        3
    };
    close_range(4, u32::MAX)?;
    // SAFETY: fd 3 is open and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(kept) })
}

/// Applies `limits`, and no core dumps (they would hold guest memory).
pub fn apply_limits(limits: &Limits) -> Result<(), JailError> {
    setrlimit(Resource::RLIMIT_NOFILE, limits.nofile, limits.nofile)
        .map_err(sys("setrlimit(NOFILE)"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("setrlimit(CORE)"))?;
    if let Some(size) = limits.fsize {
        // Writes past the limit then fail with EFBIG instead of killing the VMM.
        // SAFETY: SIG_IGN for SIGXFSZ; no handler code involved.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        setrlimit(Resource::RLIMIT_FSIZE, size, size).map_err(sys("setrlimit(FSIZE)"))?;
    }
    Ok(())
}

/// `capset(2)` header and data, version 3 (two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number any kernel defines today is 40; the loop stops at EINVAL.
const CAP_SCAN_LIMIT: libc::c_ulong = 64;

/// The calling thread's effective, permitted and inheritable sets (64 bits each).
pub fn current_caps() -> io::Result<(u64, u64, u64)> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array of the v3 layout, both live.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

/// Drops every capability: bounding set, ambient set, then (after the id change) effective,
/// permitted and inheritable.
fn drop_bounding_and_ambient() -> Result<(), JailError> {
    for cap in 0..CAP_SCAN_LIMIT {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            return Err(last_err("prctl(PR_CAPBSET_DROP)"));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(last_err("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
    }
    Ok(())
}

fn clear_capability_sets() -> Result<(), JailError> {
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array of the v3 layout, both live.
    let r = unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) };
    if r != 0 {
        return Err(last_err("capset"));
    }
    Ok(())
}

/// Everything after the mounts: fds (all closed but `keep`, returned as fd 3), limits,
/// `no_new_privs`, ids, capabilities.
pub fn confine(ids: JailIds, limits: &Limits, keep: OwnedFd) -> Result<OwnedFd, JailError> {
    let kept = close_inherited_fds_except(keep)?;
    apply_limits(limits)?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    drop_bounding_and_ambient()?;
    if !ids.rootless {
        setgroups(&[]).map_err(sys("setgroups([])"))?;
    }
    let (uid, gid) = (Uid::from_raw(ids.uid), Gid::from_raw(ids.gid));
    setresgid(gid, gid, gid).map_err(sys("setresgid"))?;
    setresuid(uid, uid, uid).map_err(sys("setresuid"))?;
    clear_capability_sets()?;
    Ok(kept)
}
