//! One command run through the agent: create the container, attach its stdio, start it, relay
//! bytes between the host's stdio and the agent's stdio connections, forward signals and window
//! sizes, wait for the exit status.
//!
//! Nothing here knows about a VM: the agent is reached through an [`AgentConnector`] (hybrid
//! vsock behind host-vmm's socket, or a plain unix socket where guest-init runs as a host process
//! in tests), and everything that may happen meanwhile arrives on one [`Control`] channel
//! (signals, window changes, the VM stopping, the process's exit from the waiter thread).
//!
//! Threads: one copies host stdin to the process (then half-closes the stream and sends
//! `CloseStdin`), one per output stream copies to the host fd, one waits for the exit. The
//! calling thread only reacts to controls.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_protocol::transport::{attach_stdio, hybrid_vsock_connect, TransportError};
use kiln_protocol::{
    AgentClient, ClientError, ContainerSpec, ExitStatus, Request, StdioStream, AGENT_VSOCK_PORT,
    INIT_EXEC_ID,
};

use super::terminal::{self, RawMode};

/// The container `host-vmm --` creates.
pub const CONTAINER_ID: &str = "kiln-run";

/// How long attaching a stdio stream and the small calls (signal, resize) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long output may still arrive once the process has exited (the agent closes the streams
/// right after; this only bounds a misbehaving agent).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens new connections to the agent's port.
pub trait AgentConnector {
    /// A fresh connection, before any frame.
    fn connect(&self) -> Result<UnixStream, TransportError>;
}

/// The agent behind a VMM's hybrid vsock socket (`CONNECT 1024`).
#[derive(Debug, Clone)]
pub struct HybridVsock {
    /// The VMM's vsock unix socket.
    pub uds: PathBuf,
}

impl AgentConnector for HybridVsock {
    fn connect(&self) -> Result<UnixStream, TransportError> {
        hybrid_vsock_connect(&self.uds, AGENT_VSOCK_PORT)
    }
}

/// An agent listening on a plain unix socket (guest-init run as a host process).
#[derive(Debug, Clone)]
pub struct UnixAgent {
    /// The agent's socket.
    pub path: PathBuf,
}

impl AgentConnector for UnixAgent {
    fn connect(&self) -> Result<UnixStream, TransportError> {
        UnixStream::connect(&self.path).map_err(|source| TransportError::Connect {
            path: self.path.clone(),
            source,
        })
    }
}

/// Something the session reacts to.
#[derive(Debug)]
pub enum Control {
    /// A signal to host-vmm (SIGINT, SIGTERM, SIGHUP): forwarded to the process; the second
    /// one ends the session with [`SessionEnd::Interrupted`].
    Signal(i32),
    /// The host terminal's size changed (SIGWINCH).
    WindowChanged,
    /// The VM stopped; the string says how.
    VmStopped(String),
    /// The process's exit status (sent by the session's waiter thread).
    Exited(Result<ExitStatus, String>),
    /// Writing the process's output to the host failed: its reader is gone (sent by the
    /// output relays). The process gets SIGPIPE once.
    HostOutputClosed,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The process exited.
    Exited(ExitStatus),
    /// A second signal arrived before the process exited.
    Interrupted(i32),
    /// The VM stopped before the process's exit was known.
    VmStopped(String),
}

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A call to the agent failed.
    #[error("{0} failed")]
    Call(&'static str, #[source] ClientError),
    /// A stdio stream could not be attached.
    #[error("attaching {0:?}")]
    Attach(StdioStream, #[source] TransportError),
    /// Host-side I/O set-up (dup, threads, terminal).
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
}

/// The host end of the process's stdio.
#[derive(Debug)]
pub struct HostStdio {
    /// Copied to the process's stdin (or its pty).
    pub stdin: File,
    /// Receives the process's stdout (or its pty output).
    pub stdout: File,
    /// Receives the process's stderr (unused with a terminal).
    pub stderr: File,
    /// `stdin` is a terminal: one pty stream, raw mode, window sizes forwarded.
    pub terminal: bool,
}

fn dup(fd: impl AsFd, what: &'static str) -> Result<File, SessionError> {
    let owned: OwnedFd = fd
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| SessionError::Io(what, e))?;
    Ok(File::from(owned))
}

impl HostStdio {
    /// Copies of this process's fds 0, 1 and 2; a terminal when fd 0 is one.
    pub fn inherit() -> Result<HostStdio, SessionError> {
        let stdin = dup(io::stdin(), "dup stdin")?;
        Ok(HostStdio {
            terminal: terminal::is_terminal(stdin.as_fd()),
            stdin,
            stdout: dup(io::stdout(), "dup stdout")?,
            stderr: dup(io::stderr(), "dup stderr")?,
        })
    }
}

/// The control channel of a session: clone [`ControlChannel::sender`] for signal forwarding and
/// the VM watcher, then hand the channel to [`run`].
pub struct ControlChannel {
    tx: Sender<Control>,
    rx: Receiver<Control>,
}

impl Default for ControlChannel {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        ControlChannel { tx, rx }
    }
}

impl ControlChannel {
    /// A new channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sender for controls.
    pub fn sender(&self) -> Sender<Control> {
        self.tx.clone()
    }

    /// The next control that arrives within `timeout`, if any.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Control> {
        self.rx.recv_timeout(timeout).ok()
    }
}

/// How a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    /// End of input (or the input side failed): everything read was written.
    End(u64),
    /// Writing failed: the reader on the other side is gone.
    WriteFailed(u64),
}

/// Copies `from` into `to` until end of input or an error.
fn pump(mut from: impl Read, mut to: impl Write) -> Copied {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            return Copied::WriteFailed(total);
        }
        total += n as u64;
    }
    Copied::End(total)
}

/// Guest output → host fd. When the host reader is gone (`host-vmm -- yes | head -1`) the
/// process gets SIGPIPE, as it would writing to that pipe itself.
fn spawn_output(
    name: &str,
    stream: UnixStream,
    out: File,
    tx: Sender<Control>,
) -> Result<JoinHandle<Copied>, SessionError> {
    thread(name, move || {
        let copied = pump(stream, out);
        if let Copied::WriteFailed(_) = copied {
            let _ = tx.send(Control::HostOutputClosed);
        }
        copied
    })
}

fn thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, SessionError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| SessionError::Io("cannot start a relay thread", e))
}

/// A stdio connection of the container's main process.
fn attach(conn: &dyn AgentConnector, which: StdioStream) -> Result<UnixStream, SessionError> {
    let fail = |e| SessionError::Attach(which, e);
    let io_fail = |e| SessionError::Io("stdio stream timeout", e);
    let stream = conn.connect().map_err(fail)?;
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(io_fail)?;
    let stream = attach_stdio(stream, CONTAINER_ID, INIT_EXEC_ID, which).map_err(fail)?;
    stream.set_read_timeout(None).map_err(io_fail)?;
    Ok(stream)
}

/// Host input → process: copies, then half-closes the stream and closes the process's stdin.
fn spawn_input(
    input: File,
    stream: UnixStream,
    client: Arc<AgentClient>,
    close_stdin: bool,
) -> Result<(), SessionError> {
    thread("stdin", move || {
        pump(input, &stream);
        let _ = stream.shutdown(Shutdown::Write);
        if close_stdin {
            // Hybrid vsock may not carry the half-close; the call makes the end explicit.
            let _ = client.call_timeout(
                Request::CloseStdin {
                    container_id: CONTAINER_ID.into(),
                    exec_id: INIT_EXEC_ID.into(),
                },
                CALL_TIMEOUT,
            );
        }
    })
    .map(drop)
}

fn simple_call(client: &AgentClient, what: &'static str, request: Request) {
    if let Err(e) = client.call_timeout(request, CALL_TIMEOUT) {
        log::warn!("{what}: {}", kiln_protocol::error_chain(&e));
    }
}

/// Runs `spec` as container [`CONTAINER_ID`] through `client` (connected to the agent) with
/// `stdio`, until the process exits or `channel` says otherwise. With a terminal the host
/// terminal is in raw mode for the duration and restored before this returns.
pub fn run(
    client: &Arc<AgentClient>,
    conn: &dyn AgentConnector,
    spec: ContainerSpec,
    stdio: HostStdio,
    channel: ControlChannel,
) -> Result<SessionEnd, SessionError> {
    let terminal = stdio.terminal && spec.process.terminal;
    client
        .create_container(CONTAINER_ID, spec)
        .map_err(|e| SessionError::Call("CreateContainer", e))?;

    let mut outputs = Vec::new();
    let size_fd = if terminal {
        Some(dup(stdio.stdin.as_fd(), "dup the terminal")?)
    } else {
        None
    };
    let _raw = if terminal {
        let pty = attach(conn, StdioStream::Pty)?;
        let pty_in = pty
            .try_clone()
            .map_err(|e| SessionError::Io("clone the pty stream", e))?;
        let raw = RawMode::enter(stdio.stdin.as_fd())
            .map_err(|e| SessionError::Io("raw mode on the terminal", e.into()))?;
        spawn_input(stdio.stdin, pty_in, Arc::clone(client), false)?;
        let out = stdio.stdout;
        outputs.push(spawn_output("pty-out", pty, out, channel.sender())?);
        Some(raw)
    } else {
        let stdin = attach(conn, StdioStream::Stdin)?;
        let stdout = attach(conn, StdioStream::Stdout)?;
        let stderr = attach(conn, StdioStream::Stderr)?;
        spawn_input(stdio.stdin, stdin, Arc::clone(client), true)?;
        let (out, err) = (stdio.stdout, stdio.stderr);
        outputs.push(spawn_output("stdout", stdout, out, channel.sender())?);
        outputs.push(spawn_output("stderr", stderr, err, channel.sender())?);
        None
    };

    client
        .start(CONTAINER_ID)
        .map_err(|e| SessionError::Call("StartContainer", e))?;
    let waiter_client = Arc::clone(client);
    let waiter_tx = channel.sender();
    thread("wait", move || {
        let status = waiter_client
            .wait(CONTAINER_ID, INIT_EXEC_ID)
            .map_err(|e| kiln_protocol::error_chain(&e));
        let _ = waiter_tx.send(Control::Exited(status));
    })?;

    let mut signals = 0u32;
    let mut sent_sigpipe = false;
    loop {
        // The channel holds a sender itself, so it never disconnects.
        let Ok(control) = channel.rx.recv() else {
            return Err(SessionError::Io(
                "control channel",
                io::Error::other("closed"),
            ));
        };
        match control {
            Control::Signal(signal) => {
                signals += 1;
                if signals > 1 {
                    return Ok(SessionEnd::Interrupted(signal));
                }
                simple_call(
                    client,
                    "forwarding a signal",
                    Request::SignalProcess {
                        container_id: CONTAINER_ID.into(),
                        exec_id: INIT_EXEC_ID.into(),
                        signal,
                    },
                );
            }
            Control::WindowChanged => {
                let size = size_fd
                    .as_ref()
                    .and_then(|fd| terminal::window_size(fd.as_fd()));
                if let Some(size) = size {
                    simple_call(
                        client,
                        "resizing the terminal",
                        Request::ResizeTty {
                            container_id: CONTAINER_ID.into(),
                            exec_id: INIT_EXEC_ID.into(),
                            size,
                        },
                    );
                }
            }
            Control::HostOutputClosed if !sent_sigpipe => {
                sent_sigpipe = true;
                simple_call(
                    client,
                    "SIGPIPE for a closed output",
                    Request::SignalProcess {
                        container_id: CONTAINER_ID.into(),
                        exec_id: INIT_EXEC_ID.into(),
                        signal: libc::SIGPIPE,
                    },
                );
            }
            Control::HostOutputClosed => {}
            Control::VmStopped(why) => return Ok(SessionEnd::VmStopped(why)),
            Control::Exited(Ok(status)) => {
                drain(outputs, DRAIN_TIMEOUT);
                return Ok(SessionEnd::Exited(status));
            }
            Control::Exited(Err(why)) => {
                return Err(SessionError::Call(
                    "WaitProcess",
                    ClientError::Disconnected(why),
                ))
            }
        }
    }
}

/// Waits for the output relays to reach the end of their streams, at most `timeout` in all.
fn drain(outputs: Vec<JoinHandle<Copied>>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for h in outputs {
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            log::warn!("output still open {timeout:?} after the process exited; cut short");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pump_copies_until_end() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        assert_eq!(pump(&data[..], &mut out), Copied::End(data.len() as u64));
        assert_eq!(out, data);
        let mut full = [0u8; 10];
        assert_eq!(
            pump(&data[..], &mut full[..]),
            Copied::WriteFailed(0),
            "a short writer is a failed write"
        );
    }

    #[test]
    fn unix_connector_names_the_socket() {
        let c = UnixAgent {
            path: "/nonexistent/agent.sock".into(),
        };
        let e = c.connect().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/agent.sock"), "{e}");
        assert!(e.is_retryable());
    }
}
