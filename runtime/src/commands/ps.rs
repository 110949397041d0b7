//! `kiln ps`: the host processes of a container. The container's own processes live inside the
//! VM, so the host side is the shim (which stands for the container), the VMM and the other
//! processes of the container's host cgroup ([`crate::cgroups`]).

use super::{CommandError, Context};
use crate::cli::PsArgs;
use crate::state::{process_alive, Status};

/// Runs `ps`.
pub fn run(ctx: &Context, args: &PsArgs) -> Result<i32, CommandError> {
    let state = ctx.store.load(&args.id)?;
    let mut pids = Vec::new();
    if state.status() != Status::Stopped {
        pids.extend(state.shim_pid);
        pids.extend(state.vmm_pid.filter(|&p| process_alive(p, None)));
        // Every host process of the container's host cgroup (vhost-device-vsock, helpers).
        if let Some(cg) = crate::cgroups::HostCgroup::load(&ctx.store.dir(&args.id)) {
            for pid in cg.procs() {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    match args.format.as_str() {
        "json" => println!("{}", serde_json::json!(pids)),
        "table" => {
            println!("{:>8} CMD", "PID");
            for pid in pids {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                println!("{pid:>8} {}", comm.trim_end());
            }
        }
        other => {
            return Err(CommandError::Usage(format!(
                "invalid format option {other:?}: use table or json"
            )))
        }
    }
    Ok(0)
}
