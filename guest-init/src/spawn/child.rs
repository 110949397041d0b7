//! Code that runs in a freshly cloned child, between `clone` and `execve`.
//!
//! guest-init is multithreaded and clones with the raw `clone` system call, so a child here is a
//! copy of one thread of a process whose other threads may have held locks (the allocator's among
//! them). This module therefore must not allocate, lock, or call libc functions that synchronise
//! across threads (musl's `setuid`, `setgroups`, `setrlimit` do): it only issues system calls on
//! data prepared by [`super::plan`] before the clone. Failures are reported to the parent as a
//! fixed-size [`StatusMsg`] on the status pipe, then the child `_exit`s with 127.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

use libc::{c_int, c_long, c_ulong};

use super::caps::CapsPlan;
use super::plan::{ExecPlan, MountStep, RootPlan, Stdio};

/// Size of one message on the status pipe.
pub const STATUS_MSG_LEN: usize = 9;

/// Messages a child writes on its status pipe (9 bytes each, atomic since < PIPE_BUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMsg {
    /// The container's root is set up; the init process waits for Start.
    Ready,
    /// The exec helper cloned the process with this pid.
    Pid(i32),
    /// A step failed with an errno; `index` tells which mount, candidate, ... when relevant.
    Failed {
        stage: Stage,
        index: u16,
        errno: i32,
    },
}

/// Where in the child a failure happened (named in the error reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Stage {
    /// Waiting for the parent's go byte.
    Sync = 1,
    /// Resetting the signal mask or dispositions.
    Signals,
    /// `unshare(CLONE_NEWCGROUP)`.
    CgroupNs,
    /// Making the mount tree private.
    MakePrivate,
    /// Mounting the root block device.
    RootDevice,
    /// Bind-mounting the root onto itself.
    RootBind,
    /// Creating a mount point (index = mount).
    MountPoint,
    /// A mount of the spec (index = mount).
    Mount,
    /// Remounting a bind mount with its flags (index = mount).
    Remount,
    /// A `/dev` symlink.
    DevSymlink,
    /// Masking a path (index = path).
    MaskPath,
    /// Making a path read-only (index = path).
    ReadonlyPath,
    /// `pivot_root` and unmounting the old root.
    PivotRoot,
    /// Remounting the root read-only.
    RootReadonly,
    /// Writing a sysctl (index = entry).
    Sysctl,
    /// `sethostname`.
    Hostname,
    /// Bringing up `lo` in a new network namespace.
    Loopback,
    /// Joining a namespace of the container (index = namespace).
    Setns,
    /// Cloning the process from the exec helper.
    Clone,
    /// Setting up stdin/stdout/stderr or the controlling terminal.
    Stdio,
    /// Writing `oom_score_adj`.
    OomScoreAdj,
    /// `prlimit` (index = rlimit).
    Rlimit,
    /// `chdir` to the process's cwd.
    Cwd,
    /// `setgroups`/`setresgid`/`setresuid`.
    User,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// Closing inherited descriptors.
    CloseFds,
    /// `execve` of every candidate path.
    Exec,
    /// Allocating the pty in the container's devpts (`/dev/ptmx`) and handing its master over.
    Pty,
    /// Capabilities: bounding set (index = capability), keepcaps (index 100), capset (index
    /// 200), ambient (index 201 clear, 202 + capability raise).
    Capabilities,
    /// Installing the seccomp filter.
    Seccomp,
}

impl Stage {
    fn from_u16(v: u16) -> Option<Stage> {
        use Stage::*;
        const ALL: [Stage; 30] = [
            Sync,
            Signals,
            CgroupNs,
            MakePrivate,
            RootDevice,
            RootBind,
            MountPoint,
            Mount,
            Remount,
            DevSymlink,
            MaskPath,
            ReadonlyPath,
            PivotRoot,
            RootReadonly,
            Sysctl,
            Hostname,
            Loopback,
            Setns,
            Clone,
            Stdio,
            OomScoreAdj,
            Rlimit,
            Cwd,
            User,
            NoNewPrivs,
            CloseFds,
            Exec,
            Pty,
            Capabilities,
            Seccomp,
        ];
        ALL.iter().copied().find(|s| *s as u16 == v)
    }

    /// Human-readable name for error replies.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Sync => "waiting for the agent",
            Stage::Signals => "resetting signals",
            Stage::CgroupNs => "creating the cgroup namespace",
            Stage::MakePrivate => "making mounts private",
            Stage::RootDevice => "mounting the root device",
            Stage::RootBind => "bind-mounting the root",
            Stage::MountPoint => "creating mount point",
            Stage::Mount => "mounting",
            Stage::Remount => "remounting bind mount",
            Stage::DevSymlink => "creating /dev symlink",
            Stage::MaskPath => "masking path",
            Stage::ReadonlyPath => "making path read-only",
            Stage::PivotRoot => "pivot_root",
            Stage::RootReadonly => "remounting root read-only",
            Stage::Sysctl => "writing sysctl",
            Stage::Hostname => "setting hostname",
            Stage::Loopback => "bringing up lo",
            Stage::Setns => "joining container namespace",
            Stage::Clone => "cloning process",
            Stage::Stdio => "setting up stdio",
            Stage::OomScoreAdj => "writing oom_score_adj",
            Stage::Rlimit => "setting rlimit",
            Stage::Cwd => "changing to cwd",
            Stage::User => "switching user",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::CloseFds => "closing descriptors",
            Stage::Exec => "executing",
            Stage::Pty => {
                "opening a pty from the container's /dev/ptmx (is devpts mounted on /dev/pts?)"
            }
            Stage::Capabilities => "applying capabilities",
            Stage::Seccomp => "installing the seccomp filter",
        }
    }
}

impl StatusMsg {
    /// Wire form.
    pub fn encode(self) -> [u8; STATUS_MSG_LEN] {
        let mut b = [0u8; STATUS_MSG_LEN];
        match self {
            StatusMsg::Ready => b[0] = b'R',
            StatusMsg::Pid(pid) => {
                b[0] = b'P';
                b[1..5].copy_from_slice(&pid.to_le_bytes());
            }
            StatusMsg::Failed {
                stage,
                index,
                errno,
            } => {
                b[0] = b'E';
                b[1..3].copy_from_slice(&(stage as u16).to_le_bytes());
                b[3..5].copy_from_slice(&index.to_le_bytes());
                b[5..9].copy_from_slice(&errno.to_le_bytes());
            }
        }
        b
    }

    /// Parses a message; `None` for garbage.
    pub fn decode(b: &[u8; STATUS_MSG_LEN]) -> Option<StatusMsg> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let i32_at = |i: usize| i32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        match b[0] {
            b'R' => Some(StatusMsg::Ready),
            b'P' => Some(StatusMsg::Pid(i32_at(1))),
            b'E' => Some(StatusMsg::Failed {
                stage: Stage::from_u16(u16_at(1))?,
                index: u16_at(3),
                errno: i32_at(5),
            }),
            _ => None,
        }
    }
}

/// A failed step: what and the errno.
#[derive(Clone, Copy)]
pub struct Fail {
    stage: Stage,
    index: u16,
    errno: i32,
}

type Step = Result<(), Fail>;

impl Fail {
    /// A failure of `stage` with `errno`.
    pub fn new(stage: Stage, errno: i32) -> Self {
        Fail {
            stage,
            index: 0,
            errno,
        }
    }

    /// A failure of `stage` with the calling thread's current errno.
    pub fn last(stage: Stage) -> Self {
        Fail::new(stage, errno())
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(rc: c_long, stage: Stage, index: usize) -> Step {
    if rc < 0 {
        Err(Fail {
            stage,
            index: u16::try_from(index).unwrap_or(u16::MAX),
            errno: errno(),
        })
    } else {
        Ok(())
    }
}

fn fail(stage: Stage, index: usize, errno: i32) -> Fail {
    Fail {
        stage,
        index: u16::try_from(index).unwrap_or(u16::MAX),
        errno,
    }
}

/// Writes a status message; errors are ignored (the parent then sees EOF).
pub fn send_status(fd: RawFd, msg: StatusMsg) {
    let bytes = msg.encode();
    // SAFETY: writes a stack buffer of the stated length to a descriptor we own.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// Reports `f` on `status_fd` and terminates the child without running any destructors.
pub fn die(status_fd: RawFd, f: Fail) -> ! {
    send_status(
        status_fd,
        StatusMsg::Failed {
            stage: f.stage,
            index: f.index,
            errno: f.errno,
        },
    );
    // SAFETY: `_exit` never returns and runs no atexit handlers or destructors.
    unsafe { libc::_exit(127) }
}

/// Blocks until the parent writes one byte on `fd`. Returns false on EOF (the parent gave up).
pub fn wait_byte(fd: RawFd) -> Result<bool, Fail> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reads at most one byte into a stack buffer.
        let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            return Ok(true);
        }
        if n == 0 {
            return Ok(false);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(fail(Stage::Sync, 0, e));
        }
    }
}

/// Closes every descriptor except those in `keep` (sorted ascending, all >= 0).
pub fn close_all_except(keep: &[RawFd]) -> Step {
    let mut low: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > low {
            close_range(low, fd - 1, 0)?;
        }
        low = fd + 1;
    }
    close_range(low, u32::MAX, 0)
}

fn close_range(first: u32, last: u32, flags: u32) -> Step {
    // SAFETY: close_range only closes descriptors of this (single-threaded) child.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    check(rc, Stage::CloseFds, 0)
}

/// Unblocks all signals and resets SIGPIPE (ignored by the Rust runtime) to its default.
pub fn reset_signals() -> Step {
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask with a kernel-sized (8 byte) empty mask; no old mask requested.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    check(rc, Stage::Signals, 0)?;
    // Kernel `struct sigaction` for x86_64: handler, flags, restorer, mask.
    let act: [u64; 4] = [libc::SIG_DFL as u64, 0, 0, 0];
    for sig in [libc::SIGPIPE, libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs SIG_DFL using the kernel's sigaction layout; no old action requested.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                act.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
        check(rc, Stage::Signals, 0)?;
    }
    Ok(())
}

fn opt_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

fn mount(
    source: *const libc::c_char,
    target: &CStr,
    fstype: *const libc::c_char,
    flags: c_ulong,
    data: *const libc::c_char,
) -> c_long {
    // SAFETY: every pointer is either null or a NUL-terminated string owned by the plan.
    c_long::from(unsafe { libc::mount(source, target.as_ptr(), fstype, flags, data.cast()) })
}

fn mkdir_all(dirs: &[CString], stage: Stage, index: usize) -> Step {
    for dir in dirs {
        // SAFETY: `dir` is a NUL-terminated path.
        let rc = unsafe { libc::mkdir(dir.as_ptr(), 0o755) };
        if rc < 0 && errno() != libc::EEXIST {
            return Err(fail(stage, index, errno()));
        }
    }
    Ok(())
}

fn touch(path: &CString, stage: Stage, index: usize) -> Step {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed right away.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644,
        )
    };
    if fd < 0 {
        let e = errno();
        // An existing directory or device node is a fine mount point too.
        if e == libc::EISDIR || e == libc::EEXIST || e == libc::ENXIO || e == libc::EACCES {
            return Ok(());
        }
        return Err(fail(stage, index, e));
    }
    // SAFETY: closes the descriptor just opened.
    unsafe { libc::close(fd) };
    Ok(())
}

fn apply_mount(i: usize, m: &MountStep) -> Step {
    mkdir_all(&m.mkdirs, Stage::MountPoint, i)?;
    if m.target_is_file {
        touch(&m.target, Stage::MountPoint, i)?;
    }
    let rc = mount(
        opt_ptr(&m.source),
        &m.target,
        opt_ptr(&m.fstype),
        m.flags,
        opt_ptr(&m.data),
    );
    check(rc, Stage::Mount, i)?;
    if let Some(flags) = m.remount_flags {
        let rc = mount(
            std::ptr::null(),
            &m.target,
            std::ptr::null(),
            flags,
            std::ptr::null(),
        );
        check(rc, Stage::Remount, i)?;
    }
    if let Some(prop) = m.propagation {
        let rc = mount(
            std::ptr::null(),
            &m.target,
            std::ptr::null(),
            prop,
            std::ptr::null(),
        );
        check(rc, Stage::Remount, i)?;
    }
    Ok(())
}

/// Builds the container's root in the child's new mount namespace and pivots into it.
pub fn setup_root(root: &RootPlan) -> Step {
    let slash = c"/";
    let dot = c".";
    // SAFETY: a mount-family system call on static NUL-terminated strings; it only affects this
    // child's new mount namespace.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(rc.into(), Stage::MakePrivate, 0)?;
    if let Some((dev, fstype)) = &root.device {
        let flags = if root.readonly { libc::MS_RDONLY } else { 0 };
        let rc = mount(
            dev.as_ptr(),
            &root.rootfs,
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        );
        check(rc, Stage::RootDevice, 0)?;
    }
    let rc = mount(
        root.rootfs.as_ptr(),
        &root.rootfs,
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    );
    check(rc, Stage::RootBind, 0)?;
    for (i, m) in root.mounts.iter().enumerate() {
        apply_mount(i, m)?;
    }
    for (i, (target, link)) in root.dev_symlinks.iter().enumerate() {
        // SAFETY: both strings are NUL-terminated.
        let rc = unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
        if rc < 0 && errno() != libc::EEXIST {
            return Err(fail(Stage::DevSymlink, i, errno()));
        }
    }
    // Sysctls (through the container's /proc, before /proc/sys may become read-only).
    for (i, (path, value)) in root.sysctl.iter().enumerate() {
        write_file(path, value).map_err(|e| fail(Stage::Sysctl, i, e))?;
    }
    for (i, path) in root.masked.iter().enumerate() {
        mask_path(i, path, &root.dev_null)?;
    }
    for (i, path) in root.readonly_paths.iter().enumerate() {
        let rc = mount(
            path.as_ptr(),
            path,
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        );
        if rc < 0 && errno() == libc::ENOENT {
            continue;
        }
        check(rc, Stage::ReadonlyPath, i)?;
        let rc = mount(
            std::ptr::null(),
            path,
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            std::ptr::null(),
        );
        check(rc, Stage::ReadonlyPath, i)?;
    }
    // SAFETY: chdir/pivot_root/umount2 on static NUL-terminated strings.
    unsafe {
        check(
            libc::chdir(root.rootfs.as_ptr()).into(),
            Stage::PivotRoot,
            0,
        )?;
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()),
            Stage::PivotRoot,
            1,
        )?;
        check(
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH).into(),
            Stage::PivotRoot,
            2,
        )?;
        check(libc::chdir(slash.as_ptr()).into(), Stage::PivotRoot, 3)?;
    }
    if root.readonly {
        let rc = mount(
            std::ptr::null(),
            c"/",
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        );
        check(rc, Stage::RootReadonly, 0)?;
    }
    if root.new_net_ns {
        crate::net::loopback_up().map_err(|e| fail(Stage::Loopback, 0, e))?;
    }
    if let Some(name) = &root.hostname {
        let bytes = name.as_bytes();
        // SAFETY: passes a pointer and length of a buffer owned by the plan.
        let rc = unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) };
        check(rc.into(), Stage::Hostname, 0)?;
    }
    Ok(())
}

fn mask_path(i: usize, path: &CString, dev_null: &CString) -> Step {
    let rc = mount(
        dev_null.as_ptr(),
        path,
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    );
    if rc == 0 {
        return Ok(());
    }
    match errno() {
        libc::ENOENT => Ok(()),
        libc::ENOTDIR | libc::EISDIR | libc::EINVAL => {
            let rc = mount(
                c"tmpfs".as_ptr(),
                path,
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            );
            check(rc, Stage::MaskPath, i)
        }
        e => Err(fail(Stage::MaskPath, i, e)),
    }
}

/// Writes `value` to the file at `path`; returns the errno on failure.
fn write_file(path: &CStr, value: &[u8]) -> Result<(), i32> {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed before returning.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: writes `value` (a buffer owned by the plan) to the descriptor just opened.
    let n = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
    let e = errno();
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(fd) };
    if n < 0 {
        Err(e)
    } else {
        Ok(())
    }
}

fn dup2(from: RawFd, to: RawFd) -> Step {
    // SAFETY: dup2 on descriptors the plan owns; `to` is 0..=2.
    let rc = unsafe { libc::dup2(from, to) };
    check(rc.into(), Stage::Stdio, to as usize)
}

/// Applies the process settings of `plan` and executes it. Returns only on failure.
pub fn exec_process(plan: &ExecPlan, status_fd: RawFd) -> Fail {
    match prepare_process(plan, status_fd) {
        Err(f) => f,
        Ok(()) => {
            let mut last = libc::ENOENT;
            for (i, path) in plan.candidates.iter().enumerate() {
                // SAFETY: argv/envp are NULL-terminated arrays of pointers into CStrings owned by
                // the plan; execve only returns on failure.
                unsafe { libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
                let e = errno();
                if e != libc::ENOENT && e != libc::ENOTDIR {
                    return fail(Stage::Exec, i, e);
                }
                last = e;
            }
            fail(Stage::Exec, 0, last)
        }
    }
}

fn prepare_process(plan: &ExecPlan, status_fd: RawFd) -> Step {
    reset_signals()?;
    // SAFETY: setsid has no memory effects; fails only if already a group leader.
    unsafe { libc::setsid() };
    match plan.stdio {
        Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            dup2(stdin, 0)?;
            dup2(stdout, 1)?;
            dup2(stderr, 2)?;
        }
        Stdio::Pty { slave } => {
            // SAFETY: makes the pty slave (a descriptor we own) our controlling terminal.
            let rc = unsafe { libc::ioctl(slave, libc::TIOCSCTTY, 0) };
            check(rc.into(), Stage::Stdio, 3)?;
            dup2(slave, 0)?;
            dup2(slave, 1)?;
            dup2(slave, 2)?;
        }
    }
    if let Some(value) = &plan.oom_score_adj {
        write_file(c"/proc/self/oom_score_adj", value)
            .map_err(|e| fail(Stage::OomScoreAdj, 0, e))?;
    }
    for (i, (resource, limit)) in plan.rlimits.iter().enumerate() {
        // SAFETY: prlimit64 on ourselves with a pointer to a limit owned by the plan.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                *resource,
                limit as *const libc::rlimit64,
                std::ptr::null_mut::<libc::rlimit64>(),
            )
        };
        check(rc, Stage::Rlimit, i)?;
    }
    // SAFETY: chdir to a NUL-terminated path from the plan.
    let rc = unsafe { libc::chdir(plan.cwd.as_ptr()) };
    check(rc.into(), Stage::Cwd, 0)?;
    // Everything but stdio and the status pipe (close-on-exec) goes, before a seccomp filter
    // could refuse close_range.
    let mut keep = [0, 1, 2, status_fd];
    keep.sort_unstable();
    close_all_except(&keep)?;
    // runc's order: no_new_privs; without it seccomp needs CAP_SYS_ADMIN, so the filter goes
    // in before capabilities are dropped (and must allow the calls that follow); with it, as
    // late as possible. Then the bounding set, the user switch keeping the permitted set, the
    // other capability sets.
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as c_ulong, 0, 0, 0) };
        check(rc.into(), Stage::NoNewPrivs, 0)?;
    }
    if !plan.no_new_privs {
        install_seccomp(plan)?;
    }
    if let Some(caps) = &plan.caps {
        caps.drop_bounding()
            .map_err(|(cap, e)| fail(Stage::Capabilities, cap as usize, e))?;
        CapsPlan::keep_caps(true).map_err(|e| fail(Stage::Capabilities, 100, e))?;
    }
    // Raw system calls: musl's wrappers broadcast to all threads, which do not exist here.
    // SAFETY: setgroups reads `groups.len()` gids from the plan's vector.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()) };
    check(rc, Stage::User, 0)?;
    // SAFETY: plain id-setting system calls.
    let rc = unsafe { libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) };
    check(rc, Stage::User, 1)?;
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) };
    check(rc, Stage::User, 2)?;
    if let Some(caps) = &plan.caps {
        CapsPlan::keep_caps(false).map_err(|e| fail(Stage::Capabilities, 100, e))?;
        caps.apply()
            .map_err(|(step, e)| fail(Stage::Capabilities, 200 + step as usize, e))?;
    }
    // SAFETY: umask has no memory effects.
    unsafe { libc::umask(plan.umask) };
    if plan.no_new_privs {
        install_seccomp(plan)?;
    }
    Ok(())
}

fn install_seccomp(plan: &ExecPlan) -> Step {
    match &plan.seccomp {
        Some(filter) => filter.install().map_err(|e| fail(Stage::Seccomp, 0, e)),
        None => Ok(()),
    }
}

/// Allocates the process's pty from the container's `/dev/ptmx` (or uses the guest master
/// `fallback` when the container has none; see [`crate::pty`]), sends the
/// master to the agent on `socket` and puts the slave on `socket`'s descriptor number, where the
/// plan's `Stdio::Pty` expects it.
pub fn take_pty(socket: RawFd, fallback: RawFd, size: Option<libc::winsize>) -> Step {
    let slave =
        crate::pty::open_in_child(socket, fallback, size).map_err(|e| fail(Stage::Pty, 0, e))?;
    // SAFETY: dup3 onto a descriptor we own (the socket, no longer needed); closes the socket.
    let rc = unsafe { libc::dup3(slave, socket, libc::O_CLOEXEC) };
    let e = errno();
    // SAFETY: closes the original slave descriptor, now duplicated.
    unsafe { libc::close(slave) };
    if rc < 0 {
        return Err(fail(Stage::Pty, 1, e));
    }
    Ok(())
}

/// Joins the namespaces in `fds` (already open in the parent) in order.
pub fn join_namespaces(fds: &[(RawFd, c_int)]) -> Step {
    for (i, &(fd, kind)) in fds.iter().enumerate() {
        // SAFETY: setns on a namespace descriptor opened by the parent.
        let rc = unsafe { libc::setns(fd, kind) };
        check(rc.into(), Stage::Setns, i)?;
    }
    Ok(())
}

/// `clone` with fork semantics (no new stack): returns 0 in the child, the pid in the parent.
pub fn raw_clone(flags: c_ulong) -> Result<i32, i32> {
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork: the child gets a
    // copy-on-write copy of the address space and continues on its own copy of this stack.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as i32)
    }
}
