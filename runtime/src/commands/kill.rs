//! `kiln kill`: deliver a signal to the container's main process in the guest.
//!
//! `--all` signals every process of the container (`SignalContainer`, protocol 1.1: the guest
//! agent signals its cgroup's processes and its pid namespace), as runc signals every process of
//! the container's cgroup. An agent that predates it answers `Unsupported`; then only the main
//! process is signalled (with a pid namespace, SIGKILL of it still ends every process) and a
//! warning is logged. A paused container only takes SIGKILL, which stops its VM outright.

use kiln_protocol::client::ClientError;
use kiln_protocol::ErrorKind;

use super::{CommandError, Context};
use crate::cli::KillArgs;
use crate::shim::exec::connect;
use crate::signals::parse_signal;
use crate::state::Status;

/// Runs `kill`.
pub fn run(ctx: &Context, args: &KillArgs) -> Result<i32, CommandError> {
    let signal = parse_signal(args.signal.as_deref().unwrap_or("SIGTERM"))?;
    let state = ctx.store.load(&args.id)?;
    match state.status() {
        Status::Created | Status::Running => {}
        Status::Paused if signal == libc::SIGKILL => {
            super::delete::kill_processes(&state);
            return Ok(0);
        }
        Status::Paused => {
            return Err(CommandError::InvalidState(
                "container is paused: only SIGKILL can be delivered".into(),
            ))
        }
        Status::Stopped | Status::Creating => {
            return Err(CommandError::InvalidState("container not running".into()))
        }
    }
    let uds = state
        .vsock_uds
        .clone()
        .ok_or_else(|| CommandError::InvalidState("container not running".into()))?;
    let client = connect(&uds, "kiln kill")?;
    if args.all {
        match client.signal_container(&args.id, signal) {
            Ok(()) => return Ok(0),
            Err(ClientError::Agent(e)) if e.kind == ErrorKind::Unsupported => {
                log::warn!("the guest agent cannot signal all processes; signalling the main one");
            }
            Err(e) => return Err(CommandError::Agent(format!("signal {signal} failed"), e)),
        }
    }
    client
        .signal(&args.id, kiln_protocol::INIT_EXEC_ID, signal)
        .map_err(|e| CommandError::Agent(format!("signal {signal} failed"), e))?;
    Ok(0)
}
