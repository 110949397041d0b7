//! Everything that talks to `/dev/kvm`: the VM (memory slots, irqchip, PIT, irqfd/ioeventfd),
//! per-vCPU CPUID and register state, and the vCPU run loop.

pub mod cpuid;
pub mod regs;
pub mod vcpu;
pub mod vm;
