//! `kiln run`: create + start; attached (the default) it waits for the container, returns its
//! exit code and deletes it (unless `--keep`). While attached, the usual terminal and job-control
//! signals sent to `kiln run` are forwarded to the container's main process (as runc does), and
//! the caller's terminal settings are restored at the end.

use std::os::unix::process::ExitStatusExt;

use nix::sys::signal::{SigSet, Signal};

use super::{write_pid_file, CommandError, Context};
use crate::cli::{DeleteArgs, RunArgs};

/// Runs `run`.
pub fn run(ctx: &Context, args: &RunArgs) -> Result<i32, CommandError> {
    let id = &args.create.id;
    let saved_termios = (!args.detach)
        .then(|| nix::sys::termios::tcgetattr(std::io::stdin()).ok())
        .flatten();
    let forwarded = [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    let mut set = SigSet::empty();
    if !args.detach {
        for s in forwarded {
            set.add(s);
        }
        // Blocked before any thread starts; the forwarder takes them with sigwait.
        let _ = set.thread_block();
    }
    let mut child = super::create::create(ctx, &args.create, !args.detach)?;
    if let Some(pid_file) = &args.create.pid_file {
        write_pid_file(pid_file, child.id())?;
    }
    if let Err(e) = super::start::run(ctx, id) {
        let _ = super::delete::run(
            ctx,
            &DeleteArgs {
                force: true,
                id: id.clone(),
            },
        );
        let _ = child.wait();
        return Err(e);
    }
    if args.detach {
        return Ok(0);
    }
    spawn_forwarder(ctx, id, set);
    let status = child
        .wait()
        .map_err(|e| CommandError::io("shim", "wait", e))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    if let Some(t) = saved_termios {
        let _ =
            nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t);
    }
    if !args.keep {
        super::delete::run(
            ctx,
            &DeleteArgs {
                force: true,
                id: id.clone(),
            },
        )?;
    }
    Ok(code)
}

/// Forwards the signals in `set` (blocked in every thread) to the container's main process.
fn spawn_forwarder(ctx: &Context, id: &str, set: SigSet) {
    let Some(uds) = ctx.store.load(id).ok().and_then(|s| s.vsock_uds) else {
        return;
    };
    let id = id.to_string();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut client = None;
            while let Ok(sig) = set.wait() {
                if client.is_none() {
                    client = crate::shim::exec::connect(&uds, "kiln run").ok();
                }
                if let Some(c) = &client {
                    if let Err(e) = c.signal(&id, kiln_protocol::INIT_EXEC_ID, sig as i32) {
                        log::warn!("forwarding {sig}: {}", kiln_protocol::error_chain(&e));
                    }
                }
            }
        });
}
