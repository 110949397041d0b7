//! Test-only guest driver: lays out split virtqueues in a `GuestMemoryMmap`, builds descriptor
//! tables by hand (including malformed ones), and drives an [`MmioTransport`] through its
//! registers the way a guest kernel does.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{status, MmioTransport};
use crate::devices::bus::BusDevice;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 0x40_0000;
/// Descriptor flag: chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// Fresh zeroed guest memory at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory")
}

/// Reads a 32-bit register.
pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register.
pub fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// ACKNOWLEDGE, DRIVER, ack `features`, FEATURES_OK. Returns the status read back.
pub fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, status::ACKNOWLEDGE);
    write_reg(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, features as u32);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, (features >> 32) as u32);
    write_reg(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    read_reg(t, 0x70)
}

/// Sets DRIVER_OK.
pub fn driver_ok(t: &mut MmioTransport) {
    let s = read_reg(t, 0x70);
    write_reg(t, 0x70, s | status::DRIVER_OK);
}

/// A split virtqueue laid out in guest memory, seen from the driver.
pub struct TestQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// A queue of `size` entries whose tables start at `base`.
    pub fn new(size: u16, base: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Programs this queue as queue `index` of `t` and marks it ready.
    pub fn install(&self, t: &mut MmioTransport, index: u32) {
        write_reg(t, 0x30, index);
        write_reg(t, 0x38, u32::from(self.size));
        for (reg, addr) in [(0x80, self.desc), (0x90, self.avail), (0xa0, self.used)] {
            write_reg(t, reg, addr as u32);
            write_reg(t, reg + 4, (addr >> 32) as u32);
        }
        write_reg(t, 0x44, 1);
    }

    /// Writes descriptor `index` verbatim.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let base = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, base).expect("descriptor in memory");
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Adds a well-formed chain of `(addr, len, write)` buffers and publishes it. Returns the head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if write { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.set_desc(mem, index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Number of used entries the device published.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    /// Used ring entry `i`: (descriptor head, length written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).expect("used id"),
            mem.read_obj(GuestAddress(at + 4)).expect("used len"),
        )
    }
}
