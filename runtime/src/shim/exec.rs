//! One exec'd process: `kiln exec` runs it in the foreground; `kiln exec --detach` starts an exec
//! shim (`kiln exec-shim`, a new session) that does the same and exits with the process's code,
//! which is what conmon and containerd wait for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::transport::hybrid_vsock_connect;
use kiln_protocol::{AgentClient, ProcessSpec, AGENT_VSOCK_PORT};
use serde::{Deserialize, Serialize};

use super::{report_ready, session, ShimError};
use crate::sandbox::SandboxError;

/// What the exec shim runs (written by `kiln exec --detach`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The container.
    pub container_id: String,
    /// Unique id of this process within the container.
    pub exec_id: String,
    /// The process.
    pub process: ProcessSpec,
    /// `--console-socket`.
    pub console_socket: Option<PathBuf>,
    /// The VM's hybrid vsock socket.
    pub vsock_uds: PathBuf,
}

/// Connects a new control connection to the agent behind `uds`.
pub fn connect(uds: &Path, who: &str) -> Result<AgentClient, ShimError> {
    let stream = hybrid_vsock_connect(uds, AGENT_VSOCK_PORT)
        .map_err(|e| ShimError::Sandbox(SandboxError::Connect(Box::new(e))))?;
    AgentClient::connect(stream, who)
        .map_err(|e| ShimError::Agent("handshake with the agent failed".into(), e))
}

/// Runs the process; `on_started` is called once it runs and its stdio is attached. Returns the
/// shell-style exit code.
pub fn run_exec(
    req: &ExecRequest,
    controlling: bool,
    on_started: impl FnOnce(),
) -> Result<i32, ShimError> {
    let client = Arc::new(connect(&req.vsock_uds, "kiln exec")?);
    let plan = session::StdioPlan {
        terminal: req.process.terminal,
        console_socket: req.console_socket.clone(),
        console_size: req.process.console_size,
        controlling,
    };
    let io = session::prepare(&plan)?;
    let mut process = req.process.clone();
    if let Some(size) = io.initial_size() {
        process.console_size = Some(size);
    }
    client
        .exec(&req.container_id, &req.exec_id, process)
        .map_err(|e| ShimError::Agent("exec failed".into(), e))?;
    let outputs = io.attach(&req.vsock_uds, &client, &req.container_id, &req.exec_id)?;
    let outputs = session::close_stdin_after_outputs(
        outputs,
        Arc::clone(&client),
        &req.container_id,
        &req.exec_id,
    );
    on_started();
    let status = client
        .wait(&req.container_id, &req.exec_id)
        .map_err(|e| ShimError::Agent("lost the agent while waiting".into(), e))?;
    session::join_outputs(outputs, Duration::from_secs(5));
    Ok(status.shell_code())
}

/// `kiln exec-shim`: reads the request, runs it, reports readiness on the ready pipe.
pub fn run_shim(request: &Path) -> i32 {
    session::block_sigwinch();
    let req = std::fs::read(request)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<ExecRequest>(&b).map_err(|e| e.to_string()));
    let _ = std::fs::remove_file(request);
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            report_ready(Err(format!("{}: {e}", request.display())));
            return 1;
        }
    };
    let mut ready = Some(());
    match run_exec(&req, true, || {
        ready.take();
        report_ready(Ok(()));
    }) {
        Ok(code) => code,
        Err(e) => {
            let msg = kiln_protocol::error_chain(&e);
            log::error!("exec in {}: {msg}", req.container_id);
            if ready.is_some() {
                report_ready(Err(msg));
            }
            1
        }
    }
}
