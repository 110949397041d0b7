//! host-vmm: kiln's virtual machine monitor (see issue 2 and `docs/architecture.md`).
//!
//! One process per microVM: [`vmm::run_vm`] builds the VM from a [`vmm::VmConfig`], runs one
//! thread per vCPU plus the event loop on the calling thread, and returns how the guest ended.

pub mod boot;
pub mod cli;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod jail;
pub mod kernel_pick;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod run;
pub mod seccomp;
pub mod vmm;
