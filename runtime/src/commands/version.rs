//! `kiln --version`: versions and which VMM backends work on this host (and why not).

use super::{CommandError, Context};
use crate::sandbox::backend_report;

/// Prints the version report.
pub fn run(ctx: &Context) -> Result<i32, CommandError> {
    println!("kiln version {}", env!("CARGO_PKG_VERSION"));
    println!("spec: 1.0.2");
    println!("protocol: {}", kiln_protocol::PROTOCOL_VERSION);
    match ctx.config() {
        Ok(cfg) => {
            println!("default vmm: {}", super::create::vmm_name(cfg.vmm));
            for b in backend_report(&cfg) {
                match &b.usable {
                    Ok(()) => println!("backend {}: usable", b.name),
                    Err(why) => println!("backend {}: unusable: {why}", b.name),
                }
            }
        }
        Err(e) => println!("runtime config: {e}"),
    }
    Ok(0)
}
