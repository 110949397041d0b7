//! Allow list of the jail's outer process (`jail::monitor`): after forking the jailed VMM it
//! only waits for it, forwards stop signals as SIGKILL and exits with its status.

use super::rule::{Allowed, ArgCheck};

/// The monitor's allow list; `child` is the jailed VMM's pid as the monitor sees it.
pub fn allowed(child: u32) -> Vec<Allowed> {
    use libc::*;
    vec![
        Allowed::when(
            SYS_mmap,
            "allocator, should an error message need it (no PROT_EXEC)",
            vec![vec![ArgCheck::Masked {
                arg: 2,
                mask: PROT_EXEC as u64,
                value: 0,
            }]],
        ),
        Allowed::any(SYS_munmap, "allocator"),
        Allowed::any(SYS_brk, "allocator"),
        Allowed::any(SYS_futex, "std's stderr lock"),
        Allowed::any(SYS_write, "messages on stderr"),
        Allowed::any(SYS_rt_sigreturn, "return from the stop-signal handler"),
        Allowed::any(SYS_rt_sigprocmask, "glibc's exit path"),
        Allowed::any(
            SYS_sigaltstack,
            "std removes the main thread's signal stack at exit",
        ),
        Allowed::any(
            SYS_restart_syscall,
            "wait4 interrupted by a forwarded signal",
        ),
        Allowed::any(SYS_exit_group, "exit with the VMM's status"),
        Allowed::any(SYS_read, "the jailed VMM's exit status on the status pipe"),
        Allowed::any(SYS_wait4, "wait for the jailed VMM"),
        Allowed::when(
            SYS_kill,
            "forward SIGTERM/SIGINT/SIGHUP as SIGKILL, only to the jailed VMM",
            vec![vec![
                ArgCheck::Eq32 {
                    arg: 0,
                    value: child,
                },
                ArgCheck::Eq32 {
                    arg: 1,
                    value: SIGKILL as u32,
                },
            ]],
        ),
    ]
}
