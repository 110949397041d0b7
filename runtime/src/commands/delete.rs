//! `kiln delete`: stop whatever is left of a container (shim, VM) and remove its state directory
//! with the private disk, sockets and logs. `--force` also deletes running, paused, wedged and
//! half-created containers.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{CommandError, Context};
use crate::cli::DeleteArgs;
use crate::state::{process_alive, ContainerState, Status};

/// Runs `delete`.
pub fn run(ctx: &Context, args: &DeleteArgs) -> Result<i32, CommandError> {
    let _lock = match ctx.store.lock(&args.id) {
        Ok(l) => l,
        Err(crate::state::StateError::NotFound) => {
            return Err(crate::state::StateError::NotFound.into())
        }
        Err(e) => return Err(e.into()),
    };
    let state = match ctx.store.load(&args.id) {
        Ok(s) => Some(s),
        // A directory without state.json: a create that died before writing it.
        Err(crate::state::StateError::NotFound) if args.force => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(state) = &state {
        match state.status() {
            // We hold the lock that `create` holds throughout: still "creating" means that
            // create died half way, and what it left is removed.
            Status::Stopped | Status::Created | Status::Creating => {}
            s if args.force => log::info!("deleting {} in state {}", args.id, s.as_str()),
            s => {
                return Err(CommandError::InvalidState(format!(
                    "cannot delete container {} that is not stopped: {}",
                    args.id,
                    s.as_str()
                )))
            }
        }
        kill_processes(state);
        if let Some(cg) = crate::cgroups::HostCgroup::load(&ctx.store.dir(&args.id)) {
            cg.kill_leftovers();
            cg.remove();
        }
        if let Ok(bundle) = crate::bundle::Bundle::load(&state.bundle) {
            let mut oci = state.oci_state();
            oci["status"] = "stopped".into();
            oci["pid"] = 0.into();
            if let Err(e) = crate::hooks::run(&bundle.spec, crate::hooks::Stage::Poststop, &oci) {
                log::warn!("{}", kiln_protocol::error_chain(&e));
            }
        }
        // A VM directory outside the state directory (long --root paths).
        if let Some(vm_dir) = state.vsock_uds.as_ref().and_then(|u| u.parent()) {
            if !vm_dir.starts_with(ctx.store.dir(&args.id)) {
                let _ = std::fs::remove_dir_all(vm_dir);
            }
        }
    }
    ctx.store.remove(&args.id)?;
    Ok(0)
}

/// SIGKILLs the shim's session (the shim, the VMM and its helpers share its process group)
/// and the VMM, then waits up to 5 s for them to be gone.
pub fn kill_processes(state: &ContainerState) {
    let shim = state
        .shim_pid
        .filter(|&pid| pid > 1 && process_alive(pid, state.shim_start));
    if let Some(pid) = shim {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    // The VMM is also checked by its command line naming our state directory (pid reuse).
    let vmm = state
        .vmm_pid
        .filter(|&pid| pid > 1 && vmm_is_ours(pid, state));
    if let Some(pid) = vmm {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let shim_alive = shim.is_some_and(|p| process_alive(p, state.shim_start));
        let vmm_alive = vmm.is_some_and(|p| vmm_is_ours(p, state));
        if !shim_alive && !vmm_alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::warn!("processes of {} still alive after SIGKILL", state.id);
}

fn vmm_is_ours(pid: i32, state: &ContainerState) -> bool {
    if !process_alive(pid, None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = state
        .vsock_uds
        .as_ref()
        .and_then(|p| p.parent())
        .map(|d| d.as_os_str().as_encoded_bytes().to_vec())
        .unwrap_or_default();
    !needle.is_empty()
        && cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
}
