//! Shared helpers for kiln's integration tests.
//!
//! Tests that need `/dev/kvm` call [`require_kvm`] first. When KVM is missing they do not pass
//! silently: they print a loud banner and append their name to the skip log
//! (`$KILN_SKIP_LOG`, default `<workspace>/target/kvm-skipped.log`), which `scripts/test.sh`
//! (and therefore `.ci/run`) turns into a failure whenever `/dev/kvm` exists.

use std::io::Write;
use std::path::PathBuf;

pub mod bounded;
pub mod e2e;
pub mod guests;
pub mod host_agent;
pub mod images;
pub mod kernel;
pub mod rootfs_boot;
pub mod runtime;

/// Root of the cargo workspace.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// Path of the file that records skipped KVM tests.
pub fn skip_log() -> PathBuf {
    std::env::var_os("KILN_SKIP_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("kvm-skipped.log"))
}

/// Returns true when `/dev/kvm` can be opened read-write. Otherwise records `test` as skipped,
/// prints a loud banner on stderr and returns false; the caller then returns early.
pub fn require_kvm(test: &str) -> bool {
    let why = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => return true,
        Err(e) => e,
    };
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! KVM TEST SKIPPED: {test}: cannot open /dev/kvm: {why}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    let log = skip_log();
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        let _ = writeln!(f, "{test}: {why}");
    }
    false
}
