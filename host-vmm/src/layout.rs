//! The guest physical address map and interrupt numbers, in one place.
//!
//! Everything the boot path writes below 1 MiB, the 32-bit MMIO gap and the device addresses are
//! defined here so that the memory map in `docs/architecture.md` can be checked against one file.

/// GDT written for the boot vCPU (4 entries: null, code, data, TSS).
pub const GDT_START: u64 = 0x500;
/// IDT (a single null entry: the kernel installs its own before enabling interrupts).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` (56 bytes).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table, right after `hvm_start_info`; room up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux boot protocol zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (RSP and RBP) for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the identity map (512 x 2 MiB pages = first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line (NUL terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line including its NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the reserved area below 1 MiB (the traditional EBDA); the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the legacy reserved area; the MP table must end at or before this.
pub const MPTABLE_LIMIT: u64 = 0xa0000;
/// First address above the legacy area; kernels must load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (RAM resumes here when the guest has more than 3 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device; device `i` is at `MMIO_DEVICES_START + i * MMIO_DEVICE_LEN`.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const MMIO_DEVICE_LEN: u64 = 0x1000;
/// I/O APIC base (KVM in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel (`KVM_SET_TSS_ADDR`), inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// 8250 UART ports and IRQ.
pub const SERIAL_PORT: u64 = 0x3f8;
/// Number of 8250 registers.
pub const SERIAL_PORT_LEN: u64 = 8;
/// IRQ line of the 8250 (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller: 0x60 (data) .. 0x64 (status/command).
pub const I8042_PORT: u64 = 0x60;
/// i8042 window length (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// Boot-timer port the guest writes once when userspace starts.
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// First IRQ line handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IRQ line of the I/O APIC (24 pins).
pub const IRQ_MAX: u32 = 23;

// The boot stack sits between the zero page and the page tables; the MP table below 1 MiB.
const _: () =
    assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000 && BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(MPTABLE_LIMIT <= HIMEM_START);

/// Guest physical address of virtio-mmio device `index`.
pub fn virtio_mmio_base(index: usize) -> u64 {
    MMIO_DEVICES_START + index as u64 * MMIO_DEVICE_LEN
}

/// IRQ of virtio-mmio device `index`, or `None` when the I/O APIC has no pin left.
pub fn virtio_irq(index: usize) -> Option<u32> {
    let irq = VIRTIO_IRQ_BASE.checked_add(u32::try_from(index).ok()?)?;
    (irq <= IRQ_MAX).then_some(irq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_structures_do_not_overlap() {
        let mut areas = [
            (GDT_START, 4 * 8),
            (IDT_START, 8),
            (PVH_INFO_START, 56),
            (PVH_MEMMAP_START, ZERO_PAGE_START - PVH_MEMMAP_START),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, MPTABLE_LIMIT - MPTABLE_START),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x?} overlaps {:#x?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn devices_sit_in_the_gap() {
        for addr in [
            MMIO_DEVICES_START,
            IOAPIC_START,
            APIC_START,
            KVM_TSS_ADDRESS,
        ] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr));
        }
        assert_eq!(virtio_mmio_base(1), 0xd000_1000);
        assert_eq!(virtio_irq(0), Some(5));
        assert_eq!(virtio_irq(18), Some(23));
        assert_eq!(virtio_irq(19), None);
    }
}
