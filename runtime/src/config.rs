//! The runtime configuration: `/etc/kiln/config.toml` (or `$KILN_CONFIG`), then environment
//! overrides, then built-in defaults.
//!
//! The file is a flat subset of TOML: `key = "string"` or `key = 123` lines, `#` comments.
//! Keys: `kernel`, `guest_init`, `host_vmm`, `qemu`, `vhost_device_vsock`, `vmm`
//! (`host-vmm`, `qemu`, `qemu-kvm`, `qemu-tcg`, `auto`), `image_cache`, `memory_mib`, `vcpus`.
//! Environment: `KILN_KERNEL`, `KILN_GUEST_INIT`, `KILN_HOST_VMM`, `KILN_QEMU`,
//! `KILN_VHOST_DEVICE_VSOCK`, `KILN_VMM`, `KILN_IMAGE_CACHE`.
//! Without `kernel` or `KILN_KERNEL`, the kernel is the installed or last built kiln kernel of
//! the host's flavour (the PVM flavour on a PVM host), as host-vmm's `--kernel auto` picks it.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/kiln/config.toml";

/// Default VM memory when neither annotations nor limits say otherwise.
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// Errors reading the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("{path}: cannot read the runtime config")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not `key = value`, or a bad value.
    #[error("{path}:{line}: {problem}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// An unknown VMM name.
    #[error("unknown VMM {0:?} (expected host-vmm, qemu, qemu-kvm, qemu-tcg or auto)")]
    UnknownVmm(String),
}

/// Which VMM the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmChoice {
    /// host-vmm if it can run Linux userspace here, else QEMU (the default).
    Auto,
    /// kiln's own VMM.
    HostVmm,
    /// QEMU microvm, KVM if usable, else TCG.
    Qemu,
    /// QEMU microvm with KVM.
    QemuKvm,
    /// QEMU microvm with TCG (software).
    QemuTcg,
}

impl std::str::FromStr for VmmChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "auto" | "" => VmmChoice::Auto,
            "host-vmm" | "hostvmm" => VmmChoice::HostVmm,
            "qemu" => VmmChoice::Qemu,
            "qemu-kvm" => VmmChoice::QemuKvm,
            "qemu-tcg" => VmmChoice::QemuTcg,
            other => return Err(ConfigError::UnknownVmm(other.to_string())),
        })
    }
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Guest kernel (`vmlinux`).
    pub kernel: Option<PathBuf>,
    /// Static guest-init binary put into every image.
    pub guest_init: Option<PathBuf>,
    /// host-vmm binary.
    pub host_vmm: Option<PathBuf>,
    /// QEMU binary.
    pub qemu: Option<PathBuf>,
    /// vhost-device-vsock binary (QEMU backend).
    pub vhost_vsock: Option<PathBuf>,
    /// Preferred VMM.
    pub vmm: VmmChoice,
    /// Image cache directory.
    pub image_cache: PathBuf,
    /// Default VM memory (MiB).
    pub memory_mib: u32,
    /// Default vCPUs.
    pub vcpus: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            kernel: None,
            guest_init: None,
            host_vmm: None,
            qemu: None,
            vhost_vsock: None,
            vmm: VmmChoice::Auto,
            image_cache: PathBuf::from(rootfs_builder::DEFAULT_CACHE_DIR),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
        }
    }
}

impl RuntimeConfig {
    /// Reads the config file (missing is fine) and applies the environment overrides.
    pub fn load() -> Result<Self, ConfigError> {
        let path = std::env::var_os("KILN_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let mut cfg = RuntimeConfig::default();
        match std::fs::read_to_string(&path) {
            Ok(text) => cfg.apply_file(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Read { path, source }),
        }
        cfg.apply_env()?;
        cfg.fill_defaults();
        Ok(cfg)
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        for (i, raw) in text.lines().enumerate() {
            let syntax = |problem: String| ConfigError::Syntax {
                path: path.to_path_buf(),
                line: i + 1,
                problem,
            };
            let line = raw.split_once('#').map_or(raw, |(l, _)| l).trim();
            if line.is_empty() || line.starts_with('[') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| syntax(format!("expected key = value, got {line:?}")))?;
            let (key, value) = (key.trim(), value.trim());
            let string = || -> Result<String, ConfigError> {
                value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string)
                    .ok_or_else(|| syntax(format!("{key}: expected a quoted string")))
            };
            let number = || -> Result<u32, ConfigError> {
                value
                    .parse()
                    .map_err(|_| syntax(format!("{key}: expected a number, got {value}")))
            };
            match key {
                "kernel" => self.kernel = Some(string()?.into()),
                "guest_init" => self.guest_init = Some(string()?.into()),
                "host_vmm" => self.host_vmm = Some(string()?.into()),
                "qemu" => self.qemu = Some(string()?.into()),
                "vhost_device_vsock" => self.vhost_vsock = Some(string()?.into()),
                "vmm" => self.vmm = string()?.parse().map_err(|e| syntax(format!("{e}")))?,
                "image_cache" => self.image_cache = string()?.into(),
                "memory_mib" => self.memory_mib = number()?,
                "vcpus" => self.vcpus = number()?,
                other => return Err(syntax(format!("unknown key {other:?}"))),
            }
        }
        Ok(())
    }

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        let path = |name: &str| std::env::var_os(name).map(PathBuf::from);
        if let Some(p) = path("KILN_KERNEL") {
            self.kernel = Some(p);
        }
        if let Some(p) = path("KILN_GUEST_INIT") {
            self.guest_init = Some(p);
        }
        if let Some(p) = path("KILN_HOST_VMM") {
            self.host_vmm = Some(p);
        }
        if let Some(p) = path("KILN_QEMU") {
            self.qemu = Some(p);
        }
        if let Some(p) = path("KILN_VHOST_DEVICE_VSOCK") {
            self.vhost_vsock = Some(p);
        }
        if let Some(p) = path("KILN_IMAGE_CACHE") {
            self.image_cache = p;
        }
        if let Ok(v) = std::env::var("KILN_VMM") {
            self.vmm = v.parse()?;
        }
        Ok(())
    }

    /// Well-known install locations for whatever is still unset.
    fn fill_defaults(&mut self) {
        let first = |candidates: &[PathBuf]| candidates.iter().find(|p| p.is_file()).cloned();
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        if self.kernel.is_none() {
            let pvm = Path::new("/sys/module/kvm_pvm").exists();
            // Links resolved: a rebuild moving the link does not change a running sandbox's kernel.
            self.kernel = first(&kernel_candidates(
                pvm,
                Path::new(INSTALL_DIR),
                &kernel_cache(),
            ))
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        }
        if self.guest_init.is_none() {
            let mut c = vec![PathBuf::from("/usr/lib/kiln/guest-init")];
            if let Some(d) = &exe_dir {
                c.push(d.join("guest-init"));
            }
            self.guest_init = first(&c);
        }
        if self.host_vmm.is_none() {
            let mut c = Vec::new();
            if let Some(d) = &exe_dir {
                c.push(d.join("host-vmm"));
            }
            c.push(PathBuf::from("/usr/lib/kiln/host-vmm"));
            c.extend(in_path("host-vmm"));
            self.host_vmm = first(&c);
        }
        if self.qemu.is_none() {
            self.qemu = in_path("qemu-system-x86_64");
        }
        if self.vhost_vsock.is_none() {
            let mut c: Vec<PathBuf> = in_path("vhost-device-vsock").into_iter().collect();
            c.push(PathBuf::from("/root/.cargo/bin/vhost-device-vsock"));
            self.vhost_vsock = first(&c);
        }
    }
}

/// Where a packaged kiln installs its kernels, guest-init and host-vmm.
const INSTALL_DIR: &str = "/usr/lib/kiln";

/// kernel-config/build.sh's cache root.
fn kernel_cache() -> PathBuf {
    std::env::var_os("KILN_KERNEL_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/kiln/kernel"), PathBuf::from)
}

/// The kernels to try when neither the config file nor `KILN_KERNEL` names one, in order: the
/// installed kernel of the host's flavour, then the stable link `kernel-config/build.sh` keeps
/// to the one it last built for that flavour. A PVM host (`/sys/module/kvm_pvm`) uses only the
/// PVM flavour (its userspace is the only one that runs under host-vmm there; under QEMU TCG it
/// behaves like the default one), any other host only the default flavour. The same rule as
/// host-vmm's `--kernel auto` (`host-vmm/src/kernel_pick.rs`), kept in step by hand: the runtime
/// does not link host-vmm.
fn kernel_candidates(pvm: bool, install_dir: &Path, cache: &Path) -> Vec<PathBuf> {
    if pvm {
        vec![install_dir.join("vmlinux-pvm"), cache.join("pvm/vmlinux")]
    } else {
        vec![install_dir.join("vmlinux"), cache.join("vmlinux")]
    }
}

/// `name` looked up in `$PATH`.
pub fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_subset_parses_and_reports_lines() {
        let mut c = RuntimeConfig::default();
        let text = "# kiln\nkernel = \"/k\"  # comment\nvmm = \"qemu-tcg\"\nmemory_mib = 512\n";
        c.apply_file(Path::new("/etc/kiln/config.toml"), text)
            .unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.vmm, VmmChoice::QemuTcg);
        assert_eq!(c.memory_mib, 512);
        let err = c
            .apply_file(Path::new("/c.toml"), "\nmemory_mib = lots\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "/c.toml:2: memory_mib: expected a number, got lots");
        let err = c
            .apply_file(Path::new("/c.toml"), "colour = \"red\"")
            .unwrap_err();
        assert!(err.to_string().contains("unknown key"), "{err}");
    }

    #[test]
    fn kernel_candidates_follow_the_host_flavour() {
        let (lib, cache) = (Path::new("/l"), Path::new("/c"));
        assert_eq!(
            kernel_candidates(false, lib, cache),
            [PathBuf::from("/l/vmlinux"), PathBuf::from("/c/vmlinux")]
        );
        assert_eq!(
            kernel_candidates(true, lib, cache),
            [
                PathBuf::from("/l/vmlinux-pvm"),
                PathBuf::from("/c/pvm/vmlinux")
            ]
        );
    }
}
