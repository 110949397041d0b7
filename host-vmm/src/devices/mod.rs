//! Emulated devices: legacy PIO devices, virtio-mmio devices, and the buses that route exits to them.

pub mod bus;
pub mod virtio;
