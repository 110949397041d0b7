//! Allow list of a vCPU thread, installed just before its first `KVM_RUN` (after its own
//! CPUID/MSR/LAPIC set-up, which needs more ioctls).
//!
//! What runs on the thread afterwards (`kvm::vcpu::Vcpu::run_once`): `KVM_RUN`, PIO/MMIO
//! dispatch to the serial port (console writes, irqfd), i8042 and boot timer (exit eventfd, a
//! log line), and the virtio-mmio registers (queue notify eventfds; a device reset the guest
//! asks for drops vsock connections).

use kvm_bindings::{kvm_regs, KVMIO};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ};

use super::rule::{self, Allowed};
use super::{common, FilterContext};

/// `KVM_RUN` = `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64;
/// `KVM_GET_REGS` = `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub const KVM_GET_REGS: u64 = ioctl_expr(
    _IOC_READ,
    KVMIO,
    0x81,
    std::mem::size_of::<kvm_regs>() as u32,
) as u64;

/// The vCPU thread's allow list.
pub fn allowed(_ctx: &FilterContext) -> Vec<Allowed> {
    use libc::*;
    let mut list = common();
    list.extend([
        // Only these two: every KVM_SET_* happens before the filter is installed.
        rule::ioctl_requests(
            "KVM_RUN; KVM_GET_REGS names the RIP when the guest crashes",
            &[KVM_RUN, KVM_GET_REGS],
        ),
        Allowed::any(
            SYS_read,
            "virtio-mmio drains queue eventfds on a guest device reset",
        ),
        Allowed::any(
            SYS_epoll_ctl,
            "a guest-requested vsock device reset unwatches streams",
        ),
        Allowed::any(
            SYS_timerfd_settime,
            "a vsock device reset disarms the request timer",
        ),
    ]);
    list
}
