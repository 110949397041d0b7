//! host-vmm: kiln's virtual machine monitor (see issue 2).

pub mod devices;
