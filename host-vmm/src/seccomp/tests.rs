//! Filter tests. Each one forks: the child installs a compiled filter and makes real system
//! calls, the parent checks how the child ended. The test process itself is never filtered.
//!
//! "Allows each listed call": the child calls every allowed syscall once per alternative of
//! its argument checks, with arguments that pass the checks and are otherwise invalid (-1), so
//! the kernel rejects the call (EBADF, EINVAL, ...) after the filter let it through; a filter
//! that blocked it would kill the child. `exit`/`exit_group` end the child, `rt_sigreturn`
//! runs when a timer signal handler returns.

use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{apply_filter, BpfProgram, SeccompAction};

use super::*;

/// A pid that cannot exist (above the kernel's PID_MAX_LIMIT).
const NO_SUCH_PID: u32 = 0x3fff_fff0;

fn ctx() -> FilterContext {
    FilterContext {
        pid: std::process::id(),
        kick_signal: crate::kvm::vcpu::kick_signal(),
        child_pid: Some(NO_SUCH_PID),
    }
}

const KINDS: [ThreadKind; 4] = [
    ThreadKind::Vcpu,
    ThreadKind::Vmm,
    ThreadKind::Monitor,
    ThreadKind::Client,
];

fn kill_filter(kind: ThreadKind, ctx: &FilterContext) -> BpfProgram {
    compile_list(
        kind,
        &allowed(kind, ctx).unwrap(),
        SeccompAction::KillProcess,
    )
    .unwrap()
}

/// One raw call: number and six arguments.
type Call = (i64, [u64; 6]);

/// Every call the allow list permits, with arguments that pass its checks.
fn calls_for(list: &[Allowed]) -> Vec<Call> {
    let mut calls = Vec::new();
    for entry in list {
        if [libc::SYS_exit, libc::SYS_exit_group, libc::SYS_rt_sigreturn].contains(&entry.nr) {
            continue;
        }
        let alternatives: Vec<&[ArgCheck]> = if entry.any_of.is_empty() {
            vec![&[]]
        } else {
            entry.any_of.iter().map(Vec::as_slice).collect()
        };
        for checks in alternatives {
            let mut args = [u64::MAX; 6];
            for c in checks {
                args[usize::from(c.arg())] = c.sample();
            }
            calls.push((entry.nr, args));
        }
    }
    calls
}

fn raw(call: &Call) -> i64 {
    let (nr, a) = *call;
    // SAFETY: arguments are invalid on purpose (-1 fds, lengths and pointers) apart from the
    // checked ones, so the kernel rejects each call without side effects.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// Runs `child` in a forked process and returns its wait status.
fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes raw syscalls (no allocation, no locks) before `_exit`; the
    // closure's captured data was prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child without running the test harness's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    status
}

fn describe(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exited with {}", libc::WEXITSTATUS(status))
    }
}

fn killed_by_sigsys(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

static ALARM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_alarm(_: libc::c_int) {
    ALARM.store(true, Ordering::SeqCst);
}

/// Arms a 1 ms SIGALRM whose handler returns through `rt_sigreturn`.
fn arm_alarm() {
    // SAFETY: installs a handler that only stores to an atomic; arms a one-shot timer.
    unsafe {
        libc::signal(libc::SIGALRM, on_alarm as *const () as libc::sighandler_t);
        let t = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: 0,
                tv_usec: 1000,
            },
        };
        libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut());
    }
}

#[test]
fn every_listed_call_is_allowed() {
    let ctx = ctx();
    for kind in KINDS {
        let list = allowed(kind, &ctx).unwrap();
        let calls = calls_for(&list);
        let filter = kill_filter(kind, &ctx);
        for exit_nr in [libc::SYS_exit_group, libc::SYS_exit] {
            if !list.iter().any(|a| a.nr == exit_nr) {
                continue;
            }
            let status = in_child(|| {
                ALARM.store(false, Ordering::SeqCst);
                arm_alarm();
                if apply_filter(&filter).is_err() {
                    return 90;
                }
                for call in &calls {
                    raw(call);
                }
                // rt_sigreturn: the timer handler must have run and returned.
                while !ALARM.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                // SAFETY: ends the process (or its only thread) with status 0.
                unsafe { libc::syscall(exit_nr, 0) };
                91
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{} filter: child {} (a listed call was blocked?)",
                kind.name(),
                describe(status)
            );
        }
    }
}

/// Calls a filter must kill on, per kind: unlisted syscalls and listed ones with other
/// arguments.
fn forbidden(kind: ThreadKind, ctx: &FilterContext) -> Vec<(&'static str, Call)> {
    use libc::*;
    let m = u64::MAX;
    let mut v = vec![
        ("openat", (SYS_openat, [AT_FDCWD as u64, 0, 0, 0, 0, 0])),
        ("execve", (SYS_execve, [0, 0, 0, 0, 0, 0])),
        ("ptrace", (SYS_ptrace, [m; 6])),
        (
            "mmap PROT_EXEC",
            (SYS_mmap, [m, m, (PROT_READ | PROT_EXEC) as u64, m, m, m]),
        ),
        (
            "socket AF_INET",
            (SYS_socket, [AF_INET as u64, SOCK_STREAM as u64, 0, 0, 0, 0]),
        ),
        ("ioctl TIOCSTI", (SYS_ioctl, [0, TIOCSTI, m, m, m, m])),
    ];
    match kind {
        ThreadKind::Vcpu => v.extend([
            (
                "ioctl KVM_SET_REGS",
                (SYS_ioctl, [m, 0x4090_ae82, m, m, m, m]),
            ),
            ("epoll_wait", (SYS_epoll_wait, [m; 6])),
            (
                "tgkill",
                (
                    SYS_tgkill,
                    [u64::from(ctx.pid), m, ctx.kick_signal as u64, m, m, m],
                ),
            ),
        ]),
        ThreadKind::Vmm => v.extend([
            ("ioctl KVM_RUN", (SYS_ioctl, [m, vcpu::KVM_RUN, m, m, m, m])),
            (
                "tgkill SIGKILL",
                (SYS_tgkill, [u64::from(ctx.pid), m, SIGKILL as u64, m, m, m]),
            ),
            (
                "tgkill other process",
                (SYS_tgkill, [1, m, ctx.kick_signal as u64, m, m, m]),
            ),
            (
                "fcntl F_DUPFD",
                (SYS_fcntl, [m, F_DUPFD as u64, m, m, m, m]),
            ),
            (
                "madvise MADV_DONTFORK",
                (SYS_madvise, [m, m, MADV_DONTFORK as u64, m, m, m]),
            ),
        ]),
        ThreadKind::Monitor => v.extend([
            (
                "kill other pid",
                (SYS_kill, [1, SIGKILL as u64, m, m, m, m]),
            ),
            (
                "kill SIGTERM",
                (
                    SYS_kill,
                    [u64::from(NO_SUCH_PID), SIGTERM as u64, m, m, m, m],
                ),
            ),
            ("getpid", (SYS_getpid, [m; 6])),
        ]),
        ThreadKind::Client => v.extend([
            ("ioctl KVM_RUN", (SYS_ioctl, [m, vcpu::KVM_RUN, m, m, m, m])),
            ("kill", (SYS_kill, [1, SIGKILL as u64, m, m, m, m])),
            ("accept4", (SYS_accept4, [m; 6])),
            (
                "clone without CLONE_THREAD (fork)",
                (SYS_clone, [SIGCHLD as u64, m, m, m, m, m]),
            ),
            (
                "prctl PR_SET_DUMPABLE",
                (SYS_prctl, [PR_SET_DUMPABLE as u64, m, m, m, m, m]),
            ),
        ]),
    }
    v
}

#[test]
fn unlisted_calls_kill_the_process() {
    let ctx = ctx();
    for kind in KINDS {
        let filter = kill_filter(kind, &ctx);
        for (what, call) in forbidden(kind, &ctx) {
            let status = in_child(|| {
                if apply_filter(&filter).is_err() {
                    return 90;
                }
                raw(&call);
                92
            });
            assert!(
                killed_by_sigsys(status),
                "{} filter, {what}: child {}, expected SIGSYS",
                kind.name(),
                describe(status)
            );
        }
    }
}

#[test]
fn log_mode_names_the_call_and_returns_enosys() {
    let ctx = ctx();
    let filter = ThreadFilter::compile(ThreadKind::Vcpu, SeccompMode::Log, &ctx).unwrap();
    let mut fds = [0; 2];
    // SAFETY: creates a pipe into a live array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let status = in_child(|| {
        // SAFETY: redirects the child's stderr into the pipe.
        unsafe { libc::dup2(fds[1], libc::STDERR_FILENO) };
        if filter.apply().is_err() {
            return 90;
        }
        // SAFETY: blocked by the filter; the handler turns it into -ENOSYS.
        let r = unsafe { libc::syscall(libc::SYS_getppid) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if r == -1 && errno == Some(libc::ENOSYS) {
            0
        } else {
            93
        }
    });
    // SAFETY: closes our copy of the write end, then reads what the child wrote.
    let text = unsafe {
        libc::close(fds[1]);
        let mut buf = [0u8; 256];
        let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
        libc::close(fds[0]);
        String::from_utf8_lossy(&buf[..usize::try_from(n).unwrap_or(0)]).into_owned()
    };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child {}; stderr {text:?}",
        describe(status)
    );
    assert!(
        text.contains("blocked syscall 110 (getppid)"),
        "stderr: {text:?}"
    );
}

#[test]
fn off_installs_nothing_and_every_rule_has_a_reason() {
    let ctx = ctx();
    for kind in KINDS {
        let f = ThreadFilter::compile(kind, SeccompMode::Off, &ctx).unwrap();
        assert!(f.program().is_none());
        let list = allowed(kind, &ctx).unwrap();
        let mut nrs: Vec<i64> = list.iter().map(|a| a.nr).collect();
        nrs.sort_unstable();
        let before = nrs.len();
        nrs.dedup();
        assert_eq!(before, nrs.len(), "{}: a syscall listed twice", kind.name());
        for a in &list {
            assert!(
                !a.why.trim().is_empty(),
                "{}: {} has no reason",
                kind.name(),
                a.nr
            );
            assert!(names::syscall_name(a.nr).is_some());
        }
    }
    assert!(matches!(
        allowed(
            ThreadKind::Monitor,
            &FilterContext {
                child_pid: None,
                ..ctx
            }
        ),
        Err(SeccompError::NoChild)
    ));
}

#[test]
fn ioctl_numbers() {
    assert_eq!(vcpu::KVM_RUN, 0xae80);
    assert_eq!(vcpu::KVM_GET_REGS, 0x8090_ae81);
}

fn check_text(c: &ArgCheck) -> String {
    match *c {
        ArgCheck::Eq32 { arg, value } => format!("arg{arg} == {value:#x}"),
        ArgCheck::Eq64 { arg, value } => format!("arg{arg} == {value:#x}"),
        ArgCheck::Masked { arg, mask, value } => format!("arg{arg} & {mask:#x} == {value:#x}"),
    }
}

/// The markdown table of `kind`'s allow list, as `docs/seccomp.md` shows it. Context values
/// that vary per run (pids) are shown symbolically.
fn markdown_table(kind: ThreadKind) -> String {
    let ctx = FilterContext {
        pid: 4_000_001,
        kick_signal: crate::kvm::vcpu::kick_signal(),
        child_pid: Some(4_000_002),
    };
    let mut rows = vec![
        "| syscall | allowed arguments | why |".to_string(),
        "|---|---|---|".to_string(),
    ];
    let mut list = allowed(kind, &ctx).unwrap();
    list.sort_by_key(|a| names::syscall_name(a.nr).unwrap_or(""));
    for a in &list {
        let args = if a.any_of.is_empty() {
            "any".to_string()
        } else {
            a.any_of
                .iter()
                .map(|alt| alt.iter().map(check_text).collect::<Vec<_>>().join(" && "))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let args = args
            .replace(&format!("{:#x}", 4_000_001), "getpid()")
            .replace(&format!("{:#x}", 4_000_002), "child pid");
        rows.push(format!(
            "| `{}` | {} | {} |",
            names::syscall_name(a.nr).unwrap_or("?"),
            args,
            a.why
        ));
    }
    rows.join("\n")
}

/// `docs/seccomp.md` shows every list exactly as the code has it. To refresh the document:
/// `cargo test -p host-vmm --lib seccomp::tests::docs_match_the_lists -- --nocapture` prints
/// the tables.
#[test]
fn docs_match_the_lists() {
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/seccomp.md");
    let doc = std::fs::read_to_string(doc_path).unwrap_or_default();
    let mut stale = Vec::new();
    for kind in KINDS {
        let table = markdown_table(kind);
        println!("### {}\n\n{table}\n", kind.name());
        if !doc.contains(&table) {
            stale.push(kind.name());
        }
    }
    assert!(
        stale.is_empty(),
        "docs/seccomp.md is out of date for {stale:?} (tables printed above)"
    );
}
