//! Container operations of the agent: create, start, exec, signal, stdio attach, resize, stats,
//! remove. Each checks its untrusted arguments, then drives [`crate::spawn`] and updates the
//! [`Agent`] state.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::codec;
use kiln_protocol::{
    AgentMessage, Attach, ContainerSpec, ContainerStats, ErrorKind, ErrorReply, ProcessSpec,
    StdioStream, TtySize, INIT_EXEC_ID,
};

use crate::agent::{err, no_container, no_process, Agent, Container};
use crate::cgroup::Cgroup;
use crate::spawn::plan::{ExecPlan, NamespaceSet, PlanError, RootPlan};
use crate::spawn::seccomp::SeccompProgram;
use crate::spawn::{self, IoPair, NamespaceFds, ParentIo, SpawnError};
use crate::stdio::{OutStream, StdinSlot};

/// Most containers one agent runs at a time.
const MAX_CONTAINERS: usize = 256;
/// Most processes (main + exec'd, including exited ones not yet removed) per container.
const MAX_PROCESSES: usize = 1024;

fn invalid(e: PlanError) -> ErrorReply {
    err(ErrorKind::InvalidArgument, e.to_string())
}

fn spawn_failed(what: &str, e: SpawnError) -> ErrorReply {
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    err(ErrorKind::Io, msg)
}

/// Checks a container or exec id: 1..=128 bytes of `[A-Za-z0-9_.-]`, not `.`/`..`.
pub fn check_id(what: &str, id: &str) -> Result<(), ErrorReply> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorKind::InvalidArgument,
            format!("{what} `{id}` must be 1-128 characters of [A-Za-z0-9_.-]"),
        ))
    }
}

impl Agent {
    /// Starts pump threads for a new process's output and installs its stdio.
    fn install_io(&self, container: &str, exec: &str, io: ParentIo) -> Result<(), ErrorReply> {
        let io_err = |e: std::io::Error| err(ErrorKind::Io, format!("starting stdio threads: {e}"));
        let done = || self.stream_done_callback(container, exec);
        match io {
            ParentIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let out =
                    OutStream::start(format!("{exec}-out"), stdout, done()).map_err(io_err)?;
                let errs =
                    OutStream::start(format!("{exec}-err"), stderr, done()).map_err(io_err)?;
                self.install_stdio(
                    container,
                    exec,
                    StdinSlot::new(stdin, false),
                    vec![(StdioStream::Stdout, out), (StdioStream::Stderr, errs)],
                    None,
                );
            }
            ParentIo::Pty { master } => {
                let dup = |m: &OwnedFd| {
                    m.try_clone()
                        .map_err(|e| err(ErrorKind::Io, format!("dup of pty master: {e}")))
                };
                let input = dup(&master)?;
                let output = dup(&master)?;
                let out =
                    OutStream::start(format!("{exec}-pty"), output, done()).map_err(io_err)?;
                self.install_stdio(
                    container,
                    exec,
                    StdinSlot::new(input, true),
                    vec![(StdioStream::Pty, out)],
                    Some(Arc::new(master)),
                );
            }
        }
        Ok(())
    }

    /// `CreateContainer`: cgroup, namespaces, root; the main process waits for `StartContainer`.
    pub fn create_container(&self, id: &str, spec: &ContainerSpec) -> Result<u32, ErrorReply> {
        check_id("container id", id)?;
        {
            let mut st = self.lock();
            if st.containers.contains_key(id) || st.reserved.contains(id) {
                return Err(err(
                    ErrorKind::AlreadyExists,
                    format!("container `{id}` already exists"),
                ));
            }
            if st.containers.len() + st.reserved.len() >= MAX_CONTAINERS {
                return Err(err(
                    ErrorKind::ResourceExhausted,
                    format!("at most {MAX_CONTAINERS} containers"),
                ));
            }
            st.reserved.insert(id.to_string());
        }
        let result = self.create_reserved(id, spec);
        let mut st = self.lock();
        st.reserved.remove(id);
        if result.is_err() {
            st.containers.remove(id);
        }
        result
    }

    fn create_reserved(&self, id: &str, spec: &ContainerSpec) -> Result<u32, ErrorReply> {
        let (ns, warnings) = NamespaceSet::from_spec(spec).map_err(invalid)?;
        for w in warnings {
            log::warn!("container {id}: {w}");
        }
        let root = RootPlan::new(spec, &self.opts.image_root).map_err(invalid)?;
        let mut exec = ExecPlan::new(&spec.process).map_err(invalid)?;
        exec.seccomp = match &spec.seccomp {
            None => None,
            Some(profile) => {
                let filter = SeccompProgram::compile(profile)
                    .map_err(|e| err(ErrorKind::InvalidArgument, e.to_string()))?;
                for w in &filter.warnings {
                    log::warn!("container {id}: {w}");
                }
                if !filter.unknown_names.is_empty() {
                    log::warn!(
                        "container {id}: seccomp: {} syscall names unknown on x86_64 skipped: {}",
                        filter.unknown_names.len(),
                        filter.unknown_names.join(" ")
                    );
                }
                log::info!(
                    "container {id}: seccomp filter of {} instructions",
                    filter.instructions()
                );
                Some(Arc::new(filter))
            }
        };
        let cgroup = Cgroup::create(&self.opts.cgroup_base, id)
            .map_err(|e| err(ErrorKind::Io, e.to_string()))?;
        let cgroup = Arc::new(cgroup);
        if let Err(e) = cgroup.apply(&spec.linux.resources) {
            let _ = cgroup.remove();
            return Err(err(ErrorKind::InvalidArgument, e.to_string()));
        }
        let io = IoPair::new(exec.terminal, spec.process.console_size)
            .map_err(|e| spawn_failed("creating stdio", e))?;
        let seccomp = exec.seccomp.clone();
        let register = |pid: i32| -> Result<(), String> {
            let mut container = Container::new(cgroup.clone(), ns, pid);
            container.seccomp = seccomp.clone();
            self.lock().containers.insert(id.to_string(), container);
            self.register_process(id, INIT_EXEC_ID, pid);
            cgroup.add(pid).map_err(|e| e.to_string())
        };
        match spawn::spawn_container_init(&root, &mut exec, ns, io, register) {
            Ok((handle, parent_io)) => {
                let pid = handle.pid;
                if let Some(c) = self.lock().containers.get_mut(id) {
                    c.start = Some(handle);
                }
                self.install_io(id, INIT_EXEC_ID, parent_io)?;
                log::info!("container {id} created, main pid {pid}");
                Ok(pid as u32)
            }
            Err(e) => {
                let pid = self.lock().containers.get(id).map(|c| c.init_pid);
                if let Some(pid) = pid {
                    self.forget_process(id, INIT_EXEC_ID, pid);
                }
                let _ = cgroup.remove();
                Err(spawn_failed(&format!("creating container `{id}`"), e))
            }
        }
    }

    /// `StartContainer`: the main process execs its program.
    pub fn start_container(&self, id: &str) -> Result<(), ErrorReply> {
        let handle = {
            let mut st = self.lock();
            let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
            if c.started {
                return Err(err(
                    ErrorKind::InvalidState,
                    format!("container `{id}` was already started"),
                ));
            }
            c.started = true;
            c.start.take()
        };
        let handle = handle.ok_or_else(|| {
            err(
                ErrorKind::InvalidState,
                format!("container `{id}` is not waiting to start"),
            )
        })?;
        handle
            .start()
            .map_err(|e| spawn_failed(&format!("starting container `{id}`"), e))
    }

    /// `ExecProcess`: a further process in the container's namespaces and cgroup.
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        spec: &ProcessSpec,
    ) -> Result<u32, ErrorReply> {
        check_id("exec id", exec_id)?;
        let mut exec = ExecPlan::new(spec).map_err(invalid)?;
        let (ns, init_pid, cgroup) = {
            let mut st = self.lock();
            let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
            // A created container's namespaces and cgroup exist already (its main process
            // waits for StartContainer), so exec works before start, as in runc; the
            // createContainer and startContainer hooks run that way.
            if c.processes
                .get(INIT_EXEC_ID)
                .is_some_and(|p| p.reaped.is_some())
            {
                return Err(err(
                    ErrorKind::InvalidState,
                    format!("container `{id}` has stopped"),
                ));
            }
            if c.processes.len() >= MAX_PROCESSES {
                return Err(err(
                    ErrorKind::ResourceExhausted,
                    format!("at most {MAX_PROCESSES} processes per container"),
                ));
            }
            let found = (c.ns, c.init_pid, c.cgroup.clone());
            exec.seccomp = c.seccomp.clone();
            if !self.reserve_process(&mut st, id, exec_id) {
                return Err(err(
                    ErrorKind::AlreadyExists,
                    format!("process `{exec_id}` already exists in container `{id}`"),
                ));
            }
            found
        };
        let result = self.exec_reserved(id, exec_id, spec, exec, ns, init_pid, &cgroup);
        if result.is_err() {
            // Drops the placeholder (or the registered process whose spawn failed).
            let pid = {
                let st = self.lock();
                st.containers
                    .get(id)
                    .and_then(|c| c.processes.get(exec_id))
                    .map(|p| p.pid)
            };
            self.forget_process(id, exec_id, pid.unwrap_or(0));
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn exec_reserved(
        &self,
        id: &str,
        exec_id: &str,
        spec: &ProcessSpec,
        mut exec: ExecPlan,
        ns: NamespaceSet,
        init_pid: i32,
        cgroup: &Cgroup,
    ) -> Result<u32, ErrorReply> {
        let ns_fds = NamespaceFds::open(init_pid, ns)
            .map_err(|e| spawn_failed(&format!("joining container `{id}`"), e))?;
        let io = IoPair::new(exec.terminal, spec.console_size)
            .map_err(|e| spawn_failed("creating stdio", e))?;
        let register = |pid: i32| -> Result<(), String> {
            if !self.lock().containers.contains_key(id) {
                return Err(format!("container `{id}` was removed"));
            }
            self.register_process(id, exec_id, pid);
            cgroup.add(pid).map_err(|e| e.to_string())
        };
        let (pid, parent_io) = spawn::spawn_exec(
            &ns_fds,
            &mut exec,
            io,
            |p| self.register_helper(p),
            register,
        )
        .map_err(|e| spawn_failed(&format!("exec `{exec_id}` in `{id}`"), e))?;
        self.install_io(id, exec_id, parent_io)?;
        log::info!("container {id}: exec {exec_id} pid {pid}");
        Ok(pid as u32)
    }

    /// `SignalProcess`.
    pub fn signal_process(&self, id: &str, exec_id: &str, signal: i32) -> Result<(), ErrorReply> {
        if !(1..=64).contains(&signal) {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("signal {signal} outside 1..=64"),
            ));
        }
        let st = self.lock();
        let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
        let p = c
            .processes
            .get(exec_id)
            .ok_or_else(|| no_process(id, exec_id))?;
        if p.reaped.is_some() {
            return Err(err(
                ErrorKind::InvalidState,
                format!("process `{exec_id}` in `{id}` has exited"),
            ));
        }
        if p.pid <= 0 {
            return Err(err(
                ErrorKind::InvalidState,
                format!("process `{exec_id}` in `{id}` is still being created"),
            ));
        }
        // Under the state lock the pid cannot be reaped and reused meanwhile.
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(p.pid, signal) } < 0 {
            return Err(err(
                ErrorKind::Io,
                format!(
                    "kill({}, {signal}): {}",
                    p.pid,
                    std::io::Error::last_os_error()
                ),
            ));
        }
        Ok(())
    }

    /// `SignalContainer`: `signal` to every process of the container, as `runc kill --all`:
    /// the pids in its cgroup, the processes the agent started in it, and, with a pid namespace,
    /// every process in that namespace (found by the namespace link of `/proc/<pid>/ns/pid`).
    /// SIGKILL also goes through `cgroup.kill`, which catches processes forked meanwhile. Like
    /// runc, a pid namespace's init ignores signals it has no handler for (SIGKILL aside).
    pub fn signal_container(&self, id: &str, signal: i32) -> Result<(), ErrorReply> {
        if !(1..=64).contains(&signal) {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("signal {signal} outside 1..=64"),
            ));
        }
        let (cgroup, tracked, pid_ns) = {
            let st = self.lock();
            let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
            let live = |p: &&crate::agent::Process| p.reaped.is_none() && p.pid > 0;
            let tracked: Vec<i32> = c.processes.values().filter(live).map(|p| p.pid).collect();
            // The main process is alive (not reaped, so its pid is not reused): its pid
            // namespace link names the container's namespace.
            let init_alive = c.processes.get(INIT_EXEC_ID).is_some_and(|p| live(&p));
            let pid_ns = (c.ns.has(libc::CLONE_NEWPID) && init_alive)
                .then(|| std::fs::read_link(format!("/proc/{}/ns/pid", c.init_pid)).ok())
                .flatten();
            (c.cgroup.clone(), tracked, pid_ns)
        };
        if signal == libc::SIGKILL {
            cgroup.kill_all();
        }
        let mut pids = cgroup.pids();
        pids.extend(tracked);
        if let Some(ns) = pid_ns {
            pids.extend(pids_in_pid_namespace(&ns));
        }
        pids.sort_unstable();
        pids.dedup();
        // SAFETY: getpid has no memory effects.
        let me = unsafe { libc::getpid() };
        let mut signalled = 0usize;
        for pid in pids.into_iter().filter(|&p| p > 1 && p != me) {
            // SAFETY: kill has no memory effects. A pid that exited since it was listed gets
            // ESRCH, which is fine (runc has the same window).
            if unsafe { libc::kill(pid, signal) } == 0 {
                signalled += 1;
            }
        }
        log::info!("container {id}: signal {signal} sent to {signalled} processes");
        Ok(())
    }

    /// `CloseStdin`.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ErrorReply> {
        let st = self.lock();
        let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
        let p = c
            .processes
            .get(exec_id)
            .ok_or_else(|| no_process(id, exec_id))?;
        if let Some(stdin) = &p.stdin {
            stdin.close();
        }
        Ok(())
    }

    /// `ResizeTty`.
    pub fn resize_tty(&self, id: &str, exec_id: &str, size: TtySize) -> Result<(), ErrorReply> {
        let st = self.lock();
        let c = st.containers.get(id).ok_or_else(|| no_container(id))?;
        let p = c
            .processes
            .get(exec_id)
            .ok_or_else(|| no_process(id, exec_id))?;
        let master = p.pty_master.as_ref().ok_or_else(|| {
            err(
                ErrorKind::InvalidState,
                format!("process `{exec_id}` in `{id}` has no terminal"),
            )
        })?;
        crate::pty::resize(master, size).map_err(|e| err(ErrorKind::Io, format!("TIOCSWINSZ: {e}")))
    }

    /// `Stats`.
    pub fn stats(&self, id: &str) -> Result<ContainerStats, ErrorReply> {
        let cgroup = {
            let st = self.lock();
            st.containers
                .get(id)
                .ok_or_else(|| no_container(id))?
                .cgroup
                .clone()
        };
        Ok(cgroup.stats())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str, force: bool) -> Result<(), ErrorReply> {
        let (cgroup, handle) = {
            let mut st = self.lock();
            let c = st.containers.get_mut(id).ok_or_else(|| no_container(id))?;
            let waiting = c.start.is_some();
            if !force && !waiting && !c.all_exited() {
                return Err(err(
                    ErrorKind::InvalidState,
                    format!("container `{id}` still has running processes (use force)"),
                ));
            }
            (c.cgroup.clone(), c.start.take())
        };
        // A never-started main process exits when its start pipe closes.
        drop(handle);
        cgroup.kill_all();
        if !self.wait_all_exited(id, Duration::from_secs(10)) {
            return Err(err(
                ErrorKind::Io,
                format!("processes of container `{id}` did not exit within 10 s"),
            ));
        }
        self.lock().containers.remove(id);
        cgroup
            .remove()
            .map_err(|e| err(ErrorKind::Io, e.to_string()))?;
        log::info!("container {id} removed");
        Ok(())
    }

    /// Kills every container's processes (for shutdown) and waits briefly for them.
    pub fn kill_everything(&self) {
        let ids: Vec<(String, Arc<Cgroup>)> = {
            let mut st = self.lock();
            st.containers
                .iter_mut()
                .map(|(id, c)| {
                    drop(c.start.take());
                    (id.clone(), c.cgroup.clone())
                })
                .collect()
        };
        for (_, cg) in &ids {
            cg.kill_all();
        }
        for (id, _) in &ids {
            self.wait_all_exited(id, Duration::from_secs(2));
        }
    }

    /// Binds a stdio connection to a process's stream: answers `AttachOk` (or an `Error` frame)
    /// on `conn`, then hands it to the stream.
    pub fn attach(&self, a: &Attach, mut conn: File) -> Result<(), ErrorReply> {
        let looked_up = self.lookup_stream(a);
        let (stdin, output) = match looked_up {
            Ok(v) => v,
            Err(e) => {
                let _ = codec::write_frame(&mut conn, &AgentMessage::Error(e.clone()));
                return Err(e);
            }
        };
        // The stream itself sends AttachOk under its own lock (a concurrent second attach of the
        // same stream passes the check above too, but only one of them is told OK); a refusal
        // gets an Error frame on this duplicate of the connection.
        let reply = conn
            .try_clone()
            .map_err(|e| err(ErrorKind::Io, format!("dup of connection: {e}")))?;
        let greet = |c: &mut File| {
            codec::write_frame(c, &AgentMessage::AttachOk)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        let attach_err = |e: crate::stdio::AttachError| {
            err(ErrorKind::InvalidState, format!("{:?}: {e}", a.stream))
        };
        let attached = match (stdin, output) {
            (Some(stdin), None) => stdin.attach_greeted(conn, greet),
            (None, Some(output)) => output.attach_greeted(conn, greet),
            (Some(stdin), Some(output)) => {
                let input = conn
                    .try_clone()
                    .map_err(|e| err(ErrorKind::Io, format!("dup of connection: {e}")))?;
                match output.attach_greeted(conn, greet) {
                    // Raw bytes flow after AttachOk: a late stdin failure just closes it.
                    Ok(()) => return stdin.attach(input).map_err(attach_err),
                    Err(e) => Err(e),
                }
            }
            (None, None) => greet(&mut { conn }).map_err(crate::stdio::AttachError::Greeting),
        };
        attached.map_err(|e| {
            let e = attach_err(e);
            let mut reply = reply;
            let _ = codec::write_frame(&mut reply, &AgentMessage::Error(e.clone()));
            e
        })
    }

    /// The stdin slot and/or output stream an Attach names.
    #[allow(clippy::type_complexity)]
    fn lookup_stream(
        &self,
        a: &Attach,
    ) -> Result<(Option<Arc<StdinSlot>>, Option<Arc<OutStream>>), ErrorReply> {
        let st = self.lock();
        let c = st
            .containers
            .get(&a.container_id)
            .ok_or_else(|| no_container(&a.container_id))?;
        let p = c
            .processes
            .get(&a.exec_id)
            .ok_or_else(|| no_process(&a.container_id, &a.exec_id))?;
        if p.spawning {
            return Err(err(
                ErrorKind::InvalidState,
                "the process is still being created",
            ));
        }
        let terminal = p.pty_master.is_some();
        let wrong = || {
            err(
                ErrorKind::InvalidArgument,
                format!(
                    "stream {:?} does not exist for this process ({})",
                    a.stream,
                    if terminal {
                        "it has a terminal: use Pty"
                    } else {
                        "it has no terminal: use Stdin/Stdout/Stderr"
                    }
                ),
            )
        };
        let output = |s: StdioStream| {
            p.outputs
                .iter()
                .find(|(k, _)| *k == s)
                .map(|(_, o)| o.clone())
                .ok_or_else(wrong)
        };
        let taken = || {
            err(
                ErrorKind::InvalidState,
                format!("stream {:?} is already attached or closed", a.stream),
            )
        };
        let stdin_free = p.stdin.as_ref().is_some_and(|s| !s.is_taken());
        let output_free =
            |s: StdioStream| p.outputs.iter().any(|(k, o)| *k == s && !o.is_attached());
        let free = match a.stream {
            StdioStream::Stdin => stdin_free,
            StdioStream::Pty => stdin_free && output_free(StdioStream::Pty),
            other => output_free(other),
        };
        let known = match a.stream {
            StdioStream::Stdin => !terminal,
            StdioStream::Pty => terminal,
            _ => !terminal,
        };
        if known && !free {
            return Err(taken());
        }
        match a.stream {
            StdioStream::Stdin if !terminal => Ok((Some(p.stdin.clone().ok_or_else(wrong)?), None)),
            StdioStream::Stdout | StdioStream::Stderr if !terminal => {
                Ok((None, Some(output(a.stream)?)))
            }
            StdioStream::Pty if terminal => Ok((
                Some(p.stdin.clone().ok_or_else(wrong)?),
                Some(output(StdioStream::Pty)?),
            )),
            _ => Err(wrong()),
        }
    }
}

/// Pids (in the agent's pid namespace) of the processes whose `/proc/<pid>/ns/pid` link is `ns`
/// (`pid:[inode]`). Bounded by the number of processes of the guest.
fn pids_in_pid_namespace(ns: &std::path::Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|link| link == ns)
        })
        .collect()
}
