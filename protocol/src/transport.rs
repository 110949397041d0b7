//! Host-side transports: the Firecracker hybrid vsock handshake and stdio stream attachment.
//!
//! Firecracker-style VMMs (host-vmm, and `vhost-device-vsock` for QEMU) expose the guest's vsock
//! as a unix socket: connect to it, write `CONNECT <port>\n`, read `OK <host port>\n`, and the
//! stream is then a connection to guest port `<port>`. If nothing listens on that guest port the
//! VMM closes the connection instead of answering (guest RST), which
//! [`hybrid_vsock_connect_retry`] treats as "agent not up yet".
//!
//! A stdio stream is a further connection whose first frame is [`crate::HostMessage::Attach`];
//! after the agent's `AttachOk` it carries raw bytes ([`attach_stdio`]).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::codec::{read_frame, write_frame, FrameError};
use crate::messages::{AgentMessage, Attach, ErrorReply, HostMessage, StdioStream};
use crate::PROTOCOL_VERSION;

/// Longest accepted reply line of the hybrid vsock handshake, newline included
/// (`OK 4294967295\n` is 14 bytes).
pub const HYBRID_VSOCK_MAX_LINE: usize = 32;

/// How long the hybrid vsock handshake and the Attach answer may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of connecting and attaching.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The unix socket could not be connected (VMM not running yet, wrong path).
    #[error("could not connect to the vsock unix socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed during the handshake.
    #[error("I/O error during the hybrid vsock handshake on {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The VMM closed the connection without `OK`: nothing listens on that guest port.
    #[error("{path}: connection closed before OK: nothing listens on guest vsock port {port}")]
    NotListening {
        /// The socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
    },
    /// The VMM answered something other than `OK <number>`.
    #[error("{path}: unexpected hybrid vsock reply {line:?} (expected \"OK <port>\")")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// The reply, lossily decoded.
        line: String,
    },
    /// The reply line exceeded [`HYBRID_VSOCK_MAX_LINE`] bytes.
    #[error("{path}: hybrid vsock reply longer than {HYBRID_VSOCK_MAX_LINE} bytes")]
    ReplyTooLong {
        /// The socket.
        path: PathBuf,
    },
    /// No reply line within [`HANDSHAKE_TIMEOUT`].
    #[error("{path}: no hybrid vsock reply within {HANDSHAKE_TIMEOUT:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
    },
    /// [`hybrid_vsock_connect_retry`] ran out of time; the source is the last attempt's error.
    #[error("guest vsock port {port} behind {path} not reachable within {waited:?}")]
    GaveUp {
        /// The socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// Time spent retrying.
        waited: Duration,
        /// The last attempt's error.
        #[source]
        last: Box<TransportError>,
    },
    /// Sending the Attach frame or reading its answer failed.
    #[error("attaching {stream:?} of {container_id:?}/{exec_id:?} failed")]
    Attach {
        /// The container.
        container_id: String,
        /// The process.
        exec_id: String,
        /// The stream.
        stream: StdioStream,
        /// Why.
        #[source]
        source: FrameError,
    },
    /// The agent refused the Attach.
    #[error("the agent refused to attach {stream:?} of {container_id:?}/{exec_id:?}")]
    AttachRefused {
        /// The container.
        container_id: String,
        /// The process.
        exec_id: String,
        /// The stream.
        stream: StdioStream,
        /// The agent's error.
        #[source]
        reply: ErrorReply,
    },
    /// The agent answered Attach with something other than AttachOk or Error.
    #[error("unexpected answer to Attach: {0}")]
    AttachUnexpected(String),
}

impl TransportError {
    /// True for errors that mean "the VMM or the agent is not up yet": worth retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            TransportError::NotListening { .. } => true,
            TransportError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// Connects to guest vsock `port` through the VMM's hybrid vsock unix socket at `uds_path`.
///
/// The reply is read byte by byte so no byte of the guest's stream is consumed; the returned
/// stream has no timeouts set.
pub fn hybrid_vsock_connect(uds_path: &Path, port: u32) -> Result<UnixStream, TransportError> {
    let path = || uds_path.to_path_buf();
    let io_err = |source| TransportError::Io {
        path: path(),
        source,
    };
    let mut stream = UnixStream::connect(uds_path).map_err(|source| TransportError::Connect {
        path: path(),
        source,
    })?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;

    let mut line = Vec::with_capacity(HYBRID_VSOCK_MAX_LINE);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => {
                return Err(TransportError::NotListening { path: path(), port })
            }
            Ok(0) => {
                return Err(TransportError::BadReply {
                    path: path(),
                    line: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() + 1 >= HYBRID_VSOCK_MAX_LINE => {
                return Err(TransportError::ReplyTooLong { path: path() })
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(TransportError::Timeout { path: path() })
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    if !is_ok_line(&line) {
        return Err(TransportError::BadReply {
            path: path(),
            line: String::from_utf8_lossy(&line).into_owned(),
        });
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    Ok(stream)
}

/// `OK <decimal u32>` (the host-side port number, which kiln does not need).
fn is_ok_line(line: &[u8]) -> bool {
    let Some(number) = line.strip_prefix(b"OK ") else {
        return false;
    };
    std::str::from_utf8(number).is_ok_and(|n| n.parse::<u32>().is_ok())
}

/// [`hybrid_vsock_connect`], retried while the VMM's socket does not exist yet or the guest does
/// not listen yet (booting), until `timeout` has passed. Other errors are returned at once.
pub fn hybrid_vsock_connect_retry(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, TransportError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match hybrid_vsock_connect(uds_path, port) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.is_retryable() && started.elapsed() < timeout => {
                std::thread::sleep(pause.min(timeout.saturating_sub(started.elapsed())));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) if e.is_retryable() => {
                return Err(TransportError::GaveUp {
                    path: uds_path.to_path_buf(),
                    port,
                    waited: started.elapsed(),
                    last: Box::new(e),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// Binds an already connected `stream` (to the agent's port) to one stdio stream of a process:
/// sends the Attach frame and waits for `AttachOk`. Afterwards `stream` carries raw bytes.
pub fn attach_stdio<S: Read + Write>(
    mut stream: S,
    container_id: &str,
    exec_id: &str,
    which: StdioStream,
) -> Result<S, TransportError> {
    let fail = |source| TransportError::Attach {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        stream: which,
        source,
    };
    let attach = HostMessage::Attach(Attach {
        version: PROTOCOL_VERSION,
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        stream: which,
    });
    write_frame(&mut stream, &attach).map_err(fail)?;
    match read_frame::<_, AgentMessage>(&mut stream).map_err(fail)? {
        AgentMessage::AttachOk => Ok(stream),
        AgentMessage::Error(reply) => Err(TransportError::AttachRefused {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stream: which,
            reply,
        }),
        other => Err(TransportError::AttachUnexpected(format!("{other:?}"))),
    }
}

/// Opens a stdio stream over hybrid vsock: [`hybrid_vsock_connect`] then [`attach_stdio`], with
/// [`HANDSHAKE_TIMEOUT`] on the Attach answer.
pub fn hybrid_vsock_attach(
    uds_path: &Path,
    port: u32,
    container_id: &str,
    exec_id: &str,
    which: StdioStream,
) -> Result<UnixStream, TransportError> {
    let io_err = |source| TransportError::Io {
        path: uds_path.to_path_buf(),
        source,
    };
    let stream = hybrid_vsock_connect(uds_path, port)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io_err)?;
    let stream = attach_stdio(stream, container_id, exec_id, which)?;
    stream.set_read_timeout(None).map_err(io_err)?;
    Ok(stream)
}
