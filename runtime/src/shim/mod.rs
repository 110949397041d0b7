//! The per-container shim: `kiln shim --id ID`, started by `kiln create` in a new session with
//! the client's stdio fds. It is the process podman/conmon and containerd watch (its pid is the
//! pid file's), so it exits with the container's exit code (or 128 + signal).
//!
//! It launches the VM ([`crate::sandbox`]), waits for the agent, creates the container without
//! starting it, wires stdio ([`session`]), records the state and tells `create` it is ready
//! through the pipe on fd [`READY_FD`]. `start`, `kill` and `exec` then talk to the agent
//! directly over the VM's vsock socket; the shim waits for the main process, records the exit
//! status, stops the VM and exits. [`exec`] is the same for one exec'd process.

pub mod exec;
mod relay;
pub mod session;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::{ContainerSpec, StdioStream, INIT_EXEC_ID};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bundle::VmSize;
use crate::config::{RuntimeConfig, VmmChoice};
use crate::console::ConsoleError;
use crate::sandbox::{Sandbox, SandboxError};
use crate::state::{process_start_time, StateError, StateStore, Status};

/// The fd on which a shim reports readiness to the `kiln` process that started it.
pub const READY_FD: i32 = 3;

/// How long a shim waits for the agent after launching the VM.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// [`AGENT_TIMEOUT`] for host-vmm on a PVM host: the agent is ready 33-60 s after spawn on an
/// idle or lightly loaded 2-core host (kernel code runs emulated), several times that under load.
pub const AGENT_TIMEOUT_PVM: Duration = Duration::from_secs(300);

/// Errors of the shims.
#[derive(Debug, Error)]
pub enum ShimError {
    /// State directory problems.
    #[error(transparent)]
    State(#[from] StateError),
    /// The shim's instructions are missing or unreadable.
    #[error("{path}: {problem}")]
    Request {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Launching or reaching the VM failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The agent refused or failed a call.
    #[error("{0}")]
    Agent(String, #[source] kiln_protocol::ClientError),
    /// Terminal set-up failed.
    #[error("terminal set-up failed")]
    Console(#[source] ConsoleError),
    /// A stdio stream could not be attached.
    #[error("attaching {0:?} failed")]
    Attach(
        StdioStream,
        #[source] kiln_protocol::transport::TransportError,
    ),
    /// Other stdio plumbing.
    #[error("stdio: {0}")]
    Stdio(String),
    /// Joining the container's host cgroup failed.
    #[error("cannot join the host cgroup")]
    Cgroup(#[source] crate::cgroups::CgroupError),
}

/// What `create` hands to the shim (`shim.json` in the state directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimRequest {
    /// The container as the agent needs it.
    pub spec: ContainerSpec,
    /// The container's disk image.
    pub disk: PathBuf,
    /// Extra disks (host directory binds), attached after `disk`.
    #[serde(default)]
    pub drives: Vec<crate::vm::Drive>,
    /// VM size.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The VMM chosen (`host-vmm`, `qemu`, ...).
    pub vmm: String,
    /// `--console-socket`.
    pub console_socket: Option<PathBuf>,
    /// A terminal process without a console socket uses the shim's own stdin/stdout
    /// (`kiln run -t` from a shell).
    #[serde(default)]
    pub own_terminal: bool,
}

/// Writes one line to the ready pipe and closes it.
pub fn report_ready(result: Result<(), String>) {
    // SAFETY: READY_FD was set up by the parent (dup2 before exec) and is owned by nobody else
    // in this process; it is taken over exactly once here.
    let fd = unsafe { OwnedFd::from_raw_fd(READY_FD) };
    let mut f = std::fs::File::from(fd);
    let line = match result {
        Ok(()) => "ok\n".to_string(),
        Err(msg) => format!("error: {}\n", msg.replace('\n', " ")),
    };
    let _ = f.write_all(line.as_bytes());
}

/// Runs the container shim; returns the exit code for the process.
pub fn run(root: &std::path::Path, id: &str, cfg: &RuntimeConfig) -> i32 {
    session::block_sigwinch();
    let store = StateStore::new(root);
    let mut sandbox = None;
    match setup(&store, id, cfg, &mut sandbox) {
        Ok(running) => {
            report_ready(Ok(()));
            let code = running.wait(&store, id);
            if let Some(mut s) = sandbox {
                s.kill();
            }
            code
        }
        Err(e) => {
            let msg = kiln_protocol::error_chain(&e);
            log::error!("shim for {id}: {msg}");
            if let Some(mut s) = sandbox {
                s.kill();
            }
            report_ready(Err(msg));
            1
        }
    }
}

/// A created container the shim watches.
struct Running {
    client: Arc<kiln_protocol::AgentClient>,
    outputs: Vec<std::thread::JoinHandle<u64>>,
}

fn setup(
    store: &StateStore,
    id: &str,
    cfg: &RuntimeConfig,
    sandbox_slot: &mut Option<Sandbox>,
) -> Result<Running, ShimError> {
    let dir = store.dir(id);
    let req_path = dir.join("shim.json");
    let bytes = std::fs::read(&req_path).map_err(|e| ShimError::Request {
        path: req_path.clone(),
        problem: e.to_string(),
    })?;
    let req: ShimRequest = serde_json::from_slice(&bytes).map_err(|e| ShimError::Request {
        path: req_path.clone(),
        problem: e.to_string(),
    })?;
    let choice: VmmChoice = req.vmm.parse().map_err(|e| ShimError::Request {
        path: req_path.clone(),
        problem: format!("{e}"),
    })?;
    let size = VmSize {
        memory_mib: req.memory_mib,
        vcpus: req.vcpus,
    };
    // Join the host cgroup before the VMM is spawned: every VM process inherits it.
    if let Some(cg) = crate::cgroups::HostCgroup::load(&dir) {
        cg.join(0).map_err(ShimError::Cgroup)?;
    }
    let sandbox = sandbox_slot.insert(Sandbox::launch(
        cfg,
        choice,
        &req.disk,
        &req.drives,
        size,
        &dir,
    )?);
    let agent_timeout = if sandbox.slow_boot() {
        log::info!(
            "host-vmm on a PVM host: waiting up to {} s for the agent",
            AGENT_TIMEOUT_PVM.as_secs()
        );
        AGENT_TIMEOUT_PVM
    } else {
        AGENT_TIMEOUT
    };
    let client = Arc::new(sandbox.connect_agent(agent_timeout)?);

    let plan = session::StdioPlan {
        terminal: req.spec.process.terminal,
        console_socket: req.console_socket.clone(),
        console_size: req.spec.process.console_size,
        controlling: true,
    };
    if plan.terminal && plan.console_socket.is_none() && !req.own_terminal {
        return Err(ShimError::Stdio(
            "process.terminal is set but no --console-socket was given".into(),
        ));
    }
    let io = session::prepare(&plan)?;
    let mut spec = req.spec.clone();
    if let Some(size) = io.initial_size() {
        spec.process.console_size = Some(size);
    }
    let t_create = std::time::Instant::now();
    let guest_pid = client
        .create_container(id, spec)
        .map_err(|e| ShimError::Agent("the agent could not create the container".into(), e))?;
    let create_rtt = t_create.elapsed();
    let t_attach = std::time::Instant::now();
    let outputs = io.attach(&sandbox.vsock_uds(), &client, id, INIT_EXEC_ID)?;
    log::info!(
        "timing {id}: CreateContainer {} ms (mostly guest work), stdio attach {} ms",
        create_rtt.as_millis(),
        t_attach.elapsed().as_millis()
    );
    let outputs =
        session::close_stdin_after_outputs(outputs, Arc::clone(&client), id, INIT_EXEC_ID);

    let mut state = store.load(id)?;
    let me = std::process::id() as i32;
    state.status = Status::Created;
    state.shim_pid = Some(me);
    state.shim_start = process_start_time(me);
    state.vmm_pid = sandbox.vmm_pid();
    state.guest_pid = Some(guest_pid);
    state.vsock_uds = Some(sandbox.vsock_uds());
    state.backend = Some(sandbox.backend_name());
    store.save(&state)?;
    let t = sandbox.timings();
    log::info!(
        "container {id} created in a {} VM ({} MiB, {} vCPU), guest pid {guest_pid}; \
         timing: VMM spawned {} ms, agent ready {} ms",
        sandbox.backend_name(),
        size.memory_mib,
        size.vcpus,
        t.spawned.as_millis(),
        t.agent_ready.map_or(0, |d| d.as_millis())
    );
    Ok(Running { client, outputs })
}

impl Running {
    /// Waits for the main process, records the exit and returns the shell-style code.
    fn wait(self, store: &StateStore, id: &str) -> i32 {
        let code = match self.client.wait(id, INIT_EXEC_ID) {
            Ok(status) => status.shell_code(),
            Err(e) => {
                log::error!(
                    "container {id}: lost the agent while waiting: {}",
                    kiln_protocol::error_chain(&e)
                );
                137
            }
        };
        session::join_outputs(self.outputs, Duration::from_secs(5));
        // Record the exit under the container lock (serialised with start/delete).
        if let Ok(_lock) = store.lock(id) {
            if let Ok(mut state) = store.load(id) {
                state.status = Status::Stopped;
                state.exit_code = Some(code);
                let _ = store.save(&state);
            }
        }
        log::info!("container {id} exited with {code}");
        code
    }
}
