//! The agent's state: containers, their processes, the pid table the reaper feeds, exit and OOM
//! reporting, and event subscribers.
//!
//! Exit reporting rule: a process's exit is reported (event + `WaitProcess` answers) once it has
//! been reaped *and* its output streams are drained into their connections (or, if a stream was
//! never attached, its pipe reached end of file). A process whose output pipe is held open by a
//! background child gets reported after [`DRAIN_GRACE`] anyway.
//!
//! The container operations themselves (create, exec, ...) are in [`crate::container`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kiln_protocol::{AgentMessage, ErrorKind, ErrorReply, Event, ExitStatus, StdioStream};

use crate::cgroup::Cgroup;
use crate::spawn::plan::NamespaceSet;
use crate::spawn::InitHandle;
use crate::stdio::{OutStream, StdinSlot};

/// How long an exit waits for output pipes still held open by other processes.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// Exits of pids nobody claimed yet (orphans, or a child that died before its registration)
/// are remembered up to this many, for at most [`UNCLAIMED_TTL`]: registration follows a clone
/// within milliseconds, and a stale entry could otherwise match a reused pid.
const UNCLAIMED_LIMIT: usize = 1024;
const UNCLAIMED_TTL: Duration = Duration::from_secs(5);

/// Where the agent finds things.
#[derive(Debug, Clone)]
pub struct Options {
    /// The guest's `/` as this agent sees it (`/` as PID 1, a directory in tests).
    pub image_root: PathBuf,
    /// Parent of the per-container cgroups.
    pub cgroup_base: PathBuf,
    /// Running as PID 1 of a VM.
    pub pid1: bool,
}

/// Who a pid belongs to.
enum Owner {
    /// An exec helper: reaped silently.
    Helper,
    /// A container process.
    Process { container: String, exec: String },
}

/// A process of a container.
pub struct Process {
    pub pid: i32,
    /// Still being set up: stdio not installed yet, so the exit cannot be reported.
    pub spawning: bool,
    pub stdin: Option<Arc<StdinSlot>>,
    pub outputs: Vec<(StdioStream, Arc<OutStream>)>,
    pub pty_master: Option<Arc<OwnedFd>>,
    pub reaped: Option<ExitStatus>,
    pub reported: Option<ExitStatus>,
}

impl Process {
    fn new(pid: i32) -> Self {
        Process {
            pid,
            spawning: true,
            stdin: None,
            outputs: Vec::new(),
            pty_master: None,
            reaped: None,
            reported: None,
        }
    }
}

/// A container.
pub struct Container {
    pub cgroup: Arc<Cgroup>,
    pub ns: NamespaceSet,
    pub init_pid: i32,
    /// Present between create and start.
    pub start: Option<InitHandle>,
    pub started: bool,
    pub processes: HashMap<String, Process>,
    /// The container's seccomp filter, also installed in exec'd processes (as runc does).
    pub seccomp: Option<Arc<crate::spawn::seccomp::SeccompProgram>>,
    oom_seen: u64,
}

impl Container {
    /// A container whose main process is `init_pid` (registered separately).
    pub fn new(cgroup: Arc<Cgroup>, ns: NamespaceSet, init_pid: i32) -> Self {
        let oom_seen = cgroup.oom_kills();
        Container {
            cgroup,
            ns,
            init_pid,
            start: None,
            started: false,
            processes: HashMap::new(),
            seccomp: None,
            oom_seen,
        }
    }

    /// Whether every process has exited and been reported.
    pub fn all_exited(&self) -> bool {
        self.processes.values().all(|p| p.reported.is_some())
    }
}

/// Mutable agent state behind one lock.
#[derive(Default)]
pub struct State {
    pub containers: HashMap<String, Container>,
    /// Ids being created (not yet in `containers`).
    pub reserved: HashSet<String>,
    pids: HashMap<i32, Owner>,
    unclaimed: VecDeque<(i32, ExitStatus, Instant)>,
}

/// The agent.
pub struct Agent {
    pub opts: Options,
    state: Mutex<State>,
    exited: Condvar,
    subscribers: Mutex<Vec<Sender<AgentMessage>>>,
    me: Weak<Agent>,
}

/// Shorthand for an error reply.
pub fn err(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(kind, message)
}

/// The `NotFound` reply for a container.
pub fn no_container(id: &str) -> ErrorReply {
    err(ErrorKind::NotFound, format!("no container `{id}`"))
}

/// The `NotFound` reply for a process.
pub fn no_process(id: &str, exec: &str) -> ErrorReply {
    err(
        ErrorKind::NotFound,
        format!("no process `{exec}` in container `{id}`"),
    )
}

impl Agent {
    /// A new agent.
    pub fn new(opts: Options) -> Arc<Agent> {
        Arc::new_cyclic(|me| Agent {
            opts,
            state: Mutex::new(State::default()),
            exited: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
            me: me.clone(),
        })
    }

    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes a control connection to events.
    pub fn subscribe(&self, tx: Sender<AgentMessage>) {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
    }

    fn broadcast(&self, event: Event) {
        log::debug!("event {event:?}");
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| tx.send(AgentMessage::Event(event.clone())).is_ok());
    }

    /// Reserves `exec` in `container` (a placeholder without pid until it is registered).
    /// Returns false when the id is taken.
    pub fn reserve_process(&self, st: &mut State, container: &str, exec: &str) -> bool {
        match st.containers.get_mut(container) {
            Some(c) if !c.processes.contains_key(exec) => {
                c.processes.insert(exec.to_string(), Process::new(0));
                true
            }
            _ => false,
        }
    }

    /// Records that `pid` belongs to a container process (call before it can exec).
    pub fn register_process(&self, container: &str, exec: &str, pid: i32) {
        let mut st = self.lock();
        if let Some(c) = st.containers.get_mut(container) {
            c.processes.insert(exec.to_string(), Process::new(pid));
        }
        st.pids.insert(
            pid,
            Owner::Process {
                container: container.to_string(),
                exec: exec.to_string(),
            },
        );
        self.claim_unclaimed(&mut st, pid);
    }

    /// Records an exec helper pid (reaped without a report).
    pub fn register_helper(&self, pid: i32) {
        let mut st = self.lock();
        st.pids.insert(pid, Owner::Helper);
        self.claim_unclaimed(&mut st, pid);
    }

    fn claim_unclaimed(&self, st: &mut State, pid: i32) {
        expire_unclaimed(st);
        if let Some(i) = st.unclaimed.iter().position(|(p, _, _)| *p == pid) {
            if let Some((_, status, _)) = st.unclaimed.remove(i) {
                self.reaped_locked(st, pid, status);
            }
        }
    }

    /// Installs a process's stdio once it runs, making its exit reportable.
    pub fn install_stdio(
        &self,
        container: &str,
        exec: &str,
        stdin: Arc<StdinSlot>,
        outputs: Vec<(StdioStream, Arc<OutStream>)>,
        pty_master: Option<Arc<OwnedFd>>,
    ) {
        let mut st = self.lock();
        if let Some(p) = st
            .containers
            .get_mut(container)
            .and_then(|c| c.processes.get_mut(exec))
        {
            p.stdin = Some(stdin);
            p.outputs = outputs;
            p.pty_master = pty_master;
            p.spawning = false;
        }
        self.try_report(&mut st, container, exec, false);
    }

    /// Forgets a process whose spawn failed: its exit, if any, is not reported.
    pub fn forget_process(&self, container: &str, exec: &str, pid: i32) {
        let mut st = self.lock();
        if let Some(c) = st.containers.get_mut(container) {
            c.processes.remove(exec);
        }
        if pid > 0 && st.pids.contains_key(&pid) {
            st.pids.insert(pid, Owner::Helper);
        }
        self.exited.notify_all();
    }

    /// Called by the reaper for every reaped child.
    pub fn on_reaped(&self, pid: i32, status: ExitStatus) {
        let mut st = self.lock();
        self.reaped_locked(&mut st, pid, status);
    }

    fn reaped_locked(&self, st: &mut State, pid: i32, status: ExitStatus) {
        match st.pids.remove(&pid) {
            None => {
                expire_unclaimed(st);
                if st.unclaimed.len() >= UNCLAIMED_LIMIT {
                    st.unclaimed.pop_front();
                }
                st.unclaimed.push_back((pid, status, Instant::now()));
            }
            Some(Owner::Helper) => {}
            Some(Owner::Process { container, exec }) => {
                log::debug!("reaped {pid} ({container}/{exec}): {status:?}");
                if let Some(p) = st
                    .containers
                    .get_mut(&container)
                    .and_then(|c| c.processes.get_mut(&exec))
                {
                    p.reaped = Some(status);
                }
                self.check_oom(st, &container);
                if !self.try_report(st, &container, &exec, false) {
                    self.start_grace_timer(container, exec);
                }
            }
        }
    }

    fn start_grace_timer(&self, container: String, exec: String) {
        let me = self.me.clone();
        let _ = std::thread::Builder::new()
            .name("drain-grace".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                std::thread::sleep(DRAIN_GRACE);
                if let Some(agent) = me.upgrade() {
                    let mut st = agent.lock();
                    agent.try_report(&mut st, &container, &exec, true);
                }
            });
    }

    /// Called when an output stream of a process is drained.
    pub fn on_stream_done(&self, container: &str, exec: &str) {
        let mut st = self.lock();
        self.try_report(&mut st, container, exec, false);
    }

    /// Reports the exit if the process is reaped and drained (or `force`). Returns true when the
    /// exit is (or already was) reported.
    fn try_report(&self, st: &mut State, container: &str, exec: &str, force: bool) -> bool {
        let Some(p) = st
            .containers
            .get_mut(container)
            .and_then(|c| c.processes.get_mut(exec))
        else {
            return true;
        };
        if p.reported.is_some() {
            return true;
        }
        let Some(status) = p.reaped else {
            return false;
        };
        let drained = !p.spawning && p.outputs.iter().all(|(_, s)| s.is_done());
        if p.spawning || !(drained || force) {
            return false;
        }
        p.reported = Some(status);
        self.exited.notify_all();
        self.broadcast(Event::ProcessExited {
            container_id: container.to_string(),
            exec_id: exec.to_string(),
            status,
        });
        true
    }

    /// Emits `OomKilled` when the container's `oom_kill` counter went up.
    fn check_oom(&self, st: &mut State, container: &str) {
        let Some(c) = st.containers.get_mut(container) else {
            return;
        };
        let now = c.cgroup.oom_kills();
        if now > c.oom_seen {
            c.oom_seen = now;
            self.broadcast(Event::OomKilled {
                container_id: container.to_string(),
            });
        }
    }

    /// Checks every container for OOM kills (run periodically: a kill may hit a process that is
    /// not one of ours, e.g. a shell's child).
    pub fn poll_oom(&self) {
        let mut st = self.lock();
        let ids: Vec<String> = st.containers.keys().cloned().collect();
        for id in ids {
            self.check_oom(&mut st, &id);
        }
    }

    /// Blocks until the process's exit is reported.
    pub fn wait(&self, container: &str, exec: &str) -> Result<ExitStatus, ErrorReply> {
        let mut st = self.lock();
        loop {
            let c = st
                .containers
                .get(container)
                .ok_or_else(|| no_container(container))?;
            let p = c
                .processes
                .get(exec)
                .ok_or_else(|| no_process(container, exec))?;
            if let Some(status) = p.reported {
                return Ok(status);
            }
            st = self.exited.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits up to `timeout` until every process of the container is reported.
    pub fn wait_all_exited(&self, container: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            match st.containers.get(container) {
                None => return true,
                Some(c) if c.all_exited() => return true,
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .exited
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A callback for [`OutStream`] that reports the process when its output is drained.
    pub fn stream_done_callback(&self, container: &str, exec: &str) -> Box<dyn Fn() + Send + Sync> {
        let me = self.me.clone();
        let (container, exec) = (container.to_string(), exec.to_string());
        Box::new(move || {
            if let Some(agent) = me.upgrade() {
                agent.on_stream_done(&container, &exec);
            }
        })
    }
}

/// Drops remembered exits older than [`UNCLAIMED_TTL`] (the queue is in time order).
fn expire_unclaimed(st: &mut State) {
    while st
        .unclaimed
        .front()
        .is_some_and(|(_, _, at)| at.elapsed() > UNCLAIMED_TTL)
    {
        st.unclaimed.pop_front();
    }
}

/// Converts a `waitpid` status.
pub fn exit_status(raw: i32) -> Option<ExitStatus> {
    if libc::WIFEXITED(raw) {
        Some(ExitStatus::Exited(libc::WEXITSTATUS(raw)))
    } else if libc::WIFSIGNALED(raw) {
        Some(ExitStatus::Signaled(libc::WTERMSIG(raw)))
    } else {
        None
    }
}

/// Reaps every child forever on the calling thread, which must have SIGCHLD blocked (as must
/// every other thread, so the signal stays pending for the signalfd).
pub fn reap_forever(agent: &Agent) -> std::io::Result<()> {
    let mut mask = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset/sigaddset initialise the set; signalfd reads it.
    let sfd = unsafe {
        libc::sigemptyset(mask.as_mut_ptr());
        libc::sigaddset(mask.as_mut_ptr(), libc::SIGCHLD);
        libc::signalfd(-1, mask.as_ptr(), libc::SFD_CLOEXEC)
    };
    if sfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    loop {
        reap_all(agent);
        // SAFETY: reads one siginfo into a buffer of its size; blocks until SIGCHLD is pending.
        let n = unsafe { libc::read(sfd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn reap_all(agent: &Agent) {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes the status into a local integer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG | libc::__WALL) };
        if pid <= 0 {
            return;
        }
        if let Some(status) = exit_status(raw) {
            agent.on_reaped(pid, status);
        }
    }
}

/// Blocks SIGCHLD on the calling thread (call before spawning any thread, so all inherit it).
pub fn block_sigchld() -> std::io::Result<()> {
    let mut mask = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: initialises a signal set and blocks it for this thread.
    let rc = unsafe {
        libc::sigemptyset(mask.as_mut_ptr());
        libc::sigaddset(mask.as_mut_ptr(), libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, mask.as_ptr(), std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
