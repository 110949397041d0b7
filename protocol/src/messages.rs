//! Every message of the protocol: what the host sends ([`HostMessage`]) and what the agent sends
//! ([`AgentMessage`]).
//!
//! Frame bodies are exactly one of these two enums, bincode-encoded (see [`crate::codec`]).
//! A connection starts with a host [`HostMessage::Hello`] (control connection) or
//! [`HostMessage::Attach`] (stdio connection); see `protocol/README.md`.
//!
//! Compatibility rules for protocol major version 1: variants are only ever appended at the end of
//! an enum and the fields of existing structs and variants never change. A peer with a newer minor
//! version may send a variant the other side does not know; the receiver gets a decode error for
//! that frame and answers with [`ErrorKind::Unsupported`] (it can still read the request id with
//! [`crate::codec::peek_request_id`]).

use serde::{Deserialize, Serialize};

use crate::spec::{ContainerSpec, ProcessSpec};

/// A protocol version. Peers with the same `major` interoperate; `minor` only adds messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incompatible changes bump this.
    pub major: u16,
    /// Additive changes (new enum variants at the end) bump this.
    pub minor: u16,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Frames sent by the host (the `kiln` runtime, `host-vmm --`) to the agent (guest-init).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// First frame of a control connection. Variant index 0 and the leading version fields are
    /// frozen forever, so any agent can read the version of any client.
    Hello(Hello),
    /// First (and only) frame of a stdio connection; afterwards the connection carries raw bytes.
    Attach(Attach),
    /// A call on an established control connection.
    Request {
        /// Chosen by the host, unique among its calls in flight on this connection.
        id: u64,
        /// The call.
        request: Request,
    },
}

/// Frames sent by the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Accepts a [`Hello`]; calls may follow.
    HelloOk(HelloOk),
    /// Accepts an [`Attach`]; raw stdio bytes follow on this connection.
    AttachOk,
    /// The answer to the request with the same `id`.
    Response {
        /// The request's id.
        id: u64,
        /// The result.
        response: Response,
    },
    /// Something that happened without being asked: a process exited, an OOM kill.
    Event(Event),
    /// An error tied to no request: a refused Hello or Attach, an oversize or malformed frame
    /// whose request id could not be read. The agent may close the connection afterwards.
    Error(ErrorReply),
}

/// The host's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The host's protocol version.
    pub version: ProtocolVersion,
    /// Free-form client name for logs, e.g. `host-vmm 0.1.0`.
    pub client: String,
}

/// The agent's answer to a compatible [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// The agent's protocol version.
    pub version: ProtocolVersion,
    /// Free-form agent name and version, e.g. `kiln-guest-init 0.1.0`.
    pub agent: String,
}

/// Binds a new connection to one stdio stream of a process.
///
/// The agent answers [`AgentMessage::AttachOk`] or [`AgentMessage::Error`]; after `AttachOk` the
/// connection carries raw bytes in the direction of the stream (both directions for `Pty`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    /// The host's protocol version (checked like [`Hello::version`]).
    pub version: ProtocolVersion,
    /// The container.
    pub container_id: String,
    /// The process; [`crate::INIT_EXEC_ID`] (empty) is the container's main process.
    pub exec_id: String,
    /// Which stream.
    pub stream: StdioStream,
}

/// One stdio stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StdioStream {
    /// Host → process. Closing (or shutting down writes on) the connection closes the
    /// process's stdin, as does [`Request::CloseStdin`].
    Stdin,
    /// Process → host; the agent closes the connection at end of output.
    Stdout,
    /// Process → host; the agent closes the connection at end of output.
    Stderr,
    /// The pty of a `terminal` process, both directions.
    Pty,
}

/// Calls the host can make. Each gets exactly one [`Response`] with the same request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Is the agent alive and serving? Answer: [`Response::Ok`].
    Health,
    /// Agent and guest versions. Answer: [`Response::Version`].
    Version,
    /// Set up a container (mounts, cgroup, namespaces) with its main process created but not yet
    /// running the user program, like `runc create`. Answer: [`Response::Process`].
    CreateContainer {
        /// New container id (unique in this agent).
        container_id: String,
        /// What to create.
        spec: Box<ContainerSpec>,
    },
    /// Let the main process of a created container exec its program. Answer: [`Response::Ok`].
    StartContainer {
        /// The container.
        container_id: String,
    },
    /// Start a further process in a running container's namespaces and cgroup.
    /// Answer: [`Response::Process`].
    ExecProcess {
        /// The container.
        container_id: String,
        /// New process id, unique within the container, not empty.
        exec_id: String,
        /// What to run.
        process: Box<ProcessSpec>,
    },
    /// Send a signal (Linux number) to a process. Answer: [`Response::Ok`].
    SignalProcess {
        /// The container.
        container_id: String,
        /// The process ([`crate::INIT_EXEC_ID`] for the main process).
        exec_id: String,
        /// Signal number, e.g. 15 for SIGTERM.
        signal: i32,
    },
    /// Wait until a process has exited (answers at once if it already has).
    /// Answer: [`Response::Exited`].
    WaitProcess {
        /// The container.
        container_id: String,
        /// The process ([`crate::INIT_EXEC_ID`] for the main process).
        exec_id: String,
    },
    /// Close the process's stdin (EOF for the reader). Answer: [`Response::Ok`].
    CloseStdin {
        /// The container.
        container_id: String,
        /// The process ([`crate::INIT_EXEC_ID`] for the main process).
        exec_id: String,
    },
    /// Set the pty size of a `terminal` process. Answer: [`Response::Ok`].
    ResizeTty {
        /// The container.
        container_id: String,
        /// The process ([`crate::INIT_EXEC_ID`] for the main process).
        exec_id: String,
        /// New size.
        size: crate::spec::TtySize,
    },
    /// cgroup statistics of a container. Answer: [`Response::Stats`].
    Stats {
        /// The container.
        container_id: String,
    },
    /// Remove a container whose processes have all exited (or kill them first with `force`):
    /// cgroup, mounts, bookkeeping. Answer: [`Response::Ok`].
    RemoveContainer {
        /// The container.
        container_id: String,
        /// SIGKILL remaining processes first instead of failing.
        force: bool,
    },
    /// Sync, unmount and power the VM off. Answer: [`Response::Ok`] sent before powering off.
    Shutdown,
    /// Send a signal (Linux number) to every process of a container (its cgroup, and its pid
    /// namespace if it has one), as `runc kill --all` does. Answer: [`Response::Ok`].
    /// Since protocol 1.1; a 1.0 agent answers `Unsupported`.
    SignalContainer {
        /// The container.
        container_id: String,
        /// Signal number, e.g. 15 for SIGTERM.
        signal: i32,
    },
    /// [`Request::CreateContainer`] with a seccomp profile (`linux.seccomp`), which
    /// [`ContainerSpec`]'s frozen layout cannot carry: the agent uses `seccomp` as the spec's
    /// [`ContainerSpec::seccomp`]. Since protocol 1.2; a 1.1 agent answers `Unsupported`, so a
    /// profile is never silently dropped.
    CreateContainerSeccomp {
        /// New container id (unique in this agent).
        container_id: String,
        /// What to create (its `seccomp` field is not encoded).
        spec: Box<ContainerSpec>,
        /// The profile.
        seccomp: Box<crate::spec::SeccompProfile>,
    },
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Success with nothing to report.
    Ok,
    /// Answer to [`Request::Version`].
    Version(AgentInfo),
    /// A process was created: its pid in the guest's initial pid namespace.
    Process {
        /// Guest pid.
        pid: u32,
    },
    /// Answer to [`Request::WaitProcess`].
    Exited(ExitStatus),
    /// Answer to [`Request::Stats`].
    Stats(ContainerStats),
    /// The call failed.
    Error(ErrorReply),
}

/// Answer to [`Request::Version`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's protocol version.
    pub version: ProtocolVersion,
    /// Agent name and version, e.g. `kiln-guest-init 0.1.0`.
    pub agent: String,
    /// Guest kernel release (`uname -r`).
    pub kernel: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitStatus {
    /// `exit(code)`; `code` is 0..=255.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl ExitStatus {
    /// The status as a shell reports it: the exit code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => 128 + signal,
        }
    }
}

/// cgroup v2 statistics of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerStats {
    /// `memory.current` in bytes.
    pub memory_current: u64,
    /// `memory.max` in bytes; `None` for `max`.
    pub memory_max: Option<u64>,
    /// `memory.events` `oom_kill` count.
    pub oom_kills: u64,
    /// `cpu.stat` `usage_usec`.
    pub cpu_usage_usec: u64,
    /// `cpu.stat` `user_usec`.
    pub cpu_user_usec: u64,
    /// `cpu.stat` `system_usec`.
    pub cpu_system_usec: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `pids.max`; `None` for `max`.
    pub pids_max: Option<u64>,
}

/// Unsolicited notifications from the agent (no request id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A process of a container exited (sent once per process, after it was reaped).
    ProcessExited {
        /// The container.
        container_id: String,
        /// The process ([`crate::INIT_EXEC_ID`] for the main process).
        exec_id: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The kernel OOM killer killed a process in the container's cgroup.
    OomKilled {
        /// The container.
        container_id: String,
    },
}

/// A failed call or a refused connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable category.
    pub kind: ErrorKind,
    /// One human-readable line naming the problem.
    pub message: String,
}

impl ErrorReply {
    /// Builds an error reply.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorReply {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// Categories of [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peer's protocol major version differs from ours.
    IncompatibleVersion,
    /// A frame body that does not decode as a message.
    MalformedFrame,
    /// A frame length above [`crate::MAX_FRAME_LEN`].
    FrameTooLarge,
    /// A message that is valid but not allowed here (e.g. a Request before Hello, a second
    /// Hello, a request id already in flight).
    ProtocolViolation,
    /// A message variant this agent does not implement (newer minor version).
    Unsupported,
    /// A well-formed request with invalid contents (empty args, relative path, bad signal).
    InvalidArgument,
    /// No such container or process.
    NotFound,
    /// A container or exec id that is already taken.
    AlreadyExists,
    /// Not possible in the current state (start twice, remove while running, ...).
    InvalidState,
    /// A limit of the agent was reached (too many containers, processes, connections).
    ResourceExhausted,
    /// A system call failed in the guest; the message names it.
    Io,
    /// A bug in the agent.
    Internal,
}
