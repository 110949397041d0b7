//! The boot GDT and IDT written to guest memory, and the descriptor encoding shared with
//! `kvm::regs` (which turns the same entries into `kvm_segment`s).

use vm_memory::{Bytes, GuestAddress};

use super::{BootError, BootProtocol};
use crate::layout::{GDT_START, IDT_START};
use crate::memory::GuestMemoryMmap;

/// Selector index of the code segment.
pub const CODE_INDEX: usize = 1;
/// Selector index of the data segment.
pub const DATA_INDEX: usize = 2;
/// Selector index of the TSS.
pub const TSS_INDEX: usize = 3;

/// Encodes a segment descriptor from its access/flags word (`0xF0FF` bits used), base and
/// 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The GDT for `protocol`: null, code, data, TSS. PVH starts in flat 32-bit protected mode,
/// the Linux 64-bit protocol in long mode.
pub fn gdt_table(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB, granularity 4 KiB
            gdt_entry(0xc093, 0, 0xfffff), // 32-bit data
            gdt_entry(0x008b, 0, 0x67),    // TSS (busy), 104 bytes
        ],
        BootProtocol::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code (L=1)
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS (busy)
        ],
    }
}

/// Writes the GDT for `protocol` at [`GDT_START`] and a null IDT at [`IDT_START`].
pub fn write_gdt_idt(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<(), BootError> {
    let mut bytes = [0u8; 32];
    for (chunk, e) in bytes.chunks_exact_mut(8).zip(gdt_table(protocol)) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT_START))
        .and_then(|()| mem.write_obj(0u64, GuestAddress(IDT_START)))
        .map_err(BootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_descriptor_encodings() {
        // Values every x86 boot loader uses.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0, 0x67), 0x0000_8b00_0000_0067);
        // Base bits are split across the descriptor.
        assert_eq!(gdt_entry(0x0093, 0x1234_5678, 0), 0x1200_9334_5678_0000);
    }

    #[test]
    fn tables_start_with_null() {
        for p in [BootProtocol::Pvh, BootProtocol::Linux64] {
            let t = gdt_table(p);
            assert_eq!(t[0], 0);
            assert_ne!(t[CODE_INDEX], 0);
        }
    }
}
