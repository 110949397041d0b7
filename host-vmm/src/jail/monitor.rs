//! The jail's outer process. It stays in the caller's PID namespace so the caller (the kiln shim,
//! a test) can wait for and signal it like a plain host-vmm: it forwards SIGTERM, SIGINT, SIGHUP
//! and SIGQUIT as SIGKILL to the jailed VMM (the PID 1 of a namespace ignores catchable signals
//! it has no handler for, and host-vmm has none: their default action ends it without clean-up
//! anyway), waits for it, and exits with its status (128 + signal if it was killed). It closes
//! every inherited fd above stderr and runs under the monitor seccomp filter from right after
//! the fork.

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

/// Monitors `child` until it exits; returns the status to exit with.
pub fn run(child: libc::pid_t, seccomp: SeccompMode) -> u8 {
    CHILD.store(child, Ordering::SeqCst);
    // The monitor needs nothing but stdio either.
    if let Err(e) = super::privs::close_inherited_fds() {
        eprintln!("host-vmm: jail monitor: {e}");
    }
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
