//! Emulated devices: legacy PIO devices, virtio-mmio devices, and the buses that route exits to them.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
