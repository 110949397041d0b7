//! The version handshake that opens every connection, for both sides.
//!
//! The host's first frame is [`HostMessage::Hello`] (control connection) or
//! [`HostMessage::Attach`] (stdio connection). The agent checks the version with
//! [`check_peer_version`] (same major required) and answers `HelloOk` / `AttachOk`, or an
//! [`AgentMessage::Error`] of kind [`ErrorKind::IncompatibleVersion`] and closes the connection.
//! [`open_connection`] does all of that for the agent from the first frame's raw body.

use crate::codec::{decode_body, peek_version};
use crate::messages::{
    AgentMessage, Attach, ErrorKind, ErrorReply, Hello, HelloOk, HostMessage, ProtocolVersion,
};
use crate::PROTOCOL_VERSION;

/// What the first frame of a connection asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A control connection: answer with [`hello_ok`], then serve requests.
    Control(Hello),
    /// A stdio connection: answer `AttachOk` (or an error), then relay raw bytes.
    Stdio(Attach),
}

/// Checks that a peer speaking `peer` can talk to us: the major versions must be equal.
pub fn check_peer_version(peer: ProtocolVersion) -> Result<(), ErrorReply> {
    if peer.major == PROTOCOL_VERSION.major {
        Ok(())
    } else {
        Err(ErrorReply::new(
            ErrorKind::IncompatibleVersion,
            format!(
                "incompatible protocol version {peer}: this side speaks {PROTOCOL_VERSION} \
                 (major versions must match)"
            ),
        ))
    }
}

/// Agent side: classifies and checks the first frame body of a new connection.
///
/// The error is the reply to send (as [`AgentMessage::Error`]) before closing the connection.
/// A frame of another major version is named as such even if the rest of it does not decode.
pub fn open_connection(first_body: &[u8]) -> Result<Opening, ErrorReply> {
    match decode_body::<HostMessage>(first_body) {
        Ok(HostMessage::Hello(hello)) => {
            check_peer_version(hello.version)?;
            Ok(Opening::Control(hello))
        }
        Ok(HostMessage::Attach(attach)) => {
            check_peer_version(attach.version)?;
            Ok(Opening::Stdio(attach))
        }
        Ok(HostMessage::Request { .. }) => Err(ErrorReply::new(
            ErrorKind::ProtocolViolation,
            "the first frame of a connection must be Hello or Attach, got a Request",
        )),
        Err(e) => {
            if let Some(version) = peek_version(first_body) {
                check_peer_version(version)?;
            }
            Err(ErrorReply::new(
                ErrorKind::MalformedFrame,
                format!("malformed first frame: {}", crate::error_chain(&e)),
            ))
        }
    }
}

/// Agent side: the reply to an accepted Hello.
pub fn hello_ok(agent: impl Into<String>) -> AgentMessage {
    AgentMessage::HelloOk(HelloOk {
        version: PROTOCOL_VERSION,
        agent: agent.into(),
    })
}

/// Host side: the Hello to send.
pub fn hello(client: impl Into<String>) -> HostMessage {
    HostMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        client: client.into(),
    })
}
