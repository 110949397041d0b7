//! Linux 64-bit boot protocol: the zero page (`struct boot_params`) and the identity-mapped page
//! tables the kernel's `startup_64` expects to already be on.
//!
//! See Documentation/arch/x86/boot.rst ("64-bit boot protocol").

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout::{CMDLINE_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START};
use crate::memory::{E820Entry, GuestMemoryMmap};

/// `boot_flag` magic.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic, "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default `kernel_alignment` for an ELF kernel (16 MiB, the x86 default).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Maximum e820 entries in the zero page.
const E820_MAX_ENTRIES: usize = 128;

/// Builds the zero page. `header` is the bzImage's own setup header, or `None` for an ELF kernel.
pub fn build_zero_page(
    header: Option<setup_header>,
    cmdline_len: usize,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    let bp = BootParams::new(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::Configurator)
}

/// Page-table entry flags: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flags for a 2 MiB page: present | writable | page size.
const PDE_2M: u64 = 0x83;

/// The three tables of the identity map over the first 1 GiB, as (address, 512 entries).
pub fn identity_page_tables() -> [(u64, [u64; 512]); 3] {
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPTE_START | PTE_PRESENT_RW;
    let mut pdpte = [0u64; 512];
    pdpte[0] = PDE_START | PTE_PRESENT_RW;
    let mut pde = [0u64; 512];
    for (i, e) in pde.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PDE_2M;
    }
    [(PML4_START, pml4), (PDPTE_START, pdpte), (PDE_START, pde)]
}

/// Writes the identity map; CR3 must then point at [`PML4_START`].
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (addr, table) in identity_page_tables() {
        let mut bytes = [0u8; 4096];
        for (chunk, e) in bytes.chunks_exact_mut(8).zip(table) {
            chunk.copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(BootError::GuestMemory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, e820_map};

    #[test]
    fn zero_page_fields_for_elf() {
        let map = e820_map(128 << 20);
        let p = build_zero_page(None, 42, &map).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(p.e820_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let z = p.e820_table[i];
            assert_eq!(
                ({ z.addr }, { z.size }, { z.r#type }),
                (e.addr, e.size, e.kind as u32)
            );
        }
    }

    #[test]
    fn zero_page_keeps_bzimage_header_fields() {
        let hdr = setup_header {
            setup_sects: 27,
            version: 0x020f,
            code32_start: 0x10_0000,
            loadflags: 1,
            ..Default::default()
        };
        let p = build_zero_page(Some(hdr), 10, &e820_map(64 << 20)).unwrap();
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.code32_start }, 0x10_0000);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    }

    #[test]
    fn zero_page_lands_at_0x7000() {
        let mem = create_guest_memory(4).unwrap();
        let p = build_zero_page(None, 1, &e820_map(4 << 20)).unwrap();
        write_zero_page(&mem, &p).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let flag: u16 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        assert_eq!(flag, 0xaa55);
        let n: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn too_many_e820_entries() {
        let map = vec![e820_map(4 << 20)[0]; 129];
        assert!(matches!(
            build_zero_page(None, 0, &map),
            Err(BootError::TooManyE820Entries(129))
        ));
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = create_guest_memory(4).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, 0xb003);
        for i in 0..512u64 {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "entry {i}");
        }
        // Only one entry each in the upper levels.
        let next: u64 = mem.read_obj(GuestAddress(PML4_START + 8)).unwrap();
        assert_eq!(next, 0);
    }
}
