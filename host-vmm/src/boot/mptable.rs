//! Intel MultiProcessor Specification 1.4 tables, so the guest finds its CPUs and I/O APIC.
//!
//! Built as bytes by a pure function (checked by unit tests) and written to the reserved area at
//! [`MPTABLE_START`], where Linux scans for the floating pointer (the last KiB of base memory).

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, IOAPIC_START, IRQ_MAX, MPTABLE_LIMIT, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const CPU_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature and the FPU + APIC feature flags, as a real BIOS reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// No CPUs, or so many the APIC ids collide with the I/O APIC id.
    #[error("cannot describe {0} vCPUs in the MP table")]
    CpuCount(u8),
    /// The table would not fit the reserved area.
    #[error("MP table for {cpus} vCPUs is {size} bytes, only {room} fit below 640 KiB")]
    TooLarge {
        /// vCPUs requested.
        cpus: u8,
        /// Table size.
        size: usize,
        /// Room available.
        room: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Size in bytes of the tables for `cpus` vCPUs.
pub fn mptable_size(cpus: u8) -> usize {
    MPF_SIZE
        + MPC_HEADER_SIZE
        + CPU_ENTRY_SIZE * usize::from(cpus)
        + SMALL_ENTRY_SIZE * (2 + (IRQ_MAX as usize + 1) + 2)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer followed by the configuration table, for placement at `base`.
pub fn build_mptable(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    // APIC ids are 0..cpus and the I/O APIC takes `cpus + 1`; all must fit in 8 bits.
    if cpus == 0 || cpus >= 0xfe {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus + 1;
    let size = mptable_size(cpus);
    let table_addr = u32::try_from(base + MPF_SIZE as u64).map_err(|_| MpTableError::TooLarge {
        cpus,
        size,
        room: 0,
    })?;

    // Configuration table entries.
    let mut entries = Vec::with_capacity(size - MPF_SIZE - MPC_HEADER_SIZE);
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irq type, flags (u16, conforming), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[ENTRY_IOINTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = (MPC_HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(size);
    // Floating pointer.
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&table_addr.to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table[..MPF_SIZE]);
    // Configuration table header.
    let hdr = table.len();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]);
    table.extend_from_slice(b"KILN    ");
    table.extend_from_slice(b"HOST-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[hdr + 7] = checksum(&table[hdr..]);
    debug_assert_eq!(table.len(), size);
    Ok(table)
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let room = MPTABLE_LIMIT - MPTABLE_START;
    let table = build_mptable(cpus, MPTABLE_START)?;
    if table.len() as u64 > room {
        return Err(MpTableError::TooLarge {
            cpus,
            size: table.len(),
            room,
        });
    }
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    #[test]
    fn checksums_and_pointers() {
        for cpus in [1u8, 4, 32] {
            let t = build_mptable(cpus, MPTABLE_START).unwrap();
            assert_eq!(t.len(), mptable_size(cpus));
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let phys = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(phys), MPTABLE_START + 16);
            let hdr = &t[16..];
            assert_eq!(&hdr[..4], b"PCMP");
            assert_eq!(usize::from(u16_at(hdr, 4)), hdr.len());
            assert_eq!(sum(hdr), 0, "configuration table checksum");
            assert_eq!(
                u32::from_le_bytes(hdr[36..40].try_into().unwrap()),
                0xfee0_0000
            );
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_bsp_first() {
        let cpus = 7;
        let t = build_mptable(cpus, MPTABLE_START).unwrap();
        let hdr = &t[16..];
        let mut off = 44;
        let mut seen = 0;
        let mut ioapics = 0;
        let mut entries = 0;
        while off < hdr.len() {
            match hdr[off] {
                0 => {
                    assert_eq!(hdr[off + 1], seen, "APIC ids in order");
                    let flags = hdr[off + 3];
                    assert_eq!(flags & 1, 1, "enabled");
                    assert_eq!(flags & 2 != 0, seen == 0, "only vCPU 0 is the BSP");
                    seen += 1;
                    off += 20;
                }
                2 => {
                    assert_eq!(hdr[off + 1], cpus + 1, "I/O APIC id after the CPUs");
                    ioapics += 1;
                    off += 8;
                }
                1 | 3 | 4 => off += 8,
                t => panic!("unknown entry type {t}"),
            }
            entries += 1;
        }
        assert_eq!(off, hdr.len());
        assert_eq!(seen, cpus);
        assert_eq!(ioapics, 1);
        assert_eq!(u16_at(hdr, 34), entries);
    }

    #[test]
    fn fits_for_max_vcpus_and_rejects_bad_counts() {
        assert!(mptable_size(32) as u64 <= MPTABLE_LIMIT - MPTABLE_START);
        assert!(build_mptable(0, MPTABLE_START).is_err());
        assert!(build_mptable(254, MPTABLE_START).is_err());
        let mem = crate::memory::create_guest_memory(2).unwrap();
        setup_mptable(&mem, 32).unwrap();
        // 64 CPUs would overflow the 1 KiB area.
        assert!(matches!(
            setup_mptable(&mem, 64),
            Err(MpTableError::TooLarge { .. })
        ));
    }
}
