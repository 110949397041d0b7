//! Per-thread seccomp filters (seccompiler), one per thread kind, as `docs/seccomp.md` describes.
//!
//! - [`ThreadKind::Vcpu`]: a vCPU thread, from just before its first `KVM_RUN`.
//! - [`ThreadKind::Vmm`]: the main thread once every vCPU thread is started, i.e. before the
//!   event loop serves the first guest-triggered event.
//! - [`ThreadKind::Monitor`]: the jail's outer process, which only waits for the jailed VMM.
//! - [`ThreadKind::Client`]: with `host-vmm -- CMD`, the main thread talking to the agent while
//!   the VM runs on a thread of its own (and the relay threads it starts).
//!
//! Every filter's default action is kill-process (`--seccomp kill`, the default) or a trap whose
//! SIGSYS handler names the call on stderr and makes it fail with `ENOSYS` (`--seccomp log`, for
//! diagnosing a filter). The allow lists live in [`vcpu`], [`vmm`] and [`monitor`]; each entry
//! says why the thread needs the call. Filters are compiled once on the main thread (compiling is
//! the slow part) and applied by each thread to itself.
//!
//! This module owns no policy about *when* a thread is far enough in its set-up; the callers
//! (`kvm::vcpu`, `vmm`, `jail`) decide that.

pub mod client;
pub mod monitor;
pub mod names;
pub mod rule;
mod sigsys;
#[cfg(test)]
mod tests;
pub mod vcpu;
pub mod vmm;

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use rule::{Allowed, ArgCheck};

/// `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// A call outside the thread's list kills the whole process (SIGSYS).
    #[default]
    Kill,
    /// A call outside the list is named on stderr and fails with ENOSYS; the VMM goes on.
    Log,
    /// No filters.
    Off,
}

/// The thread kinds that get a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (`KVM_RUN`, PIO/MMIO dispatch).
    Vcpu,
    /// The main thread serving the VMM event loop.
    Vmm,
    /// The jail's outer process (waits for the jailed VMM, forwards stop signals).
    Monitor,
    /// The agent client of `host-vmm -- CMD` (module `run`).
    Client,
}

impl ThreadKind {
    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Monitor => "monitor",
            ThreadKind::Client => "client",
        }
    }
}

/// Values only known at run time that some rules check arguments against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterContext {
    /// This process's pid (as `getpid` returns it: 1 inside the jail's PID namespace).
    pub pid: u32,
    /// Signal that kicks vCPUs out of `KVM_RUN`.
    pub kick_signal: i32,
    /// The monitored child (monitor filter only).
    pub child_pid: Option<u32>,
}

impl FilterContext {
    /// The context of the calling process, with the VMM's kick signal.
    pub fn current() -> Self {
        Self {
            pid: std::process::id(),
            kick_signal: crate::kvm::vcpu::kick_signal(),
            child_pid: None,
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler rejected the rules (a bug in the allow list).
    #[error("cannot compile the {0} seccomp filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The SIGSYS handler for `--seccomp log` could not be installed.
    #[error("cannot install the SIGSYS handler for --seccomp log")]
    Handler(#[source] std::io::Error),
    /// The monitor filter needs the child's pid.
    #[error("the monitor filter needs the jailed child's pid")]
    NoChild,
}

/// The allow list of `kind`.
pub fn allowed(kind: ThreadKind, ctx: &FilterContext) -> Result<Vec<Allowed>, SeccompError> {
    Ok(match kind {
        ThreadKind::Vcpu => vcpu::allowed(ctx),
        ThreadKind::Vmm => vmm::allowed(ctx),
        ThreadKind::Monitor => monitor::allowed(ctx.child_pid.ok_or(SeccompError::NoChild)?),
        ThreadKind::Client => client::allowed(),
    })
}

/// A compiled filter for one thread kind, cheap to share between threads.
#[derive(Debug, Clone)]
pub struct ThreadFilter {
    kind: ThreadKind,
    mode: SeccompMode,
    program: Option<Arc<BpfProgram>>,
}

impl ThreadFilter {
    /// Compiles the filter of `kind` for `mode` (`Off`: an empty filter that installs nothing).
    pub fn compile(
        kind: ThreadKind,
        mode: SeccompMode,
        ctx: &FilterContext,
    ) -> Result<Self, SeccompError> {
        let program = match mode {
            SeccompMode::Off => None,
            SeccompMode::Kill | SeccompMode::Log => {
                let mismatch = if mode == SeccompMode::Kill {
                    SeccompAction::KillProcess
                } else {
                    SeccompAction::Trap
                };
                Some(Arc::new(compile_list(
                    kind,
                    &allowed(kind, ctx)?,
                    mismatch,
                )?))
            }
        };
        Ok(Self {
            kind,
            mode,
            program,
        })
    }

    /// The thread kind.
    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// The BPF program (`None` with `--seccomp off`).
    pub fn program(&self) -> Option<&BpfProgram> {
        self.program.as_deref()
    }

    /// Installs the filter on the calling thread (and sets `no_new_privs`, which seccomp
    /// requires of unprivileged callers). With `--seccomp log`, installs the SIGSYS handler
    /// first. Does nothing with `--seccomp off`.
    pub fn apply(&self) -> Result<(), SeccompError> {
        let Some(program) = &self.program else {
            return Ok(());
        };
        if self.mode == SeccompMode::Log {
            sigsys::install_handler().map_err(SeccompError::Handler)?;
        }
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(self.kind.name(), e))
    }
}

/// Compiles `list` with `mismatch` as the default action.
pub fn compile_list(
    kind: ThreadKind,
    list: &[Allowed],
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let err = |e| SeccompError::Compile(kind.name(), e);
    let mut rules = BTreeMap::new();
    for entry in list {
        let r: &mut Vec<_> = rules.entry(entry.nr).or_default();
        r.extend(entry.rules().map_err(err)?);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The calls every thread of this process makes whatever its job: memory allocation, locks,
/// writing diagnostics, thread and process exit. Part of every VMM-side list.
pub(crate) fn common() -> Vec<Allowed> {
    use libc::*;
    let no_exec = vec![vec![ArgCheck::Masked {
        arg: 2,
        mask: PROT_EXEC as u64,
        value: 0,
    }]];
    vec![
        // malloc grows and shrinks its arenas; never executable memory.
        Allowed::when(
            SYS_mmap,
            "allocator: new mappings (no PROT_EXEC)",
            no_exec.clone(),
        ),
        Allowed::when(
            SYS_mprotect,
            "allocator: thread arenas (no PROT_EXEC)",
            no_exec,
        ),
        Allowed::any(
            SYS_munmap,
            "allocator; thread stacks and kvm_run pages at teardown",
        ),
        Allowed::any(SYS_mremap, "allocator: Vec growth of large buffers"),
        Allowed::any(SYS_brk, "allocator: main arena"),
        rule::arg_in(
            SYS_madvise,
            "allocator and glibc thread-stack release",
            2,
            &[MADV_DONTNEED as u64],
        ),
        Allowed::any(SYS_futex, "Mutex/Condvar of shared devices, thread join"),
        Allowed::any(
            SYS_write,
            "console output, log lines on stderr, eventfd signals",
        ),
        Allowed::any(
            SYS_close,
            "dropping fds (vsock streams, vCPU fds at teardown)",
        ),
        // Debug builds of std check an fd is open before closing it (F_GETFD).
        rule::arg_in(
            SYS_fcntl,
            "std's fd checks (F_GETFD) and non-blocking streams (F_GETFL/F_SETFL)",
            1,
            &[F_GETFD as u64, F_GETFL as u64, F_SETFL as u64],
        ),
        Allowed::any(SYS_clock_gettime, "Instant::now when the vDSO falls back"),
        Allowed::any(
            SYS_rt_sigprocmask,
            "glibc masks signals around pthread_kill and exit",
        ),
        Allowed::any(SYS_rt_sigreturn, "return from the kick (SIGRTMIN) handler"),
        Allowed::any(
            SYS_sigaltstack,
            "std removes the thread's signal stack at exit",
        ),
        Allowed::any(
            SYS_restart_syscall,
            "kernel restarts a call interrupted by the kick",
        ),
        Allowed::any(SYS_exit, "thread exit"),
        Allowed::any(SYS_exit_group, "process exit"),
    ]
}

/// `err` and its sources on one line, for a VM outcome message.
pub fn describe(err: &SeccompError) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        msg.push_str(": ");
        msg.push_str(&e.to_string());
        source = e.source();
    }
    msg
}
