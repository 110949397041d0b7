//! `kiln kill`: deliver a signal to the container's main process in the guest.
//!
//! `--all` signals the main process too: with a pid namespace (the default), SIGKILL of the main
//! process ends every process of the container, as the kernel kills a pid namespace with its
//! init. A paused container only takes SIGKILL, which stops its VM outright.

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
    client
        .signal(&args.id, kiln_protocol::INIT_EXEC_ID, signal)
        .map_err(|e| CommandError::Agent(format!("signal {signal} failed"), e))?;
    Ok(0)
}
