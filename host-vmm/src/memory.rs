//! Guest RAM: where it lives in the guest physical address space and the e820 map describing it.
//!
//! RAM fills `[0, min(size, 3 GiB))` and the rest, if any, starts at 4 GiB, leaving the 32-bit
//! MMIO gap for devices. Memory is anonymous, private and `MAP_NORESERVE`: nothing is touched or
//! zeroed on the boot path, pages are faulted in when the guest (or the loader) first uses them.
//! This module owns no KVM state; `kvm::vm` registers the regions as memory slots.

use vm_memory::GuestAddress;

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, MPTABLE_LIMIT};

/// The guest memory type used everywhere in host-vmm.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Smallest accepted guest RAM in MiB (room for the boot structures and a tiny kernel).
pub const MIN_MEM_MIB: u64 = 2;
/// Hard upper bound in MiB regardless of the host (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Kind of an e820 entry (values are the e820 type numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (not usable as RAM).
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// The guest physical ranges backed by RAM for a guest of `mem_bytes`.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_bytes > low {
        ranges.push((GuestAddress(MMIO_GAP_END), mem_bytes - low));
    }
    ranges
}

/// Maps (lazily) the RAM of a guest with `mem_mib` MiB. The caller validated the size.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = mem_mib << 20;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
        .into_iter()
        .map(|(addr, len)| (addr, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    })
}

/// The e820 map the guest sees: RAM below the EBDA, the reserved legacy area holding the MP
/// table, RAM from 1 MiB up to the gap, and RAM above 4 GiB when the guest is larger than 3 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: MPTABLE_LIMIT - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        let start = start.0.max(HIMEM_START);
        let end = if start >= MMIO_GAP_END {
            start + len
        } else {
            len.min(MMIO_GAP_START)
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

/// Last usable RAM address + 1 below the gap (where a kernel image must end).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_one_range_and_no_high_ram() {
        assert_eq!(ram_ranges(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: E820Kind::Ram
                },
            ]
        );
    }

    #[test]
    fn large_guest_splits_around_the_gap() {
        let mem = 4096 * MIB;
        assert_eq!(
            ram_ranges(mem),
            vec![
                (GuestAddress(0), 3072 * MIB),
                (GuestAddress(1 << 32), 1024 * MIB)
            ]
        );
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: 3072 * MIB - HIMEM_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 1 << 32,
                size: 1024 * MIB,
                kind: E820Kind::Ram
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // Only the legacy hole (0x9fc00..1 MiB) is missing from the RAM total.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        // Nothing reported as RAM lies in the gap.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn exactly_three_gib_has_no_high_range() {
        assert_eq!(ram_ranges(3072 * MIB).len(), 1);
        assert_eq!(e820_map(3072 * MIB).len(), 3);
    }

    #[test]
    fn guest_memory_is_mapped_lazily_and_readable() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let v: u64 = mem.read_obj(GuestAddress(15 * MIB)).unwrap();
        assert_eq!(v, 0);
        assert!(mem.read_obj::<u8>(GuestAddress(16 * MIB)).is_err());
    }
}
