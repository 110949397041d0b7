//! What PID 1 does first: boot-timer mark, console, the standard mounts and the cgroup2
//! hierarchy. Only used when guest-init boots a VM; tests run guest-init as a normal process.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

/// I/O port of host-vmm's boot timer and the byte that marks "userspace started".
const BOOT_TIMER_PORT: u16 = 0x440;
const BOOT_TIMER_MAGIC: u8 = 0x7b;

/// Writes the boot-timer byte (ignored when the port is not ours to use).
pub fn mark_boot_timer() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: ioperm grants this process access to one I/O port; the `out` runs only if it
    // succeeded and writes one byte to that port, touching no memory.
    unsafe {
        if libc::ioperm(u64::from(BOOT_TIMER_PORT), 1, 1) == 0 {
            std::arch::asm!("out dx, al", in("dx") BOOT_TIMER_PORT, in("al") BOOT_TIMER_MAGIC,
                options(nomem, nostack, preserves_flags));
            libc::ioperm(u64::from(BOOT_TIMER_PORT), 1, 0);
        }
    }
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).context("mount argument with NUL");
    let (source, target_c, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are NUL-terminated strings that live across the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(()); // already mounted (e.g. devtmpfs by the kernel)
        }
        bail!("mounting {target}: {e}");
    }
    Ok(())
}

/// Points stdin/stdout/stderr at `/dev/console`.
fn open_console() {
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

/// Mounts the standard filesystems and prepares cgroup2.
pub fn setup() -> Result<()> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    open_console();
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, "")?;
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        "nsdelegate",
    )?;
    if let Err(e) = crate::net::loopback_up() {
        log::warn!("bringing up lo: {}", std::io::Error::from_raw_os_error(e));
    }
    Ok(())
}

/// Logs what reaching "listening" cost: the guest's uptime and this process's page faults and
/// context switches so far (`getrusage`), for boot-time work (kernel-config/README.md, "PVM
/// flavour": every page fault costs milliseconds there). One `clock_gettime` and one
/// `getrusage` call.
pub fn log_ready_cost() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let uptime = if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    } else {
        f64::NAN
    };
    // SAFETY: an all-zero rusage is a valid value; getrusage overwrites it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
        log::info!(
            "ready at {uptime:.2} s uptime: {} minor and {} major page faults, {} voluntary \
             and {} involuntary context switches",
            ru.ru_minflt,
            ru.ru_majflt,
            ru.ru_nvcsw,
            ru.ru_nivcsw
        );
    }
}
