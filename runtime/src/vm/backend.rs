//! Which VMM runs kiln's microVMs, and why.
//!
//! host-vmm is the default. It needs a KVM that can run an ordinary Linux guest's userspace:
//! hardware KVM does, PVM (`kvm_pvm`, the software KVM of the development machines, see
//! design.md "This machine's KVM is PVM") does not, because SYSCALL from guest userspace is not
//! delivered to an unmodified guest kernel there. Then QEMU `-M microvm` with TCG (pure software)
//! runs the same kernel, image and agent, with `vhost-device-vsock` as its vsock device.
//! [`Backend::detect`] makes that choice and says why, for `kiln features` and test logs.

use std::fmt;
use std::path::{Path, PathBuf};

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware (or PVM) KVM: `-accel kvm -cpu host,-arch-capabilities`.
    Kvm,
    /// Pure software emulation: `-accel tcg -cpu max`.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The VMM that runs a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// kiln's own VMM, with its built-in userspace vsock device (`--vsock-uds`).
    HostVmm {
        /// The `host-vmm` executable.
        binary: PathBuf,
    },
    /// `qemu-system-x86_64 -M microvm` with `vhost-device-vsock` serving the vsock device.
    QemuMicrovm {
        /// KVM or TCG.
        accel: Accel,
    },
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::HostVmm { binary } => write!(f, "host-vmm ({})", binary.display()),
            Backend::QemuMicrovm { accel } => write!(f, "qemu-microvm ({})", accel.as_str()),
        }
    }
}

/// The result of [`Backend::detect`]: the backend and one line saying why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// The chosen backend.
    pub backend: Backend,
    /// Why, e.g. "`/dev/kvm` is PVM (kvm_pvm loaded): ...".
    pub reason: String,
}

/// The environment variable naming the host-vmm executable to use.
pub const HOST_VMM_ENV: &str = "KILN_HOST_VMM";

impl Backend {
    /// Chooses host-vmm when this host's KVM can run Linux userspace and a host-vmm executable
    /// is found ([`find_host_vmm`]), else QEMU microvm with TCG.
    pub fn detect() -> Detection {
        Self::detect_with(&HostProbe::system(), find_host_vmm())
    }

    /// [`detect`](Self::detect) on given facts (unit tests).
    pub fn detect_with(probe: &HostProbe, host_vmm: Option<PathBuf>) -> Detection {
        if let Some(why) = probe.linux_userspace_blocker() {
            return Detection {
                backend: Backend::QemuMicrovm { accel: Accel::Tcg },
                reason: format!("host-vmm cannot run Linux userspace here: {why}; using QEMU TCG"),
            };
        }
        match host_vmm {
            Some(binary) => Detection {
                reason: format!(
                    "/dev/kvm is usable and not PVM: host-vmm ({})",
                    binary.display()
                ),
                backend: Backend::HostVmm { binary },
            },
            None => Detection {
                backend: Backend::QemuMicrovm { accel: Accel::Kvm },
                reason: format!(
                    "/dev/kvm is usable but no host-vmm executable was found (${HOST_VMM_ENV}, \
                     next to this program, PATH); using QEMU with KVM"
                ),
            },
        }
    }
}

/// Facts about the host's KVM that decide whether host-vmm can boot Linux to userspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    /// `Err(why)` when `/dev/kvm` cannot be opened read-write.
    pub dev_kvm: Result<(), String>,
    /// `/sys/module/kvm_pvm` exists.
    pub pvm: bool,
}

impl HostProbe {
    /// Probes `/dev/kvm` and `/sys/module/kvm_pvm`.
    pub fn system() -> HostProbe {
        Self::probe(Path::new("/dev/kvm"), Path::new("/sys"))
    }

    /// Probes the given KVM device node and sysfs root.
    pub fn probe(dev_kvm: &Path, sys_root: &Path) -> HostProbe {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev_kvm)
            .map(drop)
            .map_err(|e| format!("cannot open {}: {e}", dev_kvm.display()));
        HostProbe {
            dev_kvm: dev,
            pvm: sys_root.join("module/kvm_pvm").exists(),
        }
    }

    /// Why host-vmm cannot run a Linux guest's userspace on this host, or `None` when it can.
    pub fn linux_userspace_blocker(&self) -> Option<String> {
        if let Err(why) = &self.dev_kvm {
            return Some(why.clone());
        }
        if self.pvm {
            return Some(
                "/dev/kvm is PVM (kvm_pvm loaded): it delivers no SYSCALL from guest userspace \
                 to an unmodified guest kernel and emulates guest kernel code at ~1.4 MIPS \
                 (design.md, \"This machine's KVM is PVM\")"
                    .into(),
            );
        }
        None
    }
}

/// The host-vmm executable: `$KILN_HOST_VMM`, else `host-vmm` next to the running program (or
/// one directory up, for cargo's `deps/` test binaries), else on `PATH`.
pub fn find_host_vmm() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(HOST_VMM_ENV) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    if let Ok(exe) = std::env::current_exe() {
        let near = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("host-vmm"))
            .find(|p| p.is_file());
        if near.is_some() {
            return near;
        }
    }
    find_in_path("host-vmm")
}

/// `name` in one of `PATH`'s directories.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(dev_kvm: Result<(), String>, pvm: bool) -> HostProbe {
        HostProbe { dev_kvm, pvm }
    }

    #[test]
    fn pvm_host_uses_qemu_tcg_and_says_why() {
        let d = Backend::detect_with(&probe(Ok(()), true), Some("/x/host-vmm".into()));
        assert_eq!(d.backend, Backend::QemuMicrovm { accel: Accel::Tcg });
        assert!(d.reason.contains("PVM"), "{}", d.reason);
    }

    #[test]
    fn no_kvm_uses_qemu_tcg() {
        let d = Backend::detect_with(&probe(Err("cannot open /dev/kvm: x".into()), false), None);
        assert_eq!(d.backend, Backend::QemuMicrovm { accel: Accel::Tcg });
        assert!(d.reason.contains("cannot open /dev/kvm"), "{}", d.reason);
    }

    #[test]
    fn hardware_kvm_uses_host_vmm_when_found() {
        let d = Backend::detect_with(&probe(Ok(()), false), Some("/x/host-vmm".into()));
        assert_eq!(
            d.backend,
            Backend::HostVmm {
                binary: "/x/host-vmm".into()
            }
        );
        let d = Backend::detect_with(&probe(Ok(()), false), None);
        assert_eq!(d.backend, Backend::QemuMicrovm { accel: Accel::Kvm });
    }

    #[test]
    fn probe_reads_sysfs() {
        let dir = std::env::temp_dir().join(format!("kiln-probe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        let p = HostProbe::probe(&dir.join("no-such-kvm"), &dir);
        assert!(p.pvm);
        assert!(p.dev_kvm.is_err());
        assert!(p.linux_userspace_blocker().unwrap().contains("no-such-kvm"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
