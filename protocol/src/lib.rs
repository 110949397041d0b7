//! Host-guest protocol of kiln (issue 3): length-prefixed bincode frames over any byte stream.
//!
//! The agent (guest-init, PID 1 in the microVM) serves it on vsock port [`AGENT_VSOCK_PORT`];
//! the host side (`host-vmm --`, the `kiln` runtime) uses [`client`]. The crate is transport
//! agnostic: frames travel over vsock, a unix socket (tests, the hybrid vsock of Firecracker-style
//! VMMs) or anything implementing `Read`/`Write`. The full description is in `protocol/README.md`.
//!
//! Modules:
//! - [`client`]: [`AgentClient`], the host side: handshake, concurrent calls, events.
//! - [`transport`]: Firecracker hybrid vsock connect, stdio stream attachment.
//! - [`codec`]: frames, the bincode options, [`FrameDecoder`], [`read_frame`] / [`write_frame`].
//! - [`handshake`]: the Hello / Attach version check for both sides.
//! - [`messages`]: every frame body ([`HostMessage`], [`AgentMessage`]) and what they carry.
//! - [`spec`]: [`ContainerSpec`], the self-contained subset of the OCI runtime spec.
//! - `oci` (feature `oci`): conversion from `oci_spec::runtime::Spec` to [`ContainerSpec`].
//!
//! This crate owns the wire format. It never interprets a spec (that is guest-init's job) and
//! never touches a VM.
#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod handshake;
pub mod messages;
#[cfg(feature = "oci")]
pub mod oci;
pub mod spec;
pub mod transport;

pub use client::{AgentClient, ClientError};

pub use codec::{
    decode_body, encode_body, encode_frame, read_frame, write_frame, FrameDecoder, FrameError,
};

pub use messages::{
    AgentInfo, AgentMessage, Attach, ContainerStats, ErrorKind, ErrorReply, Event, ExitStatus,
    Hello, HelloOk, HostMessage, ProtocolVersion, Request, Response, StdioStream,
};
pub use spec::{
    Capabilities, ContainerSpec, IdMapping, LinuxSpec, MountSpec, Namespace, NamespaceKind,
    ProcessSpec, Resources, Rlimit, RootSpec, SeccompArg, SeccompProfile, SeccompSyscall, TtySize,
    User, MAX_SECCOMP_ARGS, MAX_SECCOMP_NAMES, MAX_SECCOMP_NAME_LEN, MAX_SECCOMP_RULES,
};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };

/// vsock port the agent listens on, for control connections and stdio connections alike (the
/// first frame, [`HostMessage::Hello`] or [`HostMessage::Attach`], says which one it is).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Largest frame body accepted or produced, in bytes (1 MiB). Checked before any allocation.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Size of the frame header: the body length as a little-endian `u32`.
pub const FRAME_HEADER_LEN: usize = 4;

/// The `exec_id` that names a container's main process.
pub const INIT_EXEC_ID: &str = "";

/// Formats an error and its `source()` chain as one line: `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}
