//! The jail's outer process. It stays in the caller's PID namespace so the caller (the kiln shim,
//! a test) can wait for and signal it like a plain host-vmm: it forwards SIGTERM, SIGINT, SIGHUP
//! and SIGQUIT as SIGKILL to the jailed VMM (the PID 1 of a namespace ignores catchable signals
//! it has no handler for, and host-vmm has none: their default action ends it without clean-up
//! anyway), waits for it, and exits with its status (128 + signal if it was killed). It closes
//! every inherited fd above stderr and runs under the monitor seccomp filter from right after
//! the fork. The VMM reports a normal exit's status on a pipe ([`report_exit_status_on`]), so
//! the monitor can exit as soon as the VMM has, without also waiting for the kernel to tear
//! the VMM's namespaces down.

use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::seccomp::{FilterContext, SeccompMode, ThreadFilter, ThreadKind};

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(_sig: libc::c_int) {
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; the target is our own child.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
}

/// Signals forwarded to the jailed VMM.
pub const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Exit status for a wait status: the child's own code, or 128 + the signal that killed it.
pub fn exit_status(wait_status: libc::c_int) -> u8 {
    if libc::WIFEXITED(wait_status) {
        libc::WEXITSTATUS(wait_status) as u8
    } else if libc::WIFSIGNALED(wait_status) {
        128u8.saturating_add(libc::WTERMSIG(wait_status) as u8)
    } else {
        1
    }
}

/// The status byte written to the status pipe when the jailed VMM exits normally.
static STATUS_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn write_status(status: libc::c_int, _arg: *mut libc::c_void) {
    let fd = STATUS_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = status as u8;
        // SAFETY: writes one byte from a live local to our own pipe.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

#[cfg(target_env = "gnu")]
extern "C" {
    /// glibc: like `atexit`, but the handler gets the exit status.
    fn on_exit(
        function: extern "C" fn(libc::c_int, *mut libc::c_void),
        arg: *mut libc::c_void,
    ) -> libc::c_int;
}

/// In the jailed VMM: write the process's exit status to `fd` (the status pipe) when it calls
/// `exit`, so the monitor can report it at once. The kernel tears the process's namespaces
/// down after it has closed its fds and before its parent can reap it; on this project's
/// hosts that takes 0.3-10 ms (RCU grace periods), which the caller then does not wait for.
/// A VMM that dies from a signal writes nothing, and the monitor reaps it as usual. Without
/// glibc's `on_exit` (musl builds) the monitor always reaps.
pub fn report_exit_status_on(fd: OwnedFd) {
    STATUS_FD.store(fd.into_raw_fd(), Ordering::SeqCst);
    #[cfg(target_env = "gnu")]
    // SAFETY: registers a handler with the right signature that only writes to a pipe.
    unsafe {
        on_exit(write_status, std::ptr::null_mut());
    }
}

/// Reads the status byte; `None` at EOF (the VMM died without exiting normally).
fn read_status(fd: RawFd) -> Option<u8> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into a live local.
        let r = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        match r {
            1 => return Some(byte),
            r if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            _ => return None,
        }
    }
}

/// Monitors `child` until it exits; returns the status to exit with. `status` is the read end
/// of the pipe the child reports its exit status on.
pub fn run(child: libc::pid_t, seccomp: SeccompMode, status: OwnedFd) -> u8 {
    CHILD.store(child, Ordering::SeqCst);
    // The monitor needs nothing but stdio and the status pipe either.
    // Kept open until the process exits: closing needs calls the monitor filter does not allow.
    let status = match super::privs::close_inherited_fds_except(status) {
        Ok(fd) => Some(fd.into_raw_fd()),
        Err(e) => {
            eprintln!("host-vmm: jail monitor: {e}");
            None
        }
    };
    for sig in FORWARDED {
        // SAFETY: the handler only loads an atomic and calls kill.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let ctx = FilterContext {
        child_pid: u32::try_from(child).ok(),
        ..FilterContext::current()
    };
    match ThreadFilter::compile(ThreadKind::Monitor, seccomp, &ctx).and_then(|f| f.apply()) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("host-vmm: jail monitor: {}", crate::seccomp::describe(&e));
            forward(libc::SIGKILL);
        }
    }
    if let Some(code) = status.and_then(read_status) {
        // The VMM has finished; it is now only being torn down by the kernel.
        return code;
    }
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child into a live integer.
        let r = unsafe { libc::wait4(child, &mut status, 0, std::ptr::null_mut()) };
        if r == child {
            return exit_status(status);
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}
