//! PVH boot protocol: the kernel starts in 32-bit protected mode at the address in its
//! `XEN_ELFNOTE_PHYS32_ENTRY` note with EBX pointing at an `hvm_start_info` that carries the
//! command line and the memory map.
//!
//! See <https://xenbits.xen.org/docs/unstable/misc/pvh.html>.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::GuestAddress;

use super::BootError;
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START};
use crate::memory::{E820Entry, GuestMemoryMmap};

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Builds `hvm_start_info` and the memory map table.
pub fn build_start_info(
    e820: &[E820Entry],
) -> Result<(hvm_start_info, Vec<hvm_memmap_table_entry>), BootError> {
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let room = (ZERO_PAGE_START - PVH_MEMMAP_START) / entry_size;
    if e820.len() as u64 > room {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    Ok((info, memmap))
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`] and the memory map at [`PVH_MEMMAP_START`].
pub fn write_start_info(mem: &GuestMemoryMmap, e820: &[E820Entry]) -> Result<(), BootError> {
    let (info, memmap) = build_start_info(e820)?;
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configurator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, e820_map};
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_cmdline_and_memmap() {
        let map = e820_map(256 << 20);
        let (info, memmap) = build_start_info(&map).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(memmap[2].addr, 0x10_0000);
        assert_eq!(memmap[2].size, (256 << 20) - 0x10_0000);
        assert_eq!(memmap[1].type_, 2);
    }

    #[test]
    fn written_where_ebx_will_point() {
        let mem = create_guest_memory(4).unwrap();
        write_start_info(&mem, &e820_map(4 << 20)).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let first: u64 = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 8)).unwrap();
        assert_eq!(first, 0x9fc00, "size of the first RAM entry");
    }
}
