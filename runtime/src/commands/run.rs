//! `kiln run`: create + start; attached (the default) it waits for the container, returns its
//! exit code and deletes it (unless `--keep`).

use std::os::unix::process::ExitStatusExt;

use super::{write_pid_file, CommandError, Context};
use crate::cli::{DeleteArgs, RunArgs};

/// Runs `run`.
pub fn run(ctx: &Context, args: &RunArgs) -> Result<i32, CommandError> {
    let id = &args.create.id;
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
    let status = child
        .wait()
        .map_err(|e| CommandError::io("shim", "wait", e))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
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
