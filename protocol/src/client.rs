//! Host-side client of the agent: handshake, concurrent calls matched by request id, events.
//!
//! [`AgentClient::connect`] takes a connected stream (a hybrid-vsock unix socket from
//! [`crate::transport::hybrid_vsock_connect`], a plain unix socket in tests), performs the
//! Hello / HelloOk handshake and starts one background thread that reads every frame from the
//! agent: responses go to the calling thread waiting for that request id, events go to a bounded
//! channel ([`AgentClient::take_events`]). Any number of threads may call at once through `&self`
//! (share the client in an `Arc`).
//!
//! The agent is not trusted: its frames are size-checked by the codec, responses to unknown ids
//! are dropped, and at most [`EVENT_QUEUE_LEN`] undelivered events are kept (further ones are
//! counted in [`AgentClient::dropped_events`]; [`AgentClient::wait`] never depends on events).
//! std only: no async runtime.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::codec::{peek_request_id, read_frame, read_frame_body, write_frame, FrameError};
use crate::handshake::hello;
use crate::messages::{
    AgentInfo, AgentMessage, ContainerStats, ErrorReply, Event, ExitStatus, HelloOk, HostMessage,
    ProtocolVersion, Request, Response,
};
use crate::spec::{ContainerSpec, ProcessSpec, TtySize};
use crate::PROTOCOL_VERSION;

/// How long [`AgentClient::connect`] waits for the agent's answer to Hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Undelivered events kept for [`AgentClient::take_events`] before new ones are dropped.
pub const EVENT_QUEUE_LEN: usize = 4096;

/// Errors of the client.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Preparing the stream (clone, timeouts) failed.
    #[error("could not set up the agent connection")]
    Setup(#[source] io::Error),
    /// Sending Hello or reading the answer failed.
    #[error("handshake with the agent failed")]
    Handshake(#[source] FrameError),
    /// The agent answered Hello with an error (e.g. an incompatible version).
    #[error("the agent refused the connection")]
    Refused(#[source] ErrorReply),
    /// The agent accepted but speaks another major version.
    #[error("the agent speaks protocol {agent}, this client speaks {ours}: major versions differ")]
    IncompatibleVersion {
        /// The agent's version.
        agent: ProtocolVersion,
        /// Ours.
        ours: ProtocolVersion,
    },
    /// The agent sent something other than HelloOk or Error as first frame.
    #[error("unexpected first frame from the agent: {0}")]
    UnexpectedHandshake(String),
    /// The request could not be sent.
    #[error("could not send the request to the agent")]
    Send(#[source] FrameError),
    /// The agent answered the call with an error.
    #[error("the agent failed the call")]
    Agent(#[source] ErrorReply),
    /// The agent's answer to this call did not decode.
    #[error("malformed response from the agent: {0}")]
    MalformedResponse(String),
    /// The agent answered with a response of the wrong kind for the call.
    #[error("unexpected response to {request}: {response}")]
    UnexpectedResponse {
        /// The call.
        request: &'static str,
        /// What came back.
        response: String,
    },
    /// No answer within the timeout given to [`AgentClient::call_timeout`].
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// The connection is gone; the string says why.
    #[error("connection to the agent lost: {0}")]
    Disconnected(String),
}

/// A stream the client can split into a reading and a writing half and shut down.
pub trait DuplexStream: Read + Write + Send + Sync + Sized + 'static {
    /// A second handle to the same connection.
    fn try_clone_stream(&self) -> io::Result<Self>;
    /// Shuts down both directions (unblocks a reader in another thread).
    fn shutdown_stream(&self) -> io::Result<()>;
    /// Sets the read timeout (`None`: block).
    fn set_stream_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl DuplexStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_stream(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn set_stream_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl DuplexStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_stream(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn set_stream_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

type Reply = Result<Response, ClientError>;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, SyncSender<Reply>>,
    /// Set once the reader thread has stopped: why the connection is gone.
    closed: Option<String>,
}

struct Shared {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<Pending>,
    dropped_events: AtomicU64,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave the map inconsistent (single operations).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection to the agent. See the module documentation.
pub struct AgentClient {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    events: Mutex<Option<Receiver<Event>>>,
    agent: HelloOk,
    shutdown: Box<dyn Fn() + Send + Sync>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Performs the handshake on `stream` (waiting at most [`HANDSHAKE_TIMEOUT`]) and starts the
    /// reader thread. `client_name` appears in the agent's logs.
    pub fn connect<S: DuplexStream>(stream: S, client_name: &str) -> Result<Self, ClientError> {
        let mut stream = stream;
        stream
            .set_stream_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(ClientError::Setup)?;
        write_frame(&mut stream, &hello(client_name)).map_err(ClientError::Handshake)?;
        let answer: AgentMessage = read_frame(&mut stream).map_err(ClientError::Handshake)?;
        let agent = match answer {
            AgentMessage::HelloOk(ok) if ok.version.major == PROTOCOL_VERSION.major => ok,
            AgentMessage::HelloOk(ok) => {
                return Err(ClientError::IncompatibleVersion {
                    agent: ok.version,
                    ours: PROTOCOL_VERSION,
                })
            }
            AgentMessage::Error(e) => return Err(ClientError::Refused(e)),
            other => return Err(ClientError::UnexpectedHandshake(format!("{other:?}"))),
        };
        stream
            .set_stream_read_timeout(None)
            .map_err(ClientError::Setup)?;

        let writer = stream.try_clone_stream().map_err(ClientError::Setup)?;
        let closer = stream.try_clone_stream().map_err(ClientError::Setup)?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(Box::new(writer)),
            pending: Mutex::new(Pending::default()),
            dropped_events: AtomicU64::new(0),
        });
        let (event_tx, event_rx) = mpsc::sync_channel(EVENT_QUEUE_LEN);
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("kiln-agent-reader".into())
            .spawn(move || read_loop(stream, &reader_shared, &event_tx))
            .map_err(ClientError::Setup)?;
        Ok(AgentClient {
            shared,
            next_id: AtomicU64::new(1),
            events: Mutex::new(Some(event_rx)),
            agent,
            shutdown: Box::new(move || {
                let _ = closer.shutdown_stream();
            }),
            reader: Some(reader),
        })
    }

    /// The agent's HelloOk: its protocol version and name.
    pub fn agent(&self) -> &HelloOk {
        &self.agent
    }

    /// Takes the receiver of unsolicited events (once; later calls return `None`).
    pub fn take_events(&self) -> Option<Receiver<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Events dropped because the queue of [`take_events`](Self::take_events) was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped_events.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its response, however long it takes. An error response
    /// becomes [`ClientError::Agent`].
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        let (_id, rx) = self.send(request)?;
        let reply = rx.recv().unwrap_or_else(|_| Err(self.disconnected()));
        into_result(reply)
    }

    /// Like [`call`](Self::call) but gives up after `timeout` (the late answer is discarded).
    pub fn call_timeout(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let (id, rx) = self.send(request)?;
        match rx.recv_timeout(timeout) {
            Ok(reply) => into_result(reply),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.pending().waiters.remove(&id);
                Err(ClientError::Timeout(timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.disconnected()),
        }
    }

    fn send(&self, request: Request) -> Result<(u64, Receiver<Reply>), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut pending = self.shared.pending();
            if let Some(reason) = &pending.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            pending.waiters.insert(id, tx);
        }
        let sent = {
            let mut writer = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_frame(&mut *writer, &HostMessage::Request { id, request })
        };
        if let Err(e) = sent {
            self.shared.pending().waiters.remove(&id);
            return Err(ClientError::Send(e));
        }
        Ok((id, rx))
    }

    fn disconnected(&self) -> ClientError {
        let reason = self.shared.pending().closed.clone();
        ClientError::Disconnected(reason.unwrap_or_else(|| "reader stopped".into()))
    }

    /// `Health`: is the agent serving?
    pub fn health(&self) -> Result<(), ClientError> {
        expect_ok("Health", self.call(Request::Health)?)
    }

    /// `Version`: agent name, protocol version, guest kernel.
    pub fn version(&self) -> Result<AgentInfo, ClientError> {
        match self.call(Request::Version)? {
            Response::Version(info) => Ok(info),
            other => Err(unexpected("Version", other)),
        }
    }

    /// `CreateContainer` (or `CreateContainerSeccomp`, protocol 1.2, when `spec.seccomp` is set):
    /// returns the guest pid of the container's main process.
    pub fn create_container(
        &self,
        container_id: &str,
        mut spec: ContainerSpec,
    ) -> Result<u32, ClientError> {
        let request = match spec.seccomp.take() {
            None => Request::CreateContainer {
                container_id: container_id.into(),
                spec: Box::new(spec),
            },
            Some(seccomp) => Request::CreateContainerSeccomp {
                container_id: container_id.into(),
                spec: Box::new(spec),
                seccomp: Box::new(seccomp),
            },
        };
        expect_pid("CreateContainer", self.call(request)?)
    }

    /// `StartContainer`.
    pub fn start(&self, container_id: &str) -> Result<(), ClientError> {
        let request = Request::StartContainer {
            container_id: container_id.into(),
        };
        expect_ok("StartContainer", self.call(request)?)
    }

    /// `ExecProcess`: returns the guest pid of the new process.
    pub fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process: ProcessSpec,
    ) -> Result<u32, ClientError> {
        let request = Request::ExecProcess {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process: Box::new(process),
        };
        expect_pid("ExecProcess", self.call(request)?)
    }

    /// `WaitProcess`: blocks until the process has exited.
    pub fn wait(&self, container_id: &str, exec_id: &str) -> Result<ExitStatus, ClientError> {
        let request = Request::WaitProcess {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        match self.call(request)? {
            Response::Exited(status) => Ok(status),
            other => Err(unexpected("WaitProcess", other)),
        }
    }

    /// `SignalProcess` with a Linux signal number.
    pub fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
    ) -> Result<(), ClientError> {
        let request = Request::SignalProcess {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
        };
        expect_ok("SignalProcess", self.call(request)?)
    }

    /// `SignalContainer` (protocol 1.1): a Linux signal to every process of the container.
    pub fn signal_container(&self, container_id: &str, signal: i32) -> Result<(), ClientError> {
        let request = Request::SignalContainer {
            container_id: container_id.into(),
            signal,
        };
        expect_ok("SignalContainer", self.call(request)?)
    }

    /// `CloseStdin`.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        let request = Request::CloseStdin {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        expect_ok("CloseStdin", self.call(request)?)
    }

    /// `ResizeTty`.
    pub fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        size: TtySize,
    ) -> Result<(), ClientError> {
        let request = Request::ResizeTty {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            size,
        };
        expect_ok("ResizeTty", self.call(request)?)
    }

    /// `Stats`: cgroup statistics of a container.
    pub fn stats(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        let request = Request::Stats {
            container_id: container_id.into(),
        };
        match self.call(request)? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected("Stats", other)),
        }
    }

    /// `RemoveContainer`.
    pub fn remove(&self, container_id: &str, force: bool) -> Result<(), ClientError> {
        let request = Request::RemoveContainer {
            container_id: container_id.into(),
            force,
        };
        expect_ok("RemoveContainer", self.call(request)?)
    }

    /// `Shutdown`: the agent answers, then syncs and powers the VM off.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        expect_ok("Shutdown", self.call(Request::Shutdown)?)
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        (self.shutdown)();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn into_result(reply: Reply) -> Result<Response, ClientError> {
    match reply? {
        Response::Error(e) => Err(ClientError::Agent(e)),
        response => Ok(response),
    }
}

fn expect_ok(request: &'static str, response: Response) -> Result<(), ClientError> {
    match response {
        Response::Ok => Ok(()),
        other => Err(unexpected(request, other)),
    }
}

fn expect_pid(request: &'static str, response: Response) -> Result<u32, ClientError> {
    match response {
        Response::Process { pid } => Ok(pid),
        other => Err(unexpected(request, other)),
    }
}

fn unexpected(request: &'static str, response: Response) -> ClientError {
    ClientError::UnexpectedResponse {
        request,
        response: format!("{response:?}"),
    }
}

/// The reader thread: routes every frame from the agent until the stream ends.
fn read_loop<S: Read>(mut stream: S, shared: &Shared, events: &SyncSender<Event>) {
    let mut last_agent_error: Option<ErrorReply> = None;
    let reason = loop {
        let body = match read_frame_body(&mut stream) {
            Ok(body) => body,
            Err(FrameError::Closed) => break "the agent closed the connection".to_string(),
            Err(e) => break crate::error_chain(&e),
        };
        match crate::codec::decode_body::<AgentMessage>(&body) {
            Ok(AgentMessage::Response { id, response }) => {
                let waiter = shared.pending().waiters.remove(&id);
                // An unknown id: a call that timed out, or a confused agent. Dropped.
                if let Some(waiter) = waiter {
                    let _ = waiter.try_send(Ok(response));
                }
            }
            Ok(AgentMessage::Event(event)) => match events.try_send(event) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    shared.dropped_events.fetch_add(1, Ordering::Relaxed);
                }
            },
            Ok(AgentMessage::Error(e)) => last_agent_error = Some(e),
            Ok(other @ (AgentMessage::HelloOk(_) | AgentMessage::AttachOk)) => {
                break format!("the agent sent {other:?} on an established connection");
            }
            Err(e) => {
                // The frame boundary is intact; if it was meant as a response (same layout as a
                // host Request: tag 2, then the id), fail that call and keep going.
                let waiter =
                    peek_request_id(&body).and_then(|id| shared.pending().waiters.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter
                        .try_send(Err(ClientError::MalformedResponse(crate::error_chain(&e))));
                }
            }
        }
    };
    let reason = match last_agent_error {
        Some(e) => format!("{reason} (last error from the agent: {e})"),
        None => reason,
    };
    let waiters = {
        let mut pending = shared.pending();
        pending.closed = Some(reason.clone());
        std::mem::take(&mut pending.waiters)
    };
    for (_, waiter) in waiters {
        let _ = waiter.try_send(Err(ClientError::Disconnected(reason.clone())));
    }
}
