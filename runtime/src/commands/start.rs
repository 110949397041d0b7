//! `kiln start`: let the created process run.

use super::{CommandError, Context};
use crate::shim::exec::connect;
use crate::state::Status;

/// Runs `start`.
pub fn run(ctx: &Context, id: &str) -> Result<i32, CommandError> {
    let _lock = ctx.store.lock(id)?;
    let mut state = ctx.store.load(id)?;
    match state.status() {
        Status::Created => {}
        Status::Running | Status::Paused => {
            return Err(CommandError::InvalidState(
                "cannot start an already running container".into(),
            ))
        }
        Status::Stopped => {
            return Err(CommandError::InvalidState(
                "cannot start a container that has stopped".into(),
            ))
        }
        Status::Creating => {
            return Err(CommandError::InvalidState(
                "cannot start a container that is still being created".into(),
            ))
        }
    }
    let uds = state
        .vsock_uds
        .clone()
        .ok_or_else(|| CommandError::InvalidState("container has no VM socket recorded".into()))?;
    let client = connect(&uds, "kiln start")?;
    // The bundle may be gone by now (engines need not keep it): then no hooks run.
    let bundle = crate::bundle::Bundle::load(&state.bundle).ok();
    if let Some(bundle) = &bundle {
        if let Err(e) = crate::hooks::run_in_guest(
            &bundle.spec,
            crate::hooks::GuestStage::StartContainer,
            &state.oci_state(),
            &uds,
            id,
        ) {
            // The spec: a failed startContainer hook stops the container; `delete` follows.
            let _ = client.signal(id, kiln_protocol::INIT_EXEC_ID, libc::SIGKILL);
            return Err(e.into());
        }
    }
    client
        .start(id)
        .map_err(|e| CommandError::Agent("the agent could not start the container".into(), e))?;
    state.status = Status::Running;
    ctx.store.save(&state)?;
    if let Some(bundle) = &bundle {
        if let Err(e) = crate::hooks::run(
            &bundle.spec,
            crate::hooks::Stage::Poststart,
            &state.oci_state(),
        ) {
            log::warn!("{}", kiln_protocol::error_chain(&e));
        }
    }
    Ok(0)
}
