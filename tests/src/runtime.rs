//! The `kiln` runtime as the tests and the benchmark use it: the binary (built on demand), the
//! environment it needs (this workspace's kernel and guest-init) and busybox bundles.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::guests::target_dir;
use crate::{e2e, kernel};

/// Builds (once) and returns the `kiln` binary; `KILN_BIN` overrides.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_BIN") {
            return Ok(PathBuf::from(p));
        }
        let target = target_dir().map_err(|e| format!("{e:#}"))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let release = exe.components().any(|c| c.as_os_str() == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(crate::workspace_root())
            .args([
                "build",
                "-p",
                "kiln-runtime",
                "--bin",
                "kiln",
                "--target-dir",
            ])
            .arg(&target);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building kiln failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(target
            .join(if release { "release" } else { "debug" })
            .join("kiln"))
    });
    r.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// Environment for `kiln`: kernel and guest-init of this workspace.
pub fn kiln_env() -> Vec<(String, PathBuf)> {
    vec![
        ("KILN_KERNEL".into(), kernel::vmlinux()),
        (
            "KILN_GUEST_INIT".into(),
            e2e::guest_init_bin().expect("guest-init"),
        ),
    ]
}

/// A busybox bundle in `dir`: `rootfs/` with busybox-static and a config.json running `args`.
pub fn busybox_bundle(dir: &Path, args: &[&str]) -> PathBuf {
    let rootfs = dir.join("rootfs");
    e2e::busybox_tree(&rootfs).expect("busybox tree");
    let mut spec = oci_default(args);
    spec["process"]["terminal"] = false.into();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// A minimal runtime spec (what `kiln spec` writes, trimmed) running `args`.
pub fn oci_default(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "kiln-test",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin:/usr/bin", "TERM=xterm"],
            "cwd": "/"
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "mount" }, { "type": "ipc" },
                            { "type": "uts" } ]
        }
    })
}
