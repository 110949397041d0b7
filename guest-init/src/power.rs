//! Ending the agent: as PID 1, kill containers, sync, unmount and power the VM off (never exit);
//! as a normal process (tests), just exit.

use std::ffi::CString;

use crate::agent::Agent;

/// Handles `Shutdown`: stops every container, then [`power_off`] (PID 1) or exits.
pub fn shutdown(agent: &Agent) {
    log::info!("shutdown requested");
    agent.kill_everything();
    if agent.opts.pid1 {
        power_off();
    }
    std::process::exit(0);
}

/// Mount points from `/proc/self/mounts`, innermost (last mounted) first, without `/`.
fn mount_points() -> Vec<CString> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut out: Vec<CString> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| *p != "/")
        // /proc/mounts escapes spaces etc. as octal; such paths are skipped (not ours).
        .filter(|p| !p.contains('\\'))
        .filter_map(|p| CString::new(p).ok())
        .collect();
    out.reverse();
    out
}

/// Syncs, unmounts everything, remounts `/` read-only and powers off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync has no memory effects.
    unsafe { libc::sync() };
    // SAFETY: kill(-1) signals every process but ourselves (PID 1); no memory effects.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    for mp in mount_points() {
        // SAFETY: umount2 on a NUL-terminated path.
        if unsafe { libc::umount2(mp.as_ptr(), 0) } < 0 {
            // SAFETY: as above, lazily.
            unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH) };
        }
    }
    // SAFETY: remounts / read-only; all pointers are null or static strings.
    unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        );
        libc::sync();
    }
    // Without ACPI (kiln's kernel has none) the kernel turns a power-off into a halt that never
    // ends the VM; a reboot request does: with `reboot=k` the kernel resets through the i8042,
    // which host-vmm (and QEMU with -no-reboot) treat as the end of the VM.
    if std::path::Path::new("/sys/firmware/acpi").exists() {
        eprintln!("guest-init: powering off");
        // SAFETY: reboot with a valid command; it only returns on failure.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
    }
    eprintln!("guest-init: resetting the VM");
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        // SAFETY: pause only waits for a signal.
        unsafe { libc::pause() };
    }
}
