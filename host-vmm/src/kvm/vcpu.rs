//! vCPU set-up and the per-vCPU thread: `KVM_RUN` in a loop, PIO/MMIO exits dispatched to the
//! buses, every other exit turned into a VM outcome.
//!
//! Stopping: the event loop sets the exit flag and sends [`kick_signal`] to each vCPU thread.
//! The handler sets `kvm_run.immediate_exit` through a thread-local pointer, so a signal that
//! lands just before the thread enters `KVM_RUN` still makes that call return at once (EINTR).
//! The vCPU thread never processes virtio queues; those go through ioeventfds to the event loop.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;

use kvm_bindings::{
    kvm_run, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use libc::{c_int, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::cpuid::adjust_cpuid;
use super::regs::{apply_boot_state, apply_common, RegsError};
use crate::boot::BootProtocol;
use crate::devices::bus::Bus;
use crate::exit::{ExitHandle, VmOutcome};
use crate::seccomp::ThreadFilter;

/// Errors preparing a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM rejected the CPUID table.
    #[error("vCPU {0}: KVM_SET_CPUID2 failed")]
    Cpuid(u8, #[source] kvm_ioctls::Error),
    /// The adjusted table exceeds KVM's limit.
    #[error("vCPU {0}: {1} CPUID entries exceed KVM's maximum")]
    CpuidTooLarge(u8, usize),
    /// Register state could not be set.
    #[error("vCPU {0}: cannot set initial state")]
    Regs(u8, #[source] RegsError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by the vCPU thread to its own mmap'd `kvm_run` page
            // while its `VcpuFd` is alive and cleared before the fd is dropped; the handler runs
            // on that same thread. A volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler (once per process, before vCPU threads start).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// Sets CPUID, FPU, MSRs and LAPIC of vCPU `id` of `count`; the boot vCPU also gets the entry
/// registers of `boot`.
pub fn configure_vcpu(
    fd: &VcpuFd,
    id: u8,
    count: u8,
    base_cpuid: &CpuId,
    boot: Option<(BootProtocol, u64)>,
) -> Result<(), VcpuError> {
    let mut entries = base_cpuid.as_slice().to_vec();
    adjust_cpuid(&mut entries, id, count);
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| VcpuError::CpuidTooLarge(id, entries.len()))?;
    if log::log_enabled!(log::Level::Trace) {
        for e in cpuid.as_slice() {
            log::trace!(
                "vCPU {id}: CPUID {:#x}.{}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                e.function,
                e.index,
                e.eax,
                e.ebx,
                e.ecx,
                e.edx
            );
        }
    }
    fd.set_cpuid2(&cpuid).map_err(|e| VcpuError::Cpuid(id, e))?;
    apply_common(fd).map_err(|e| VcpuError::Regs(id, e))?;
    if let Some((protocol, entry)) = boot {
        apply_boot_state(fd, protocol, entry).map_err(|e| VcpuError::Regs(id, e))?;
    }
    Ok(())
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitHandle,
    /// CPUID base and vCPU count when this (application processor) vCPU configures itself on
    /// its own thread, off the boot vCPU's critical path.
    deferred_setup: Option<(Arc<CpuId>, u8)>,
    /// Installed on the thread just before the first `KVM_RUN`.
    seccomp: Option<ThreadFilter>,
}

/// What the loop does after one exit.
enum Next {
    Continue,
    /// This vCPU is done (the VM outcome, if any, was already requested).
    Stop,
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(id: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>, exit: ExitHandle) -> Self {
        Self {
            id,
            fd,
            pio,
            mmio,
            exit,
            deferred_setup: None,
            seccomp: None,
        }
    }

    /// Installs `filter` on the vCPU thread after its set-up, before the first `KVM_RUN`.
    pub fn with_seccomp(mut self, filter: ThreadFilter) -> Self {
        self.seccomp = Some(filter);
        self
    }

    /// Defers [`configure_vcpu`] (without entry registers) to the start of [`Vcpu::run`], so
    /// application processors set themselves up in parallel while vCPU 0 already runs. Safe
    /// because an AP only executes after the guest's INIT/SIPI, which KVM keeps pending in
    /// the in-kernel LAPIC until the AP's first `KVM_RUN`, after its set-up.
    pub fn with_deferred_setup(mut self, base_cpuid: Arc<CpuId>, count: u8) -> Self {
        self.deferred_setup = Some((base_cpuid, count));
        self
    }

    /// Runs the guest until the VM stops. Thread body.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        if let Some((cpuid, count)) = self.deferred_setup.take() {
            if let Err(e) = configure_vcpu(&self.fd, self.id, count, &cpuid, None) {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                self.exit.request(VmOutcome::HostError(msg));
            }
        }
        if let Some(filter) = self.seccomp.take() {
            if let Err(e) = filter.apply() {
                let msg = crate::seccomp::describe(&e);
                self.exit
                    .request(VmOutcome::HostError(format!("vCPU {}: {msg}", self.id)));
            }
        }
        while !self.exit.is_stopping() {
            if let Next::Stop = self.run_once() {
                break;
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    fn crash(&self, what: String) -> Next {
        let rip = match self.fd.get_regs() {
            Ok(r) => format!(" at RIP {:#x}", r.rip),
            Err(_) => String::new(),
        };
        self.exit.request(VmOutcome::GuestCrash(format!(
            "vCPU {}: {what}{rip}",
            self.id
        )));
        Next::Stop
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Next::Continue;
            }
            Err(e) => {
                self.exit.request(VmOutcome::HostError(format!(
                    "vCPU {id}: KVM_RUN failed: {e}"
                )));
                return Next::Stop;
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    log::debug!("vCPU {id}: read of unknown port {port:#x}");
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                if !self.pio.write(u64::from(port), data) {
                    log::debug!("vCPU {id}: write {data:02x?} to unknown port {port:#x}");
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    log::debug!("vCPU {id}: read of unmapped MMIO {addr:#x}");
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    log::debug!("vCPU {id}: write to unmapped MMIO {addr:#x}");
                }
            }
            VcpuExit::Hlt => {
                log::info!("vCPU {id}: halted");
                self.exit.vcpu_halted();
                return Next::Stop;
            }
            VcpuExit::IoapicEoi(_) | VcpuExit::Intr => {}
            VcpuExit::Shutdown => return self.crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            VcpuExit::FailEntry(reason, cpu) => {
                return self.crash(format!(
                    "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                ))
            }
            VcpuExit::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel
                // fills the `internal` member of the union.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let what = match suberror {
                    1 => "emulation failure",
                    2 => "exception while delivering an exception",
                    3 => "error delivering an event",
                    4 => "unexpected exit reason",
                    _ => "unknown",
                };
                return self.crash(format!(
                    "KVM_EXIT_INTERNAL_ERROR, suberror {suberror} ({what})"
                ));
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    self.exit.request(VmOutcome::GuestShutdown(format!(
                        "vCPU {id}: KVM system event {kind}"
                    )));
                    return Next::Stop;
                }
                KVM_SYSTEM_EVENT_CRASH => return self.crash("guest reported a crash".into()),
                other => log::debug!("vCPU {id}: ignored KVM system event {other}"),
            },
            other => {
                let what = format!("unexpected KVM exit {other:?}");
                return self.crash(what);
            }
        }
        Next::Continue
    }
}
