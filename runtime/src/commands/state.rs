//! `kiln state`: the runtime-spec state JSON.

use super::{CommandError, Context};

/// Runs `state`.
pub fn run(ctx: &Context, id: &str) -> Result<i32, CommandError> {
    let state = ctx.store.load(id)?;
    let json = serde_json::to_string_pretty(&state.oci_state())
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    println!("{json}");
    Ok(0)
}
