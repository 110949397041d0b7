//! `kiln spec`: write a default config.json (runc's defaults: `sh` on a terminal).

use super::{CommandError, Context};
use crate::cli::SpecArgs;

/// Runs `spec`.
pub fn run(_ctx: &Context, args: &SpecArgs) -> Result<i32, CommandError> {
    let path = args.bundle.join("config.json");
    if path.exists() {
        return Err(CommandError::Usage(
            "File config.json exists. Remove it first".into(),
        ));
    }
    let spec = oci_spec::runtime::Spec::default();
    let json = serde_json::to_vec_pretty(&spec)
        .map_err(|e| CommandError::io(&path, "serialise", std::io::Error::other(e)))?;
    std::fs::write(&path, json).map_err(|e| CommandError::io(&path, "write", e))?;
    Ok(0)
}
