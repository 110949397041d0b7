//! kiln runtime library: VM launch backends (host-vmm, QEMU microvm) and the runc-compatible
//! runtime logic used by the `kiln` binary.

pub mod vm;
