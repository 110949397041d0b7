//! The stdio of one guest process as seen from a host process (the container shim for the main
//! process, `kiln exec` or the exec shim for further ones): pipes or a terminal, attached to the
//! agent's stdio connections, plus terminal resizes.
//!
//! Without a terminal, fd 0 is copied to the process's stdin and its stdout/stderr to fds 1 and
//! 2. With a terminal, a host pty is allocated; its master goes to `--console-socket` (or, with
//! no socket, the caller's own terminal is used directly) and the slave is relayed to the
//! guest's pty. Window-size changes arrive as SIGWINCH and are forwarded with `ResizeTty`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_protocol::transport::hybrid_vsock_attach;
use kiln_protocol::{AgentClient, StdioStream, TtySize, AGENT_VSOCK_PORT};
use nix::sys::signal::{SigSet, Signal};

use super::relay::{spawn_input, spawn_output};
use super::ShimError;
use crate::console::{self, get_winsize, open_pty, send_console};

/// How a process's stdio is wired on the host.
#[derive(Debug, Clone)]
pub struct StdioPlan {
    /// The process has a terminal.
    pub terminal: bool,
    /// Where the pty master goes (terminal only).
    pub console_socket: Option<PathBuf>,
    /// Initial terminal size.
    pub console_size: Option<TtySize>,
    /// Make the host pty slave our controlling terminal (the container shim, a session leader).
    pub controlling: bool,
}

/// A host pty kept for resizes.
pub struct TerminalSide {
    /// The fd whose size is the terminal size: the host pty slave, or our own stdin.
    pub size_fd: OwnedFd,
}

/// The host end of a process's stdio, prepared before the process is created.
pub struct PreparedIo {
    plan: StdioPlan,
    terminal: Option<TerminalSide>,
    /// The fd terminal input is read from and output written to (slave or our stdin/stdout).
    term_io: Option<(File, File)>,
}

/// Blocks SIGWINCH in the calling thread (and every thread it starts afterwards) so a
/// dedicated thread can `sigwait` for it. Call before starting other threads.
pub fn block_sigwinch() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGWINCH);
    let _ = set.thread_block();
}

fn dup(fd: impl AsFd) -> Result<File, ShimError> {
    let owned = fd
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| ShimError::Stdio(format!("dup: {e}")))?;
    Ok(File::from(owned))
}

/// Prepares the host side: allocates and sends the pty for terminal processes.
pub fn prepare(plan: &StdioPlan) -> Result<PreparedIo, ShimError> {
    if !plan.terminal {
        return Ok(PreparedIo {
            plan: plan.clone(),
            terminal: None,
            term_io: None,
        });
    }
    match &plan.console_socket {
        Some(socket) => {
            let pty = open_pty(plan.console_size).map_err(ShimError::Console)?;
            console::make_raw(pty.slave.as_fd()).map_err(ShimError::Console)?;
            if plan.controlling {
                console::make_controlling(pty.slave.as_fd()).map_err(ShimError::Console)?;
            }
            send_console(socket, pty.master.as_fd()).map_err(ShimError::Console)?;
            drop(pty.master);
            let input = dup(&pty.slave)?;
            let output = dup(&pty.slave)?;
            Ok(PreparedIo {
                plan: plan.clone(),
                terminal: Some(TerminalSide { size_fd: pty.slave }),
                term_io: Some((input, output)),
            })
        }
        None => {
            // The caller's own stdin/stdout are the terminal (`kiln exec -t` from a shell).
            let stdin = std::io::stdin();
            let size_fd = stdin
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| ShimError::Stdio(format!("dup stdin: {e}")))?;
            if nix::unistd::isatty(&size_fd).unwrap_or(false) {
                let _ = console::make_raw(size_fd.as_fd());
            }
            Ok(PreparedIo {
                plan: plan.clone(),
                terminal: Some(TerminalSide { size_fd }),
                term_io: Some((dup(std::io::stdin())?, dup(std::io::stdout())?)),
            })
        }
    }
}

impl PreparedIo {
    /// The terminal size to create the process with.
    pub fn initial_size(&self) -> Option<TtySize> {
        let t = self.terminal.as_ref()?;
        match get_winsize(t.size_fd.as_raw_fd()) {
            Ok(s) if s.rows > 0 && s.cols > 0 => Some(s),
            _ => self.plan.console_size,
        }
    }

    /// Attaches the agent's stdio connections of `container`/`exec` and starts the relays.
    /// Returns the output relays to join once the process has exited.
    pub fn attach(
        mut self,
        uds: &Path,
        client: &Arc<AgentClient>,
        container: &str,
        exec: &str,
    ) -> Result<Vec<JoinHandle<u64>>, ShimError> {
        let connect = |which: StdioStream| -> Result<UnixStream, ShimError> {
            hybrid_vsock_attach(uds, AGENT_VSOCK_PORT, container, exec, which)
                .map_err(|e| ShimError::Attach(which, e))
        };
        let mut outputs = Vec::new();
        if let Some((input, output)) = self.term_io.take() {
            let pty = connect(StdioStream::Pty)?;
            let pty_in = pty
                .try_clone()
                .map_err(|e| ShimError::Stdio(format!("clone pty stream: {e}")))?;
            spawn_input("pty", input, pty_in)
                .map_err(|e| ShimError::Stdio(format!("thread: {e}")))?;
            outputs.push(
                spawn_output("pty", pty, output)
                    .map_err(|e| ShimError::Stdio(format!("thread: {e}")))?,
            );
            if let Some(t) = self.terminal.take() {
                spawn_resizer(t, Arc::clone(client), container, exec)?;
            }
            return Ok(outputs);
        }
        let stdin = connect(StdioStream::Stdin)?;
        let stdout = connect(StdioStream::Stdout)?;
        let stderr = connect(StdioStream::Stderr)?;
        spawn_input("stdin", dup(std::io::stdin())?, stdin)
            .map_err(|e| ShimError::Stdio(format!("thread: {e}")))?;
        for (name, stream, out) in [
            ("stdout", stdout, dup(std::io::stdout())?),
            ("stderr", stderr, dup(std::io::stderr())?),
        ] {
            outputs.push(
                spawn_output(name, stream, out)
                    .map_err(|e| ShimError::Stdio(format!("thread: {e}")))?,
            );
        }
        Ok(outputs)
    }
}

/// Forwards SIGWINCH (size of `t.size_fd`) to the guest until the process is gone.
fn spawn_resizer(
    t: TerminalSide,
    client: Arc<AgentClient>,
    container: &str,
    exec: &str,
) -> Result<(), ShimError> {
    let (container, exec) = (container.to_string(), exec.to_string());
    std::thread::Builder::new()
        .name("winch".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGWINCH);
            let mut last = None;
            loop {
                if let Ok(size) = get_winsize(t.size_fd.as_raw_fd()) {
                    if Some(size) != last && size.rows > 0 {
                        if client.resize_tty(&container, &exec, size).is_err() {
                            return;
                        }
                        last = Some(size);
                    }
                }
                if set.wait().is_err() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
        .map_err(|e| ShimError::Stdio(format!("thread: {e}")))?;
    Ok(())
}

/// Once every output relay has ended (the agent closes them when the process's output ends,
/// normally at its exit), closes the process's stdin in the guest. The agent reports an exit only
/// after the process's stdin is done as well (seen with clients that keep stdin open without
/// writing, as containerd's shim does), so without this a finished process would look alive
/// until the client closed its end. A process that closes stdout and stderr but keeps reading
/// stdin loses its input: an accepted trade-off. Returns the watcher thread.
pub fn close_stdin_after_outputs(
    outputs: Vec<JoinHandle<u64>>,
    client: Arc<AgentClient>,
    container: &str,
    exec: &str,
) -> Vec<JoinHandle<u64>> {
    let (container, exec) = (container.to_string(), exec.to_string());
    let watcher = std::thread::Builder::new()
        .name("stdin-closer".into())
        .spawn(move || {
            let mut total = 0;
            for h in outputs {
                total += h.join().unwrap_or(0);
            }
            let _ = client.close_stdin(&container, &exec);
            total
        });
    watcher.into_iter().collect()
}

/// Joins output relays, giving up after `timeout` (output is complete when the agent reports the
/// exit, so this normally returns at once).
pub fn join_outputs(outputs: Vec<JoinHandle<u64>>, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    for h in outputs {
        while !h.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        }
    }
}
