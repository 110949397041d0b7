//! The guest kernel for boot tests: kiln's own `vmlinux`, built and cached by
//! `kernel-config/build.sh` (see kernel-config/README.md).
//!
//! The first call in a process runs `build.sh --print-path`, which returns at once when the
//! kernel for the current config is cached and otherwise builds it (minutes). The build script
//! serialises concurrent builds itself, so parallel test processes are safe.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::workspace_root;

/// Path of kiln's guest `vmlinux`, building it first if needed.
///
/// # Panics
/// When the build fails: every caller needs the kernel, so the panic carries the build script's
/// error output.
pub fn vmlinux() -> PathBuf {
    static VMLINUX: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VMLINUX.get_or_init(|| build("default")) {
        Ok(path) => path.clone(),
        Err(why) => panic!("kiln guest kernel unavailable: {why}"),
    }
}

/// Path of the PVM flavour of kiln's guest `vmlinux` (`build.sh --flavour pvm`: the default
/// kernel plus `kernel-config/patches-pvm/`, for hosts whose `/dev/kvm` is PVM), building it
/// first if needed.
///
/// # Panics
/// When the build fails, like [`vmlinux`].
pub fn vmlinux_pvm() -> PathBuf {
    static VMLINUX_PVM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VMLINUX_PVM.get_or_init(|| build("pvm")) {
        Ok(path) => path.clone(),
        Err(why) => panic!("kiln guest kernel (pvm flavour) unavailable: {why}"),
    }
}

fn build(flavour: &str) -> Result<PathBuf, String> {
    let script = workspace_root().join("kernel-config/build.sh");
    eprintln!(
        "kiln-tests: {} --print-path --flavour {flavour} (instant when cached, minutes otherwise)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print-path")
        .args(["--flavour", flavour])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{stderr}",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.trim());
    if !path.is_file() {
        return Err(format!(
            "{} printed '{}', which is not a file:\n{stderr}",
            script.display(),
            stdout.trim()
        ));
    }
    Ok(path)
}
