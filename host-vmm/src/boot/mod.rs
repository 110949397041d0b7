//! Loading the guest kernel and writing everything it reads at boot into guest memory.
//!
//! Supported images: ELF `vmlinux` (PVH entry when it has the note, else the 64-bit entry) and
//! `bzImage` (64-bit entry at `code32_start + 0x200`). This module only touches guest memory;
//! the vCPU registers that go with the chosen protocol are set by `kvm::regs`.

pub mod cmdline;
pub mod gdt;
pub mod linux64;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::memory::{e820_map, low_ram_end, GuestMemoryMmap};

/// How the guest kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode at the PVH note's entry, EBX = `hvm_start_info`.
    Pvh,
    /// Long mode at the 64-bit entry, RSI = zero page.
    Linux64,
}

/// The user's choice (`--boot-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocolChoice {
    /// PVH when the kernel has the note, else 64-bit.
    #[default]
    Auto,
    /// Require PVH.
    Pvh,
    /// Always use the 64-bit protocol.
    Linux64,
}

/// Errors while loading the kernel or writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("kernel {}", path.display())]
    KernelOpen {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF magic nor a bzImage header.
    #[error("kernel {}: not an ELF vmlinux or bzImage", path.display())]
    NotAKernel {
        /// Kernel path.
        path: PathBuf,
    },
    /// linux-loader rejected the image (`reason` is its most specific message).
    #[error("kernel {}: cannot load the image: {reason}", path.display())]
    Load {
        /// Kernel path.
        path: PathBuf,
        /// What linux-loader reported.
        reason: String,
    },
    /// The image does not fit in guest RAM below the MMIO gap.
    #[error("kernel {}: image ends at {end:#x}, beyond guest RAM ({ram:#x}); use a larger --mem-mib", path.display())]
    TooLarge {
        /// Kernel path.
        path: PathBuf,
        /// End of the loaded image.
        end: u64,
        /// End of low RAM.
        ram: u64,
    },
    /// PVH was requested but the kernel has no PVH entry note.
    #[error("kernel {}: --boot-protocol pvh requested but the kernel has no PVH entry note", path.display())]
    NoPvhEntry {
        /// Kernel path.
        path: PathBuf,
    },
    /// The command line does not fit.
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    /// The e820 map does not fit the boot structure.
    #[error("{0} memory map entries do not fit the boot parameters")]
    TooManyE820Entries(usize),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// linux-loader's configurator failed.
    #[error("cannot write boot parameters")]
    Configurator(#[source] linux_loader::configurator::Error),
    /// MP table problem.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// A kernel in guest memory, ready to be entered.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Guest physical address of the first instruction.
    pub entry: u64,
    /// Protocol the entry expects.
    pub protocol: BootProtocol,
    /// bzImage setup header (copied into the zero page), `None` for ELF.
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKind {
    Elf,
    BzImage,
}

fn sniff_image(file: &mut File) -> std::io::Result<Option<ImageKind>> {
    let mut head = [0u8; 0x206];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            r => n += r,
        }
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(ImageKind::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(ImageKind::BzImage));
    }
    Ok(None)
}

/// linux-loader nests errors whose messages repeat each other ("Kernel Loader: ..."): keep the
/// most specific one, and hint at the usual cause of a failed copy into guest memory.
fn loader_reason(err: &linux_loader::loader::Error, mem_bytes: u64) -> String {
    use linux_loader::loader::{bzimage, elf, Error};
    let inner = match err {
        Error::Elf(e) => e.to_string(),
        Error::Bzimage(e) => e.to_string(),
        e => e.to_string(),
    };
    let msg = inner.trim_start_matches("Kernel Loader: ");
    match err {
        Error::Elf(elf::Error::ReadKernelImage)
        | Error::Bzimage(bzimage::Error::ReadBzImageCompressedKernel) => {
            format!(
                "{msg} (does it fit in {} MiB of guest memory?)",
                mem_bytes >> 20
            )
        }
        _ => msg.to_string(),
    }
}

/// Loads the kernel at `path` into `mem` and picks the boot protocol.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    path: &Path,
    choice: BootProtocolChoice,
) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let kind = sniff_image(&mut file)
        .map_err(open_err)?
        .ok_or_else(|| BootError::NotAKernel {
            path: path.to_owned(),
        })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |e: linux_loader::loader::Error| BootError::Load {
        path: path.to_owned(),
        reason: loader_reason(&e, mem_bytes),
    };
    let result = match kind {
        ImageKind::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_err)?,
        ImageKind::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_err)?,
    };
    let ram = low_ram_end(mem_bytes);
    if result.kernel_end > ram {
        return Err(BootError::TooLarge {
            path: path.to_owned(),
            end: result.kernel_end,
            ram,
        });
    }
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    let (protocol, entry) = match (choice, pvh_entry, kind) {
        (BootProtocolChoice::Pvh, None, _) => {
            return Err(BootError::NoPvhEntry {
                path: path.to_owned(),
            })
        }
        (BootProtocolChoice::Pvh | BootProtocolChoice::Auto, Some(e), _) => (BootProtocol::Pvh, e),
        // The 64-bit entry of a bzImage's protected-mode kernel is 0x200 past its start.
        (_, _, ImageKind::BzImage) => (BootProtocol::Linux64, result.kernel_load.0 + 0x200),
        (_, _, ImageKind::Elf) => (BootProtocol::Linux64, result.kernel_load.0),
    };
    Ok(LoadedKernel {
        entry,
        protocol,
        setup_header: result.setup_header,
    })
}

/// Writes the command line, GDT/IDT, MP table and the protocol's boot parameters.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    vcpus: u8,
) -> Result<(), BootError> {
    let max = CMDLINE_MAX_SIZE - 1;
    if cmdline.len() > max {
        return Err(cmdline::CmdlineError::TooLong {
            len: cmdline.len(),
            max,
        }
        .into());
    }
    if cmdline.contains('\0') {
        return Err(cmdline::CmdlineError::Nul.into());
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))
        .and_then(|()| mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64)))
        .map_err(BootError::GuestMemory)?;
    gdt::write_gdt_idt(mem, kernel.protocol)?;
    mptable::setup_mptable(mem, vcpus)?;
    let e820 = e820_map(mem_bytes);
    match kernel.protocol {
        BootProtocol::Pvh => pvh::write_start_info(mem, &e820),
        BootProtocol::Linux64 => {
            let params = linux64::build_zero_page(kernel.setup_header, cmdline.len(), &e820)?;
            linux64::write_zero_page(mem, &params)?;
            linux64::write_page_tables(mem)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("host-vmm-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn rejects_non_kernels_and_missing_files() {
        let mem = create_guest_memory(4).unwrap();
        let p = tmp("notakernel", b"#!/bin/sh\necho hi\n");
        let err = load_kernel(&mem, 4 << 20, &p, BootProtocolChoice::Auto).unwrap_err();
        assert!(
            err.to_string().ends_with("not an ELF vmlinux or bzImage"),
            "{err}"
        );
        std::fs::remove_file(&p).unwrap();
        let err = load_kernel(&mem, 4 << 20, &p, BootProtocolChoice::Auto).unwrap_err();
        assert!(matches!(err, BootError::KernelOpen { .. }), "{err}");
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and optionally a PVH note.
    fn tiny_elf(pvh_entry: Option<u32>) -> Vec<u8> {
        let code: &[u8] = &[0xf4]; // hlt
        let mut note = Vec::new();
        if let Some(e) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
            note.extend_from_slice(&4u32.to_le_bytes()); // descsz
            note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&e.to_le_bytes());
        }
        let phnum: u16 = if note.is_empty() { 1 } else { 2 };
        let data_off = 64 + 56 * u64::from(phnum);
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
        elf.extend_from_slice(&0u32.to_le_bytes());
        elf.extend_from_slice(&64u16.to_le_bytes());
        elf.extend_from_slice(&56u16.to_le_bytes());
        elf.extend_from_slice(&phnum.to_le_bytes());
        elf.extend_from_slice(&[0; 6]);
        let mut phdr = |ty: u32, off: u64, addr: u64, size: u64| {
            elf.extend_from_slice(&ty.to_le_bytes());
            elf.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, size, size, 4] {
                elf.extend_from_slice(&v.to_le_bytes());
            }
        };
        phdr(1, data_off, 0x10_0000, code.len() as u64);
        if !note.is_empty() {
            phdr(4, data_off + code.len() as u64, 0, note.len() as u64);
        }
        elf.extend_from_slice(code);
        elf.extend_from_slice(&note);
        elf
    }

    #[test]
    fn elf_protocol_selection() {
        let mem = create_guest_memory(4).unwrap();
        let plain = tmp("plain.elf", &tiny_elf(None));
        let k = load_kernel(&mem, 4 << 20, &plain, BootProtocolChoice::Auto).unwrap();
        assert_eq!((k.protocol, k.entry), (BootProtocol::Linux64, 0x10_0000));
        let err = load_kernel(&mem, 4 << 20, &plain, BootProtocolChoice::Pvh).unwrap_err();
        assert!(matches!(err, BootError::NoPvhEntry { .. }));

        let pvh = tmp("pvh.elf", &tiny_elf(Some(0x10_0040)));
        let k = load_kernel(&mem, 4 << 20, &pvh, BootProtocolChoice::Auto).unwrap();
        assert_eq!((k.protocol, k.entry), (BootProtocol::Pvh, 0x10_0040));
        let k = load_kernel(&mem, 4 << 20, &pvh, BootProtocolChoice::Linux64).unwrap();
        assert_eq!((k.protocol, k.entry), (BootProtocol::Linux64, 0x10_0000));
        let b: u8 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b, 0xf4);
        for p in [plain, pvh] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn bzimage_enters_at_load_address_plus_0x200() {
        // Setup area of 4 + 1 sectors with the header fields the loader and protocol use.
        let mut image = vec![0u8; 5 * 512];
        image[0x1f1] = 4;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 1; // LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        image.extend_from_slice(&[0xf4; 0x400]);
        let p = tmp("tiny.bzImage", &image);
        let mem = create_guest_memory(4).unwrap();
        let k = load_kernel(&mem, 4 << 20, &p, BootProtocolChoice::Auto).unwrap();
        assert_eq!((k.protocol, k.entry), (BootProtocol::Linux64, 0x10_0200));
        let hdr = k.setup_header.unwrap();
        assert_eq!(({ hdr.setup_sects }, { hdr.version }), (4, 0x020f));
        let err = load_kernel(&mem, 4 << 20, &p, BootProtocolChoice::Pvh).unwrap_err();
        assert!(matches!(err, BootError::NoPvhEntry { .. }));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn cmdline_is_nul_terminated_at_0x20000() {
        let mem = create_guest_memory(4).unwrap();
        let k = LoadedKernel {
            entry: 0x10_0000,
            protocol: BootProtocol::Linux64,
            setup_header: None,
        };
        // Dirty the byte after the command line to see the terminator written.
        mem.write_obj(0xffu8, GuestAddress(CMDLINE_START + 3))
            .unwrap();
        write_boot_structures(&mem, 4 << 20, &k, "abc", 2).unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"abc\0");
        let long = "y".repeat(CMDLINE_MAX_SIZE);
        assert!(write_boot_structures(&mem, 4 << 20, &k, &long, 1).is_err());
    }
}
