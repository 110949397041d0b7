//! `kiln features`: what this runtime supports, in the JSON shape of runc's `features`
//! (runtime-spec features document), with the VMM backends usable on this host under
//! `annotations`.

use super::{CommandError, Context};
use crate::sandbox::backend_report;

/// Runs `features`.
pub fn run(ctx: &Context) -> Result<i32, CommandError> {
    let cfg = ctx.config()?;
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        "io.kiln.vmm.default".into(),
        super::create::vmm_name(cfg.vmm).into(),
    );
    for b in backend_report(&cfg) {
        let v = match &b.usable {
            Ok(()) => "usable".to_string(),
            Err(why) => format!("unusable: {why}"),
        };
        annotations.insert(format!("io.kiln.backend.{}", b.name), v.into());
    }
    let features = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
            "relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime",
            "bind", "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts", "user"],
            "capabilities": [],
            // Host: the VM processes join linux.cgroupsPath on v1, hybrid or v2 (cgroupfs; a
            // systemd-form path is mapped without systemd). Guest: v2.
            "cgroup": { "v1": true, "v2": true, "systemd": false, "systemdUser": false },
            "seccomp": { "enabled": false },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": annotations,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&features).map_err(|e| CommandError::Usage(e.to_string()))?
    );
    Ok(0)
}
