//! `kiln list`: every container under `--root`, as runc's table or JSON.

use super::{CommandError, Context};
use crate::cli::ListArgs;

/// Runs `list`.
pub fn run(ctx: &Context, args: &ListArgs) -> Result<i32, CommandError> {
    let mut states = Vec::new();
    for id in ctx.store.ids()? {
        match ctx.store.load(&id) {
            Ok(s) => states.push(s.oci_state()),
            Err(e) => log::warn!("skipping {id}: {e}"),
        }
    }
    if args.quiet {
        for s in &states {
            println!("{}", s["id"].as_str().unwrap_or_default());
        }
        return Ok(0);
    }
    match args.format.as_str() {
        "json" => println!("{}", serde_json::Value::Array(states)),
        "table" => {
            println!(
                "{:<12}{:<12}{:<12}{:<40}{:<32}OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                println!(
                    "{:<12}{:<12}{:<12}{:<40}{:<32}{}",
                    s["id"].as_str().unwrap_or_default(),
                    s["pid"].to_string(),
                    s["status"].as_str().unwrap_or_default(),
                    s["bundle"].as_str().unwrap_or_default(),
                    s["created"].as_str().unwrap_or_default(),
                    s["owner"].as_str().unwrap_or_default(),
                );
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
