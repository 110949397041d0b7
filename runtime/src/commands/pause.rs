//! `kiln pause` / `kiln resume`: freeze the whole VM by stopping the VMM process (SIGSTOP) and
//! let it continue (SIGCONT). The guest's clock jumps forward on resume, as after a host suspend.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{CommandError, Context};
use crate::state::{process_alive, Status};

/// Runs `pause` (`resume == false`) or `resume`.
pub fn run(ctx: &Context, id: &str, resume: bool) -> Result<i32, CommandError> {
    let _lock = ctx.store.lock(id)?;
    let mut state = ctx.store.load(id)?;
    let (want, next, signal) = if resume {
        (Status::Paused, Status::Running, Signal::SIGCONT)
    } else {
        (Status::Running, Status::Paused, Signal::SIGSTOP)
    };
    let status = state.status();
    if status != want {
        return Err(CommandError::InvalidState(format!(
            "container not {}",
            if resume { "paused" } else { "running" }
        )));
    }
    let vmm = state
        .vmm_pid
        .filter(|&p| process_alive(p, None))
        .ok_or_else(|| {
            CommandError::Unsupported(
                "this container's VMM process is unknown: pause/resume unsupported".into(),
            )
        })?;
    kill(Pid::from_raw(vmm), signal)
        .map_err(|e| CommandError::io(format!("pid {vmm}"), "signal the VMM", e.into()))?;
    state.status = next;
    ctx.store.save(&state)?;
    Ok(0)
}
