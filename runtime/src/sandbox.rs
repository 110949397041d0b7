//! The VM of one container: which backend runs it, launching it, reaching its agent, killing it.
//!
//! Backends: host-vmm (kiln's own VMM, the default wherever it can run Linux userspace) and QEMU
//! `-M microvm` with KVM or TCG, whose vsock is rust-vmm's `vhost-device-vsock` (same hybrid
//! unix-socket interface as host-vmm). On a PVM host (`/sys/module/kvm_pvm`) neither host-vmm
//! nor QEMU/KVM can run an unmodified guest's userspace yet, so `auto` picks QEMU with TCG and
//! says so once in the log.
//!
//! Launching is [`crate::vm`]'s job; this module maps kiln's configuration (config file,
//! `--vmm`, the `io.kiln.vmm` annotation) to a [`vm::Backend`] and reports which backends work.
//! Files go to `<state dir>/vm/` (`vsock.sock`, `console.log`, the VMM's log), or to
//! `/run/kiln-vm/<hash>/` when that path would be too long for a unix socket.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::AgentClient;
use thiserror::Error;

use crate::bundle::VmSize;
use crate::config::{RuntimeConfig, VmmChoice};
use crate::vm::{self, Accel, Backend, HostProbe, Vm, VmConfig, VmError, VmTimings};

/// What guest-init prints on the console once it accepts connections.
const LISTENING: &[u8] = b"listening on vsock port";

/// Longest state directory path used for the VM's sockets as is.
const MAX_VM_DIR: usize = 80;

/// Errors of the VM layer.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// A backend that cannot work here.
    #[error("VMM backend {backend} is not usable here: {why}")]
    Unusable {
        /// The backend.
        backend: &'static str,
        /// Why.
        why: String,
    },
    /// No kernel configured.
    #[error("no guest kernel: set kernel in the runtime config or KILN_KERNEL")]
    NoKernel,
    /// Launching or talking to the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Connecting to a running VM's agent failed.
    #[error("cannot reach the guest agent")]
    Connect(#[source] Box<kiln_protocol::transport::TransportError>),
}

/// Whether one backend works on this host.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    /// Backend name.
    pub name: &'static str,
    /// `Ok` or why not.
    pub usable: Result<(), String>,
}

/// The short name of a backend (`state` annotations, logs, test output).
pub fn backend_name(b: &Backend) -> &'static str {
    match b {
        Backend::HostVmm { .. } => "host-vmm",
        Backend::QemuMicrovm { accel: Accel::Kvm } => "qemu-kvm",
        Backend::QemuMicrovm { accel: Accel::Tcg } => "qemu-tcg",
    }
}

fn host_vmm_binary(cfg: &RuntimeConfig) -> Option<PathBuf> {
    cfg.host_vmm
        .clone()
        .filter(|p| p.is_file())
        .or_else(vm::backend::find_host_vmm)
}

fn check(name: &'static str, cfg: &RuntimeConfig, probe: &HostProbe) -> Result<(), String> {
    if cfg.kernel.as_deref().is_none_or(|k| !k.is_file()) {
        return Err("no guest kernel (KILN_KERNEL or kernel in /etc/kiln/config.toml)".into());
    }
    let qemu_tools = || -> Result<(), String> {
        if cfg.qemu.is_none() {
            return Err("qemu-system-x86_64 not found (KILN_QEMU)".into());
        }
        if cfg.vhost_vsock.is_none() {
            return Err(
                "vhost-device-vsock not found (KILN_VHOST_DEVICE_VSOCK; cargo install \
                 vhost-device-vsock)"
                    .into(),
            );
        }
        Ok(())
    };
    match name {
        "host-vmm" => {
            if let Some(why) = probe.linux_userspace_blocker() {
                let kernel = cfg.kernel.as_deref().unwrap_or(Path::new(""));
                if !probe.pvm || probe.dev_kvm.is_err() {
                    return Err(why);
                }
                // PVM: the PVM kernel flavour runs userspace under host-vmm (slowly).
                if !is_pvm_flavour(kernel) {
                    return Err(format!(
                        "{why}; only the PVM kernel flavour (kernel-config/build.sh --flavour \
                         pvm) runs there, and {} is not it",
                        kernel.display()
                    ));
                }
            }
            host_vmm_binary(cfg)
                .map(drop)
                .ok_or_else(|| "host-vmm executable not found (KILN_HOST_VMM)".into())
        }
        "qemu-kvm" => {
            if let Some(why) = probe.linux_userspace_blocker() {
                return Err(why);
            }
            qemu_tools()
        }
        _ => qemu_tools(),
    }
}

/// Whether `kernel` is the PVM flavour of kiln's kernel, known by where `kernel-config/build.sh
/// --flavour pvm` and packages put it: `<cache>/pvm/<key>/vmlinux` (or the `<cache>/pvm/vmlinux`
/// link to it) and `<install dir>/vmlinux-pvm`. Links are resolved first.
pub fn is_pvm_flavour(kernel: &Path) -> bool {
    let real = std::fs::canonicalize(kernel).unwrap_or_else(|_| kernel.to_path_buf());
    let named = |p: Option<&Path>, n: &str| p.and_then(Path::file_name).is_some_and(|f| f == n);
    let pvm_path = |p: &Path| {
        named(Some(p), "vmlinux-pvm")
            || named(p.parent(), "pvm")
            || named(p.parent().and_then(Path::parent), "pvm")
    };
    pvm_path(kernel) || pvm_path(&real)
}

/// Every backend and whether it works here.
pub fn backend_report(cfg: &RuntimeConfig) -> Vec<BackendStatus> {
    let probe = HostProbe::system();
    ["host-vmm", "qemu-kvm", "qemu-tcg"]
        .into_iter()
        .map(|name| BackendStatus {
            name,
            usable: check(name, cfg, &probe),
        })
        .collect()
}

/// Resolves a choice to a backend that works, or says why none does. `auto` prefers host-vmm
/// and falls back to QEMU (KVM, else TCG) with one line in the log.
pub fn resolve(choice: VmmChoice, cfg: &RuntimeConfig) -> Result<Backend, SandboxError> {
    let probe = HostProbe::system();
    let want = |name: &'static str| -> Result<Backend, SandboxError> {
        check(name, cfg, &probe).map_err(|why| SandboxError::Unusable { backend: name, why })?;
        Ok(match name {
            "host-vmm" => Backend::HostVmm {
                binary: host_vmm_binary(cfg).unwrap_or_default(),
            },
            "qemu-kvm" => Backend::QemuMicrovm { accel: Accel::Kvm },
            _ => Backend::QemuMicrovm { accel: Accel::Tcg },
        })
    };
    match choice {
        VmmChoice::HostVmm => want("host-vmm"),
        VmmChoice::QemuKvm => want("qemu-kvm"),
        VmmChoice::QemuTcg => want("qemu-tcg"),
        VmmChoice::Qemu => want("qemu-kvm").or_else(|_| want("qemu-tcg")),
        // On PVM host-vmm boots the PVM flavour in about a minute, QEMU TCG in about a second.
        VmmChoice::Auto if probe.pvm => want("qemu-tcg")
            .inspect(|_| {
                log::info!(
                    "PVM host: using qemu-tcg (host-vmm needs the PVM kernel flavour and about a \
                     minute per boot there; --vmm host-vmm chooses it)"
                )
            })
            .or_else(|e| want("host-vmm").map_err(|_| e)),
        VmmChoice::Auto => want("host-vmm").or_else(|e| {
            let fallback = want("qemu-kvm").or_else(|_| want("qemu-tcg"))?;
            log::info!("{e}; using {}", backend_name(&fallback));
            Ok(fallback)
        }),
    }
}

/// Where the VM's sockets and logs go for the container whose state directory is `dir`.
pub fn vm_dir(dir: &Path) -> PathBuf {
    let inside = dir.join("vm");
    if inside.as_os_str().len() <= MAX_VM_DIR {
        return inside;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    PathBuf::from(format!("/run/kiln-vm/{:016x}", h.finish()))
}

/// A running VM.
pub struct Sandbox {
    vm: Vm,
    name: &'static str,
    /// host-vmm on a PVM host: the guest kernel runs emulated, boots take about a minute.
    pvm: bool,
}

impl Sandbox {
    /// Boots `disk` with the backend `choice` resolves to; files go to [`vm_dir`] of `dir`.
    pub fn launch(
        cfg: &RuntimeConfig,
        choice: VmmChoice,
        disk: &Path,
        drives: &[vm::Drive],
        size: VmSize,
        dir: &Path,
    ) -> Result<Sandbox, SandboxError> {
        let backend = resolve(choice, cfg)?;
        let kernel = cfg.kernel.clone().ok_or(SandboxError::NoKernel)?;
        // The vm module finds its tools through the environment; the config file may name them.
        if let Some(q) = &cfg.qemu {
            std::env::set_var(vm::QEMU_ENV, q);
        }
        if let Some(v) = &cfg.vhost_vsock {
            std::env::set_var(vm::VHOST_DEVICE_VSOCK_ENV, v);
        }
        let name = backend_name(&backend);
        let mut vc = VmConfig::new(kernel, disk, backend, vm_dir(dir));
        vc.mem_mib = size.memory_mib;
        vc.vcpus = size.vcpus;
        vc.drives = drives.to_vec();
        let vm = Vm::launch(&vc)?;
        let pvm = name == "host-vmm" && HostProbe::system().pvm;
        Ok(Sandbox { vm, name, pvm })
    }

    /// The backend running this VM.
    pub fn backend_name(&self) -> String {
        self.name.to_string()
    }

    /// Whether this is host-vmm on a PVM host (boots take about a minute, more under load).
    pub fn slow_boot(&self) -> bool {
        self.pvm
    }

    /// The hybrid vsock socket.
    pub fn vsock_uds(&self) -> PathBuf {
        self.vm.vsock_uds().to_path_buf()
    }

    /// The VMM process.
    pub fn vmm_pid(&self) -> Option<i32> {
        i32::try_from(self.vm.vmm_pid()).ok()
    }

    /// Spawn and agent-ready times.
    pub fn timings(&self) -> VmTimings {
        self.vm.timings()
    }

    /// Waits for the agent (up to `timeout`) and performs the handshake.
    ///
    /// The first connection is made only once guest-init has said on the console that it
    /// listens: a hybrid-vsock CONNECT sent to `vhost-device-vsock` before the guest's vsock
    /// driver is up was seen to be lost and to leave the device unanswering for good (agent
    /// "not up" for minutes). Polling a log file costs nothing and works for every backend.
    pub fn connect_agent(&mut self, timeout: Duration) -> Result<AgentClient, SandboxError> {
        let started = std::time::Instant::now();
        let console = self.vm.console_log().to_path_buf();
        while started.elapsed() < timeout {
            let text = std::fs::read(&console).unwrap_or_default();
            if text.windows(LISTENING.len()).any(|w| w == LISTENING) {
                break;
            }
            if self.vm.try_wait().ok().flatten().is_some() {
                break; // connect_agent below reports the exit with the console
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = timeout.saturating_sub(started.elapsed());
        Ok(self.vm.connect_agent(left.max(Duration::from_secs(1)))?)
    }

    /// Kills the VMM and its helpers and reaps them.
    pub fn kill(&mut self) {
        if let Err(e) = self.vm.kill() {
            log::warn!("stopping the VM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_flavour_is_known_by_its_path() {
        for k in [
            "/var/cache/kiln/kernel/pvm/46500c/vmlinux",
            "/var/cache/kiln/kernel/pvm/vmlinux",
            "/usr/lib/kiln/vmlinux-pvm",
        ] {
            assert!(is_pvm_flavour(Path::new(k)), "{k}");
        }
        for k in [
            "/var/cache/kiln/kernel/aaea66/vmlinux",
            "/var/cache/kiln/kernel/vmlinux",
            "/usr/lib/kiln/vmlinux",
        ] {
            assert!(!is_pvm_flavour(Path::new(k)), "{k}");
        }
    }
}
