//! How any thread asks the VM to stop, and the outcome the process reports.
//!
//! The first request wins. Requesting sets a flag every vCPU loop checks after each exit and
//! signals an eventfd the VMM event loop waits on; the event loop then kicks the vCPUs out of
//! `KVM_RUN` (see `kvm::vcpu::kick`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest asked to stop (i8042 reset, all vCPUs halted, KVM system event).
    GuestShutdown(String),
    /// The guest crashed (triple fault, emulation failure, failed entry).
    GuestCrash(String),
    /// Something failed on the host side while the guest ran.
    HostError(String),
}

impl VmOutcome {
    /// Process exit status: 0 clean shutdown, 1 host error, 2 guest crash.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmOutcome::GuestShutdown(_) => 0,
            VmOutcome::HostError(_) => 1,
            VmOutcome::GuestCrash(_) => 2,
        }
    }
}

struct Inner {
    stopping: AtomicBool,
    outcome: Mutex<Option<VmOutcome>>,
    evt: EventFd,
    halted: AtomicUsize,
    vcpus: usize,
}

/// Cloneable handle shared by vCPU threads, devices and the event loop.
#[derive(Clone)]
pub struct ExitHandle(Arc<Inner>);

impl ExitHandle {
    /// A handle for a VM with `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> std::io::Result<Self> {
        Ok(Self(Arc::new(Inner {
            stopping: AtomicBool::new(false),
            outcome: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
            halted: AtomicUsize::new(0),
            vcpus,
        })))
    }

    /// Asks the VM to stop with `outcome`; later requests are ignored.
    pub fn request(&self, outcome: VmOutcome) {
        {
            let mut slot = self.0.outcome.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(outcome);
            }
        }
        self.0.stopping.store(true, Ordering::SeqCst);
        // Cannot fail short of the counter overflowing, which one write per request never does.
        let _ = self.0.evt.write(1);
    }

    /// True once a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    /// The eventfd signalled by [`ExitHandle::request`].
    pub fn eventfd(&self) -> &EventFd {
        &self.0.evt
    }

    /// The recorded outcome, if any.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.0
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that one vCPU halted for good; the VM stops once all of them have.
    pub fn vcpu_halted(&self) {
        if self.0.halted.fetch_add(1, Ordering::SeqCst) + 1 >= self.0.vcpus {
            self.request(VmOutcome::GuestShutdown("all vCPUs halted".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_signals() {
        let h = ExitHandle::new(1).unwrap();
        assert!(!h.is_stopping());
        assert!(h.eventfd().read().is_err(), "nothing signalled yet");
        h.request(VmOutcome::GuestCrash("triple fault".into()));
        h.clone().request(VmOutcome::GuestShutdown("late".into()));
        assert!(h.is_stopping());
        assert_eq!(h.eventfd().read().unwrap(), 2);
        assert_eq!(h.outcome().unwrap().exit_code(), 2);
    }

    #[test]
    fn all_halted_is_a_shutdown() {
        let h = ExitHandle::new(2).unwrap();
        h.vcpu_halted();
        assert!(!h.is_stopping());
        h.vcpu_halted();
        assert_eq!(h.outcome().unwrap().exit_code(), 0);
    }
}
