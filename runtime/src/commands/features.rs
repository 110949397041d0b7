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
            // Applied by guest-init inside the guest (its own BPF compiler, x86_64 only).
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"
                ],
                "operators": [
                    "SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_GT",
                    "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ"
                ],
                "archs": ["SCMP_ARCH_X86_64"],
                "knownFlags": [
                    "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                    "SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"
                ],
                "supportedFlags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]
            },
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
