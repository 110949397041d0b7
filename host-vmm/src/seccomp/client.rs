//! Allow list of the agent client thread of `host-vmm -- CMD` (module `run`): the main thread
//! once the VM thread is started, and the threads it starts (agent reader, stdio relays, exit
//! waiter, signal forwarder), which inherit the filter.
//!
//! What they do: connect unix streams to the VMM's hybrid vsock socket and talk the protocol on
//! them, copy bytes between the host's stdio and those streams, start and join threads, wait for
//! signals with `sigwait`, switch the host terminal to raw mode and back and read its size,
//! sleep between connection attempts, stop the VM through its exit eventfd, and remove the
//! private socket directory at the end. No files are opened, nothing is executed.

use super::common;
use super::rule::{self, Allowed, ArgCheck};

/// The client's allow list.
pub fn allowed() -> Vec<Allowed> {
    use libc::*;
    let mut list = common();
    // Replaced below by a list that also allows F_DUPFD_CLOEXEC.
    list.retain(|a| a.nr != SYS_fcntl);
    list.extend([
        rule::arg_in(
            SYS_fcntl,
            "std's fd checks and flags; try_clone of streams and fds (F_DUPFD_CLOEXEC)",
            1,
            &[
                F_GETFD as u64,
                F_GETFL as u64,
                F_SETFL as u64,
                F_DUPFD_CLOEXEC as u64,
            ],
        ),
        Allowed::any(SYS_read, "host stdin"),
        Allowed::any(
            SYS_recvfrom,
            "agent streams: std reads unix streams with recv",
        ),
        Allowed::any(
            SYS_sendto,
            "agent streams: std may write unix streams with send",
        ),
        Allowed::when(
            SYS_socket,
            "a unix stream to the VMM's vsock socket per agent connection",
            vec![vec![
                ArgCheck::Eq32 {
                    arg: 0,
                    value: AF_UNIX as u32,
                },
                ArgCheck::Eq32 {
                    arg: 1,
                    value: (SOCK_STREAM | SOCK_CLOEXEC) as u32,
                },
            ]],
        ),
        Allowed::any(SYS_connect, "connect that unix stream"),
        Allowed::when(
            SYS_setsockopt,
            "read timeouts on the handshakes (SO_RCVTIMEO)",
            vec![vec![
                ArgCheck::Eq32 {
                    arg: 1,
                    value: SOL_SOCKET as u32,
                },
                ArgCheck::Eq32 {
                    arg: 2,
                    value: SO_RCVTIMEO as u32,
                },
            ]],
        ),
        rule::arg_in(
            SYS_shutdown,
            "stdin EOF half-closes its stream (SHUT_WR); the client's drop ends its reader",
            1,
            &[SHUT_WR as u64, SHUT_RDWR as u64],
        ),
        // Threads: agent reader, stdio relays, exit waiter, signal forwarder.
        Allowed::any(SYS_clone3, "glibc pthread_create"),
        Allowed::when(
            SYS_clone,
            "pthread_create on kernels without clone3: threads only",
            vec![vec![ArgCheck::Masked {
                arg: 0,
                mask: CLONE_THREAD as u64,
                value: CLONE_THREAD as u64,
            }]],
        ),
        Allowed::any(
            SYS_set_robust_list,
            "glibc registers each new thread's robust list",
        ),
        Allowed::any(SYS_rseq, "glibc registers each new thread's rseq area"),
        Allowed::any(
            SYS_sched_getaffinity,
            "std's new-thread set-up (pthread_getattr_np reads the cpu set)",
        ),
        Allowed::any(SYS_gettid, "std's new-thread set-up and thread ids"),
        rule::arg_in(
            SYS_prctl,
            "std names its threads (PR_SET_NAME)",
            0,
            &[PR_SET_NAME as u64],
        ),
        Allowed::any(SYS_sched_yield, "std's channel backoff"),
        Allowed::any(
            SYS_getrandom,
            "std HashMap keys (the client's pending calls)",
        ),
        Allowed::any(
            SYS_rt_sigtimedwait,
            "the signal thread's sigwait (SIGINT, SIGTERM, SIGHUP, SIGWINCH)",
        ),
        rule::ioctl_requests(
            "terminal: raw mode on and off (TCGETS/TCSETS/TCSETSW), window size (TIOCGWINSZ)",
            &[TCGETS, TCSETS, TCSETSW, TIOCGWINSZ],
        ),
        Allowed::any(SYS_clock_nanosleep, "pauses between connection attempts"),
        Allowed::any(
            SYS_nanosleep,
            "pauses between connection attempts (older glibc)",
        ),
        Allowed::any(SYS_unlink, "remove the private vsock socket at exit"),
        Allowed::any(SYS_rmdir, "remove the private socket directory at exit"),
    ]);
    list
}
