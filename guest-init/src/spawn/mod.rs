//! Creating container processes: the parent side of `clone`, the pipes that synchronise with the
//! child, and stdio descriptors.
//!
//! - [`spawn_container_init`] clones the container's main process into new namespaces; the child
//!   builds the root, reports `Ready`, then waits for [`InitHandle::start`] before it execs.
//! - [`spawn_exec`] clones a helper that joins the container's namespaces and clones the real
//!   process with `CLONE_PARENT` (so guest-init is its parent and reaps it, as runc does).
//!
//! In both cases the parent registers the new pid (process table, cgroup) before the child may
//! exec, so no exit can go unnoticed. Plans come from [`plan`]; the child code is in [`child`].

pub mod caps;
pub mod child;
pub mod plan;
pub mod seccomp;
pub mod syscalls;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, c_ulong};
use thiserror::Error;

use child::{StatusMsg, STATUS_MSG_LEN};
use plan::{ExecPlan, NamespaceSet, RootPlan, Stdio};

/// Failures while creating a process.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// A system call in the parent failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The child reported a failed step.
    #[error("{stage} (step {index})")]
    Child {
        /// What the child was doing.
        stage: &'static str,
        /// Which mount/rlimit/... (0 when not relevant).
        index: u16,
        /// The errno it got.
        #[source]
        source: std::io::Error,
    },
    /// The child went away without saying why.
    #[error("the child exited before {0}")]
    Vanished(&'static str),
    /// Registering the pid (process table, cgroup) failed.
    #[error("registering the new process failed: {0}")]
    Register(String),
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Sys { what, source }
}

/// Creates a close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(sys("pipe2")(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The agent's ends of a process's stdio.
pub enum ParentIo {
    /// Pipes: stdin write end, stdout and stderr read ends.
    Pipes {
        /// Write end of the process's stdin.
        stdin: OwnedFd,
        /// Read end of its stdout.
        stdout: OwnedFd,
        /// Read end of its stderr.
        stderr: OwnedFd,
    },
    /// The pty master.
    Pty {
        /// Master side.
        master: OwnedFd,
    },
}

/// The agent's side before the child ran: pipes are ready at once, a pty master arrives on the
/// socket once the child allocated it in the container's devpts ([`crate::pty`]).
enum PendingIo {
    Ready(ParentIo),
    Pty { socket: OwnedFd },
}

/// A pty the child allocates in the container's devpts: it sends the master on `socket` (the
/// child's end of the socketpair) and then puts the slave on that same descriptor number, which
/// is what the plan's [`Stdio::Pty`] names. `fallback` is a guest pty master, used only by a
/// container without `/dev/ptmx`.
#[derive(Clone, Copy)]
pub struct PtyRequest {
    socket: RawFd,
    fallback: RawFd,
    size: Option<libc::winsize>,
}

impl PtyRequest {
    fn fds(req: Option<Self>) -> Vec<RawFd> {
        req.map_or_else(Vec::new, |r| vec![r.socket, r.fallback])
    }
}

/// Descriptors for a new process: the agent keeps `parent`, the child gets `child`.
pub struct IoPair {
    parent: PendingIo,
    child: Vec<OwnedFd>,
    stdio: Stdio,
    pty: Option<PtyRequest>,
}

impl IoPair {
    /// Pipes, or (when `terminal`) a socketpair over which the child hands back the master of
    /// the pty of `size` it allocates inside the container.
    pub fn new(terminal: bool, size: Option<kiln_protocol::TtySize>) -> Result<Self, SpawnError> {
        if terminal {
            let (parent, child) =
                crate::pty::socketpair().map_err(sys("socketpair for the pty"))?;
            let fallback = crate::pty::open_guest_master().map_err(sys("opening a pty"))?;
            let raw = child.as_raw_fd();
            return Ok(IoPair {
                parent: PendingIo::Pty { socket: parent },
                pty: Some(PtyRequest {
                    socket: raw,
                    fallback: fallback.as_raw_fd(),
                    size: size.map(crate::pty::winsize),
                }),
                child: vec![child, fallback],
                stdio: Stdio::Pty { slave: raw },
            });
        }
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let stdio = Stdio::Pipes {
            stdin: in_r.as_raw_fd(),
            stdout: out_w.as_raw_fd(),
            stderr: err_w.as_raw_fd(),
        };
        Ok(IoPair {
            parent: PendingIo::Ready(ParentIo::Pipes {
                stdin: in_w,
                stdout: out_r,
                stderr: err_r,
            }),
            child: vec![in_r, out_w, err_w],
            stdio,
            pty: None,
        })
    }
}

impl PendingIo {
    /// The agent's descriptors, once the child reported past its pty allocation.
    fn finish(self) -> Result<ParentIo, SpawnError> {
        match self {
            PendingIo::Ready(io) => Ok(io),
            PendingIo::Pty { socket } => crate::pty::recv_master(&socket)
                .map(|master| ParentIo::Pty { master })
                .map_err(sys("receiving the pty master from the container")),
        }
    }
}

/// Reads one status message; `None` at end of file.
fn read_status(f: &mut File) -> Result<Option<StatusMsg>, SpawnError> {
    let mut buf = [0u8; STATUS_MSG_LEN];
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(SpawnError::Vanished("finishing its status message")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(sys("reading the child's status")(e)),
        }
    }
    StatusMsg::decode(&buf)
        .map(Some)
        .ok_or(SpawnError::Vanished("sending a valid status message"))
}

fn child_error(msg: StatusMsg) -> SpawnError {
    match msg {
        StatusMsg::Failed {
            stage,
            index,
            errno,
        } => SpawnError::Child {
            stage: stage.describe(),
            index,
            source: std::io::Error::from_raw_os_error(errno),
        },
        _ => SpawnError::Vanished("reporting in order"),
    }
}

/// Waits for the status pipe to close (exec succeeded) or carry a failure.
fn wait_exec(status: &mut File) -> Result<(), SpawnError> {
    match read_status(status)? {
        None => Ok(()),
        Some(msg) => Err(child_error(msg)),
    }
}

fn write_go(go: &OwnedFd) -> Result<(), SpawnError> {
    let mut f = File::from(go.try_clone().map_err(sys("dup"))?);
    f.write_all(&[1]).map_err(sys("releasing the child"))
}

/// A container's main process, set up and waiting for Start.
pub struct InitHandle {
    /// Its pid.
    pub pid: i32,
    go: OwnedFd,
    status: File,
}

impl InitHandle {
    /// Lets the process exec its program and waits until it did (or failed).
    pub fn start(mut self) -> Result<(), SpawnError> {
        write_go(&self.go)?;
        drop(self.go);
        wait_exec(&mut self.status)
    }
}

/// Clones the container's main process and builds its root. `register` runs with the pid before
/// the child proceeds (process table, cgroup); an error there kills the child.
pub fn spawn_container_init(
    root: &RootPlan,
    exec: &mut ExecPlan,
    ns: NamespaceSet,
    io: IoPair,
    register: impl FnOnce(i32) -> Result<(), String>,
) -> Result<(InitHandle, ParentIo), SpawnError> {
    exec.stdio = io.stdio;
    let (go_r, go_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let mut keep: Vec<RawFd> = vec![0, 1, 2, go_r.as_raw_fd(), status_w.as_raw_fd()];
    keep.extend(io.stdio.fds());
    keep.extend(PtyRequest::fds(io.pty));
    keep.sort_unstable();
    keep.dedup();
    let pid = child::raw_clone(ns.clone_flags)
        .map_err(|e| sys("clone of the container process")(std::io::Error::from_raw_os_error(e)))?;
    if pid == 0 {
        init_child(
            root,
            exec,
            ns,
            io.pty,
            &keep,
            go_r.as_raw_fd(),
            status_w.as_raw_fd(),
        );
    }
    drop(go_r);
    drop(status_w);
    drop(io.child);
    let mut status = File::from(status_r);
    let handle_kill = |pid: i32| {
        // SAFETY: kill has no memory effects; the pid is our child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };
    if let Err(e) = register(pid) {
        handle_kill(pid);
        return Err(SpawnError::Register(e));
    }
    if let Err(e) = write_go(&go_w) {
        handle_kill(pid);
        return Err(e);
    }
    match read_status(&mut status) {
        Ok(Some(StatusMsg::Ready)) => match io.parent.finish() {
            Ok(parent) => Ok((
                InitHandle {
                    pid,
                    go: go_w,
                    status,
                },
                parent,
            )),
            Err(e) => {
                handle_kill(pid);
                Err(e)
            }
        },
        Ok(Some(msg)) => {
            handle_kill(pid);
            Err(child_error(msg))
        }
        Ok(None) => Err(SpawnError::Vanished("setting up the container")),
        Err(e) => {
            handle_kill(pid);
            Err(e)
        }
    }
}

fn init_child(
    root: &RootPlan,
    exec: &ExecPlan,
    ns: NamespaceSet,
    pty: Option<PtyRequest>,
    keep: &[RawFd],
    go: RawFd,
    status: RawFd,
) -> ! {
    let run = || -> Result<(), child::Fail> {
        child::close_all_except(keep)?;
        if !child::wait_byte(go)? {
            // SAFETY: the agent gave up on us; leave without running destructors.
            unsafe { libc::_exit(1) };
        }
        if ns.cgroup {
            // SAFETY: unshare with a namespace flag has no memory effects.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWCGROUP) };
            if rc < 0 {
                return Err(child::Fail::last(child::Stage::CgroupNs));
            }
        }
        child::setup_root(root)?;
        if let Some(p) = pty {
            child::take_pty(p.socket, p.fallback, p.size)?;
        }
        child::send_status(status, StatusMsg::Ready);
        if !child::wait_byte(go)? {
            // SAFETY: removed before start; exit quietly.
            unsafe { libc::_exit(1) };
        }
        Ok(())
    };
    if let Err(f) = run() {
        child::die(status, f);
    }
    child::die(status, child::exec_process(exec, status))
}

/// Namespace descriptors of a running container, in the order they are joined.
pub struct NamespaceFds(Vec<(OwnedFd, c_int)>);

impl NamespaceFds {
    /// Opens `/proc/<pid>/ns/*` for every namespace the container created (mount last).
    pub fn open(pid: i32, ns: NamespaceSet) -> Result<Self, SpawnError> {
        let mut out = Vec::new();
        let kinds = [
            (libc::CLONE_NEWIPC, "ipc", ns.has(libc::CLONE_NEWIPC)),
            (libc::CLONE_NEWUTS, "uts", ns.has(libc::CLONE_NEWUTS)),
            (libc::CLONE_NEWNET, "net", ns.has(libc::CLONE_NEWNET)),
            (libc::CLONE_NEWPID, "pid", ns.has(libc::CLONE_NEWPID)),
            (libc::CLONE_NEWCGROUP, "cgroup", ns.cgroup),
            (libc::CLONE_NEWNS, "mnt", true),
        ];
        for (flag, name, wanted) in kinds {
            if !wanted {
                continue;
            }
            let f = File::open(format!("/proc/{pid}/ns/{name}"))
                .map_err(sys("opening a namespace of the container"))?;
            out.push((OwnedFd::from(f), flag));
        }
        Ok(NamespaceFds(out))
    }
}

/// Starts a further process in a container. `register` runs with the new pid before it may exec.
/// Returns its pid and stdio once it has exec'ed.
pub fn spawn_exec(
    ns: &NamespaceFds,
    exec: &mut ExecPlan,
    io: IoPair,
    register_helper: impl FnOnce(i32),
    register: impl FnOnce(i32) -> Result<(), String>,
) -> Result<(i32, ParentIo), SpawnError> {
    exec.stdio = io.stdio;
    let (go_r, go_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let ns_raw: Vec<(RawFd, c_int)> = ns.0.iter().map(|(f, k)| (f.as_raw_fd(), *k)).collect();
    let mut keep: Vec<RawFd> = vec![0, 1, 2, go_r.as_raw_fd(), status_w.as_raw_fd()];
    keep.extend(io.stdio.fds());
    keep.extend(PtyRequest::fds(io.pty));
    keep.extend(ns_raw.iter().map(|(fd, _)| *fd));
    keep.sort_unstable();
    keep.dedup();
    let helper = child::raw_clone(0)
        .map_err(|e| sys("clone of the exec helper")(std::io::Error::from_raw_os_error(e)))?;
    if helper == 0 {
        exec_helper(
            exec,
            &ns_raw,
            io.pty,
            &keep,
            go_r.as_raw_fd(),
            status_w.as_raw_fd(),
        );
    }
    register_helper(helper);
    drop(go_r);
    drop(status_w);
    drop(io.child);
    let mut status = File::from(status_r);
    let pid = match read_status(&mut status)? {
        Some(StatusMsg::Pid(pid)) => pid,
        Some(msg) => return Err(child_error(msg)),
        None => return Err(SpawnError::Vanished("reporting the process id")),
    };
    let parent = match io.parent.finish() {
        Ok(parent) => parent,
        Err(e) => {
            // SAFETY: kill has no memory effects; the pid is our child (CLONE_PARENT).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
    };
    if let Err(e) = register(pid) {
        // SAFETY: kill has no memory effects; the pid is our child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Err(SpawnError::Register(e));
    }
    write_go(&go_w)?;
    drop(go_w);
    wait_exec(&mut status)?;
    Ok((pid, parent))
}

fn exec_helper(
    exec: &ExecPlan,
    ns: &[(RawFd, c_int)],
    pty: Option<PtyRequest>,
    keep: &[RawFd],
    go: RawFd,
    status: RawFd,
) -> ! {
    let run = || -> Result<i32, child::Fail> {
        child::close_all_except(keep)?;
        child::join_namespaces(ns)?;
        // In the container's mount namespace now: its /dev/ptmx is the container's devpts.
        if let Some(p) = pty {
            child::take_pty(p.socket, p.fallback, p.size)?;
        }
        child::raw_clone(libc::CLONE_PARENT as c_ulong)
            .map_err(|e| child::Fail::new(child::Stage::Clone, e))
    };
    match run() {
        Err(f) => child::die(status, f),
        Ok(0) => {
            // The process itself: wait for registration, then become the program.
            match child::wait_byte(go) {
                Ok(true) => child::die(status, child::exec_process(exec, status)),
                // SAFETY: the agent gave up; leave without destructors.
                Ok(false) => unsafe { libc::_exit(1) },
                Err(f) => child::die(status, f),
            }
        }
        Ok(pid) => {
            child::send_status(status, StatusMsg::Pid(pid));
            // SAFETY: the helper's work is done; leave without destructors.
            unsafe { libc::_exit(0) }
        }
    }
}
