//! The `kiln` runtime as the tests and the benchmark use it: the binary (built on demand), the
//! environment it needs (this workspace's kernel and guest-init) and busybox bundles.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::guests::workspace_bin;
use crate::{e2e, kernel};

/// Builds (once) and returns the `kiln` binary; `KILN_BIN` overrides.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BIN.get_or_init(|| {
        workspace_bin("kiln-runtime", "kiln", "KILN_BIN").map_err(|e| format!("{e:#}"))
    });
    built.clone().unwrap_or_else(|e| panic!("{e}"))
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
