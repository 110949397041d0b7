//! `--jail DIR`: confines host-vmm before the VM is built (see `docs/threat-model.md` and the
//! "Jail" section of `docs/seccomp.md`).
//!
//! [`enter`] runs on the main thread before any other thread exists:
//! 1. checks the paths (the vsock socket must live inside DIR), makes DIR mode 0700 (owned by
//!    the jail uid, so other local users cannot reach the socket) and, when not root, creates a
//!    user namespace mapping only the caller's own uid/gid;
//! 2. `unshare(CLONE_NEWPID)` then forks once: the new PID namespace only applies to children,
//!    so the child is its PID 1 and runs the VM, while the parent stays outside as the
//!    *monitor* ([`monitor`]): it waits, forwards stop signals as SIGKILL (a namespace's PID 1
//!    ignores signals it has no handler for) and exits with the child's status, which the
//!    child writes to a pipe as it exits (so the caller does not also wait for the kernel to
//!    tear the namespaces down);
//! 3. the child enters new mount, IPC, UTS and network namespaces, builds its root from DIR
//!    ([`fs`]: kernel, image and `--drive`s bind-mounted, a private `/dev` holding only `kvm`),
//!    pivots into it and detaches the old root;
//! 4. then ([`privs`]) closes every inherited fd above stderr, sets rlimits (fds, file size =
//!    largest disk's size, no core dumps), `no_new_privs`, drops to the jail uid/gid with no
//!    supplementary groups, and clears every capability set.
//!
//! The VM configuration is rewritten to the paths inside the jail (`/kernel`, `/rootfs`,
//! `/drives/N`, the socket's path relative to DIR).

pub mod access;
pub mod fs;
pub mod monitor;
pub mod privs;
/// Whether the read end of the pipe whose write end is `fd` is closed (`POLLERR` on the write
/// end), without blocking.
fn reader_gone(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll on one live pollfd entry with a zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents & libc::POLLERR != 0
}

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::seccomp::SeccompMode;
use crate::vmm::VmConfig;

/// Where the kernel appears inside the jail.
pub const JAIL_KERNEL: &str = "/kernel";
/// Where the disk image appears inside the jail.
pub const JAIL_ROOTFS: &str = "/rootfs";
/// The directory holding the `--drive`s inside the jail: drive N is `/drives/N`.
pub const JAIL_DRIVES: &str = "/drives";
/// Names in DIR the jail itself uses.
const RESERVED: [&str; 5] = ["kernel", "rootfs", "drives", "dev", "sys"];

/// Where the `index`-th `--drive` appears inside the jail.
pub fn jail_drive_path(index: usize) -> PathBuf {
    Path::new(JAIL_DRIVES).join(index.to_string())
}

/// `--jail` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The directory that becomes the VMM's root (created if missing).
    pub dir: PathBuf,
    /// uid to run as (root only; default: stay at the caller's uid, without capabilities).
    pub uid: Option<u32>,
    /// gid to run as (root only; default: the caller's gid).
    pub gid: Option<u32>,
    /// Seccomp mode for the monitor process.
    pub seccomp: SeccompMode,
}

/// Errors setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// DIR cannot be created or used.
    #[error("--jail {}", path.display())]
    Dir {
        /// DIR.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The vsock socket must be created inside DIR to be reachable from the host.
    #[error("--vsock-uds {}: with --jail the socket must be inside {} (and not named {})", uds.display(), dir.display(), RESERVED.join("/"))]
    UdsOutside {
        /// The socket path given.
        uds: PathBuf,
        /// DIR.
        dir: PathBuf,
    },
    /// A VM file cannot be used (its metadata cannot be read, or it is not a regular file or
    /// block device).
    #[error("{what} {}", path.display())]
    File {
        /// The option naming it (`--kernel`, `--rootfs`, `--drive`).
        what: &'static str,
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The jail uid/gid would not be allowed to open a VM file.
    #[error("{what} {}: not {access} by the jail uid {uid} / gid {gid} (owner {owner}:{group}, mode {mode:04o})", path.display())]
    NoAccess {
        /// The option naming it (`--kernel`, `--rootfs`, `--drive`).
        what: &'static str,
        /// The host path.
        path: PathBuf,
        /// `readable` or `readable and writable`.
        access: &'static str,
        /// Jail uid.
        uid: u32,
        /// Jail gid.
        gid: u32,
        /// The file's owner.
        owner: u32,
        /// The file's group.
        group: u32,
        /// The file's permission bits.
        mode: u32,
    },
    /// Only root can switch to another uid/gid.
    #[error("--jail-uid/--jail-gid need root; without root the jail keeps the caller's ids")]
    IdsNeedRoot,
    /// A system call of the set-up failed.
    #[error("jail: {0}")]
    Sys(&'static str, #[source] io::Error),
}

impl JailError {
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
        move |e| JailError::Sys(what, io::Error::from(e))
    }
}

/// What [`enter`] returns in each process.
#[derive(Debug, PartialEq, Eq)]
pub enum Entered {
    /// This is the monitor; the jailed VMM ended and this is the status to exit with.
    Monitor(u8),
    /// This is the jailed process: build and run the VM (with the rewritten configuration).
    Jailed,
}

/// The ids the jailed process ends up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    /// Target uid.
    pub uid: u32,
    /// Target gid.
    pub gid: u32,
    /// Not root: a user namespace maps only the caller's ids.
    pub rootless: bool,
}

/// Resolves the target ids for a caller with effective ids `euid`/`egid`.
pub fn resolve_ids(cfg: &JailConfig, euid: u32, egid: u32) -> Result<JailIds, JailError> {
    let rootless = euid != 0;
    if rootless && (cfg.uid.is_some_and(|u| u != euid) || cfg.gid.is_some_and(|g| g != egid)) {
        return Err(JailError::IdsNeedRoot);
    }
    Ok(JailIds {
        uid: cfg.uid.unwrap_or(euid),
        gid: cfg.gid.unwrap_or(egid),
        rootless,
    })
}

/// The socket's path inside the jail: `uds` relative to `dir` (both already absolute and
/// free of symlinks in their directory part), or `None` when it is not strictly inside.
pub fn path_inside(dir: &Path, uds: &Path) -> Option<PathBuf> {
    let rel = uds.strip_prefix(dir).ok()?;
    let mut parts = rel.components();
    let first = match parts.next()? {
        Component::Normal(c) => c,
        _ => return None,
    };
    if RESERVED.iter().any(|r| first == *r)
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return None;
    }
    Some(Path::new("/").join(rel))
}

/// Absolute, symlink-free form of a socket path whose file does not exist yet.
fn resolve_uds(uds: &Path) -> io::Result<PathBuf> {
    let name = uds
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = match uds.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.canonicalize()?.join(name))
}

/// Enters the jail described by `cfg` and rewrites `vm`'s paths for it. Must be called while
/// the process has a single thread. Returns [`Entered::Monitor`] in the outer process once the
/// VMM has exited, [`Entered::Jailed`] in the jailed one.
pub fn enter(cfg: &JailConfig, vm: &mut VmConfig) -> Result<Entered, JailError> {
    let started = std::time::Instant::now();
    let dir_err = |source| JailError::Dir {
        path: cfg.dir.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.dir).map_err(dir_err)?;
    let dir = cfg.dir.canonicalize().map_err(dir_err)?;
    // Only the jail uid (and root) may reach the vsock socket inside.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
    let uds_inside = match &vm.vsock {
        Some(v) => {
            let outside = || JailError::UdsOutside {
                uds: v.uds.clone(),
                dir: dir.clone(),
            };
            let abs = resolve_uds(&v.uds).map_err(|_| outside())?;
            Some(path_inside(&dir, &abs).ok_or_else(outside)?)
        }
        None => None,
    };
    let ids = resolve_ids(
        cfg,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )?;
    let plan = fs::RootPlan::new(&dir, vm, ids)?;
    let limits = privs::Limits::for_disks(plan.disks())?;

    if ids.rootless {
        privs::enter_user_namespace(ids)?;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(JailError::sys("unshare(CLONE_NEWPID)"))?;
    let (status_read, status_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(JailError::sys("pipe2 (exit status pipe)"))?;
    // SAFETY: the process is single-threaded here (the caller's contract), so the child may
    // run arbitrary code after the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Sys("fork", io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(status_write);
        return Ok(Entered::Monitor(monitor::run(
            pid,
            cfg.seccomp,
            status_read,
        )));
    }
    drop(status_read);
    // The jailed child, PID 1 of the new namespace: die with the monitor.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(JailError::sys("prctl(PR_SET_PDEATHSIG)"))?;
    plan.enter()?;
    let status_fd = privs::confine(ids, &limits, status_write)?;
    // The uid/gid change in `confine` clears the parent-death signal: set it again, then make
    // sure the monitor did not die before that (a SIGKILLed monitor would otherwise leave the
    // jailed VM running, reparented to the host's init). Its end of the status pipe tells.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(JailError::sys(
        "prctl(PR_SET_PDEATHSIG) after the id change",
    ))?;
    if reader_gone(&status_fd) {
        return Err(JailError::Sys(
            "jail monitor",
            io::Error::other("exited while the jail was being set up"),
        ));
    }
    monitor::report_exit_status_on(status_fd);

    vm.kernel = PathBuf::from(JAIL_KERNEL);
    if vm.rootfs.is_some() {
        vm.rootfs = Some(PathBuf::from(JAIL_ROOTFS));
    }
    for (index, drive) in vm.drives.iter_mut().enumerate() {
        drive.path = jail_drive_path(index);
    }
    if let (Some(v), Some(inside)) = (vm.vsock.as_mut(), uds_inside) {
        v.uds = inside;
    }
    log::debug!(
        "jail: entered in {} us (as uid {}, gid {})",
        started.elapsed().as_micros(),
        ids.uid,
        ids.gid
    );
    Ok(Entered::Jailed)
}
