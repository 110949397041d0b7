//! Address-space buses for PIO and MMIO exits.
//!
//! A vCPU thread that takes a `KVM_EXIT_IO` or `KVM_EXIT_MMIO` looks the address up here and calls
//! the device with the offset from the start of its range. The bus owns no device state itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port or memory-mapped I/O. Called from vCPU threads.
///
/// Implementations must never panic on any `offset` or `data` length: both come from the guest.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors when populating a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusEntry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        let overlaps_next = self.ranges.range(base..end).next().is_some();
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, BusEntry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a guest read. Returns false when no device serves `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns false when no device serves `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data.first().copied().unwrap_or(0);
        }
    }

    #[test]
    fn dispatch_by_range_and_offset() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 13);
        assert!(!bus.read(0x110, &mut b));
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x100, &[7]));
        assert!(bus.read(0x100, &mut b));
        assert_eq!(b[0], 7);
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(0))), 0x100, 0x10)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10f, 1).is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0xf8, 0x9)
            .is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x0, 0).is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), u64::MAX, 2)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0x110, 0x10)
            .is_ok());
    }
}
