//! `--seccomp log`: the filters trap (SIGSYS) instead of killing, and this handler writes the
//! blocked call to stderr and makes it return `-ENOSYS`, so one run names every missing call.
//!
//! The handler is async-signal-safe: no allocation, no locks; it formats into a stack buffer
//! and calls `write(2)`, which every filter allows.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use super::names::syscall_name;

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64 (`_sigsys { void *_call_addr;
/// int _syscall; unsigned _arch; }` after the three leading ints and padding).
const SI_SYSCALL_OFFSET: usize = 24;

/// Appends `s` to `buf` at `*len`, truncating at the end of the buffer.
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

/// Appends `n` in decimal.
fn push_num(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// The message for blocked call `nr` (without allocating). Returns the used length.
pub(crate) fn format_message(buf: &mut [u8; 128], nr: i64) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"host-vmm: seccomp: blocked syscall ");
    push_num(buf, &mut len, nr.unsigned_abs());
    push(buf, &mut len, b" (");
    push(
        buf,
        &mut len,
        syscall_name(nr).unwrap_or("unknown").as_bytes(),
    );
    push(buf, &mut len, b"), returning ENOSYS\n");
    len
}

extern "C" fn handle_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if info.is_null() || ctx.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo for a SIGSYS raised by SECCOMP_RET_TRAP; its
    // `_sigsys` member holds the syscall number at this offset on x86_64.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut buf = [0u8; 128];
    let len = format_message(&mut buf, i64::from(nr));
    // SAFETY: writes `len` initialised bytes of a live stack buffer to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext; setting
    // its RAX sets the blocked call's return value.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
    }
}

/// Installs the SIGSYS handler (once per process; later calls report the first result).
pub(crate) fn install_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler has the
        // SA_SIGINFO signature and stays valid for the life of the process.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = handle_sigsys as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
        };
        let errno = if rc == 0 {
            0
        } else {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        };
        RESULT.store(errno, Ordering::SeqCst);
    });
    match RESULT.load(Ordering::SeqCst) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_the_call() {
        let mut buf = [0u8; 128];
        let n = format_message(&mut buf, libc::SYS_openat);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "host-vmm: seccomp: blocked syscall 257 (openat), returning ENOSYS\n"
        );
        let n = format_message(&mut buf, 9999);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("9999 (unknown)"));
    }
}
