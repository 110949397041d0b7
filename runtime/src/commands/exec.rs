//! `kiln exec`: run a further process in a running container's VM. In the foreground it relays
//! stdio and returns the process's exit code; with `--detach` an exec shim does that and the pid
//! file names the shim (conmon and containerd wait for it).

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_protocol::oci::process_from_oci;
use kiln_protocol::ProcessSpec;

use super::{write_pid_file, CommandError, Context};
use crate::cli::ExecArgs;
use crate::shim::exec::{run_exec, ExecRequest};
use crate::shim::ShimRequest;
use crate::state::Status;

/// Runs `exec`.
pub fn run(ctx: &Context, args: &ExecArgs) -> Result<i32, CommandError> {
    let state = ctx.store.load(&args.id)?;
    match state.status() {
        Status::Running | Status::Created => {}
        Status::Paused => {
            return Err(CommandError::InvalidState(
                "cannot exec in a paused container".into(),
            ))
        }
        Status::Stopped | Status::Creating => {
            return Err(CommandError::InvalidState(
                "cannot exec in a stopped container".into(),
            ))
        }
    }
    if args.preserve_fds > 0 {
        return Err(CommandError::Unsupported(
            "--preserve-fds is not supported: host fds cannot be passed into a VM".into(),
        ));
    }
    let dir = ctx.store.dir(&args.id);
    let shim_path = dir.join("shim.json");
    let shim: ShimRequest = std::fs::read(&shim_path)
        .map_err(|e| CommandError::io(&shim_path, "read", e))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| {
                CommandError::io(&shim_path, "parse", std::io::Error::other(e.to_string()))
            })
        })?;
    let process = build_process(args, &shim.spec.process)?;
    if process.terminal && args.detach && args.console_socket.is_none() {
        return Err(CommandError::Usage(
            "cannot allocate tty if kiln will detach without setting console socket".into(),
        ));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let exec_id = format!("exec-{}-{nanos}", std::process::id());
    let vsock_uds = state
        .vsock_uds
        .clone()
        .ok_or_else(|| CommandError::InvalidState("container has no VM socket".into()))?;
    let request = ExecRequest {
        container_id: args.id.clone(),
        exec_id: exec_id.clone(),
        process,
        console_socket: args.console_socket.clone(),
        vsock_uds,
    };
    if args.detach {
        let path = dir.join(format!("{exec_id}.json"));
        let json = serde_json::to_vec(&request)
            .map_err(|e| CommandError::io(&path, "serialise", std::io::Error::other(e)))?;
        std::fs::write(&path, json).map_err(|e| CommandError::io(&path, "write", e))?;
        let path_str = path.to_string_lossy().into_owned();
        let child = ctx.spawn_helper(&["exec-shim", "--id", &args.id, "--request", &path_str]);
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        if let Some(pid_file) = &args.pid_file {
            write_pid_file(pid_file, child.id())?;
        }
        return Ok(0);
    }
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, std::process::id())?;
    }
    crate::shim::session::block_sigwinch();
    Ok(run_exec(&request, false, || {})?)
}

/// The process to run: `--process FILE`, or the command line on top of the container's process
/// (its env, cwd and user), with `--env`, `--cwd`, `--user`, `--tty` applied.
fn build_process(args: &ExecArgs, base: &ProcessSpec) -> Result<ProcessSpec, CommandError> {
    let mut p = match &args.process {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| CommandError::io(path, "read", e))?;
            let oci: oci_spec::runtime::Process = serde_json::from_slice(&bytes).map_err(|e| {
                CommandError::Usage(format!("{}: invalid process JSON: {e}", path.display()))
            })?;
            process_from_oci(&oci)
                .map_err(|e| CommandError::Usage(format!("{}: {e}", path.display())))?
        }
        None => {
            if args.command.is_empty() {
                return Err(CommandError::Usage(
                    "exec needs a command or --process".into(),
                ));
            }
            let mut p = base.clone();
            p.args = args.command.clone();
            p.terminal = args.tty;
            p.console_size = None;
            p
        }
    };
    if args.tty {
        p.terminal = true;
    }
    for kv in &args.env {
        let key = kv.split('=').next().unwrap_or_default();
        p.env.retain(|e| e.split('=').next() != Some(key));
        p.env.push(kv.clone());
    }
    if let Some(cwd) = &args.cwd {
        p.cwd = cwd.clone();
    }
    if let Some(user) = &args.user {
        let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
        let parse = |s: &str| {
            s.parse::<u32>().map_err(|_| {
                CommandError::Usage(format!("--user {user}: expected UID[:GID] numbers"))
            })
        };
        p.user.uid = parse(uid)?;
        p.user.gid = parse(gid)?;
    }
    if !args.additional_gids.is_empty() {
        p.user.additional_gids = args.additional_gids.clone();
    }
    if args.no_new_privs {
        p.no_new_privileges = true;
    }
    add_capabilities(&mut p, &args.cap)?;
    Ok(p)
}

/// `--cap NAME` (repeatable), as runc: each capability joins the bounding, effective and
/// permitted sets, and the inheritable and ambient sets when the process has inheritable ones.
/// A process without a capability list keeps the agent's full default, which already has it.
fn add_capabilities(p: &mut ProcessSpec, caps: &[String]) -> Result<(), CommandError> {
    let Some(set) = p.capabilities.as_mut() else {
        return Ok(());
    };
    for cap in caps {
        let upper = cap.to_ascii_uppercase();
        let name = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        if name.len() <= 4
            || !name[4..]
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_')
        {
            return Err(CommandError::Usage(format!(
                "--cap {cap}: not a capability name"
            )));
        }
        let with_inheritable = !set.inheritable.is_empty();
        let mut lists = vec![&mut set.bounding, &mut set.effective, &mut set.permitted];
        if with_inheritable {
            lists.push(&mut set.inheritable);
            lists.push(&mut set.ambient);
        }
        for list in lists {
            if !list.contains(&name) {
                list.push(name.clone());
                list.sort();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::Capabilities;

    #[test]
    fn cap_flags_extend_the_sets_like_runc() {
        let mut p = ProcessSpec {
            capabilities: Some(Capabilities {
                bounding: vec!["CAP_CHOWN".into()],
                effective: vec!["CAP_CHOWN".into()],
                permitted: vec!["CAP_CHOWN".into()],
                ..Capabilities::default()
            }),
            ..ProcessSpec::default()
        };
        add_capabilities(&mut p, &["net_admin".into(), "CAP_CHOWN".into()]).unwrap();
        let c = p.capabilities.as_ref().unwrap();
        assert_eq!(c.bounding, ["CAP_CHOWN", "CAP_NET_ADMIN"]);
        assert_eq!(c.effective, c.bounding);
        assert_eq!(c.permitted, c.bounding);
        assert!(c.inheritable.is_empty() && c.ambient.is_empty());
        p.capabilities.as_mut().unwrap().inheritable = vec!["CAP_CHOWN".into()];
        add_capabilities(&mut p, &["CAP_KILL".into()]).unwrap();
        let c = p.capabilities.as_ref().unwrap();
        assert_eq!(c.inheritable, ["CAP_CHOWN", "CAP_KILL"]);
        assert_eq!(c.ambient, ["CAP_KILL"]);
        assert!(add_capabilities(&mut p, &["CAP_".into()]).is_err());
        assert!(add_capabilities(&mut p, &["cap-x".into()]).is_err());
        let mut none = ProcessSpec::default();
        add_capabilities(&mut none, &["CAP_KILL".into()]).unwrap();
        assert!(none.capabilities.is_none());
    }
}
