//! Reads what the VMM handed over: PVH `hvm_start_info` or the Linux zero page (`boot_params`).
//!
//! Every pointer comes from the VMM and is checked (below 4 GiB, lengths bounded) before use.

use crate::arch::{read_phys, PROTOCOL_LINUX64, PROTOCOL_PVH};

/// `hvm_start_info.magic` ("xEn3" with the top bit set).
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Longest command line the guest keeps.
pub const CMDLINE_MAX: usize = 4096;
/// Most memory map entries the guest keeps (the zero page holds at most 128).
pub const MEMMAP_MAX: usize = 128;
/// e820 / PVH memory type for usable RAM.
pub const E820_RAM: u32 = 1;

/// One memory map entry.
#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Fields of the Linux setup header the guest checks.
#[derive(Default)]
pub struct ZeroPage {
    pub boot_flag: u16,
    pub header: u32,
    pub version: u16,
    pub type_of_loader: u8,
    pub loadflags: u8,
    pub cmd_line_ptr: u32,
    pub cmdline_size: u32,
    pub e820_entries: u8,
}

/// Fields of `hvm_start_info` the guest checks.
#[derive(Default)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

/// Everything the guest learned at boot.
pub struct BootInfo {
    pub protocol: u32,
    pub info_addr: u64,
    pub pvh: StartInfo,
    pub zero_page: ZeroPage,
    pub cmdline: [u8; CMDLINE_MAX],
    pub cmdline_len: usize,
    pub memmap: [MemEntry; MEMMAP_MAX],
    pub memmap_len: usize,
    /// Set when the boot information was unreadable; the guest reports it and stops.
    pub error: Option<&'static str>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0)
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

impl BootInfo {
    /// Parses the boot information found at `addr` for `protocol`.
    pub fn read(protocol: u32, addr: u64) -> BootInfo {
        let mut info = BootInfo {
            protocol,
            info_addr: addr,
            pvh: StartInfo::default(),
            zero_page: ZeroPage::default(),
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            memmap: [MemEntry::default(); MEMMAP_MAX],
            memmap_len: 0,
            error: None,
        };
        match protocol {
            PROTOCOL_PVH => info.read_pvh(addr),
            PROTOCOL_LINUX64 => info.read_zero_page(addr),
            _ => info.error = Some("unknown-protocol"),
        }
        info
    }

    fn read_pvh(&mut self, addr: u64) {
        let mut raw = [0u8; 56];
        if !read_phys(addr, &mut raw) {
            self.error = Some("start-info-address");
            return;
        }
        let si = StartInfo {
            magic: u32_at(&raw, 0),
            version: u32_at(&raw, 4),
            flags: u32_at(&raw, 8),
            nr_modules: u32_at(&raw, 12),
            cmdline_paddr: u64_at(&raw, 24),
            rsdp_paddr: u64_at(&raw, 32),
            memmap_paddr: u64_at(&raw, 40),
            memmap_entries: u32_at(&raw, 48),
        };
        if si.magic != PVH_MAGIC {
            self.error = Some("start-info-magic");
        }
        let cmdline = si.cmdline_paddr;
        let (map, entries) = if si.version >= 1 {
            (si.memmap_paddr, si.memmap_entries)
        } else {
            (0, 0)
        };
        self.pvh = si;
        if self.error.is_some() {
            return;
        }
        self.read_cmdline(cmdline);
        for i in 0..(entries as usize).min(MEMMAP_MAX) {
            let mut e = [0u8; 24];
            if !read_phys(map + (i as u64) * 24, &mut e) {
                self.error = Some("memmap-address");
                return;
            }
            self.push_mem(u64_at(&e, 0), u64_at(&e, 8), u32_at(&e, 16));
        }
    }

    fn read_zero_page(&mut self, addr: u64) {
        let mut zp = [0u8; 4096];
        if !read_phys(addr, &mut zp) {
            self.error = Some("zero-page-address");
            return;
        }
        let z = ZeroPage {
            boot_flag: u16_at(&zp, 0x1fe),
            header: u32_at(&zp, 0x202),
            version: u16_at(&zp, 0x206),
            type_of_loader: zp.get(0x210).copied().unwrap_or(0),
            loadflags: zp.get(0x211).copied().unwrap_or(0),
            cmd_line_ptr: u32_at(&zp, 0x228),
            cmdline_size: u32_at(&zp, 0x238),
            e820_entries: zp.get(0x1e8).copied().unwrap_or(0),
        };
        let cmdline = u64::from(z.cmd_line_ptr) | (u64::from(u32_at(&zp, 0xc8)) << 32);
        let entries = usize::from(z.e820_entries).min(MEMMAP_MAX);
        self.zero_page = z;
        self.read_cmdline(cmdline);
        for i in 0..entries {
            let off = 0x2d0 + i * 20;
            self.push_mem(
                u64_at(&zp, off),
                u64_at(&zp, off + 8),
                u32_at(&zp, off + 16),
            );
        }
    }

    fn push_mem(&mut self, addr: u64, size: u64, kind: u32) {
        if let Some(slot) = self.memmap.get_mut(self.memmap_len) {
            *slot = MemEntry { addr, size, kind };
            self.memmap_len += 1;
        }
    }

    fn read_cmdline(&mut self, addr: u64) {
        if addr == 0 {
            return;
        }
        let mut len = 0;
        // Read in chunks so a command line close to the end of RAM is still found.
        while len < CMDLINE_MAX - 1 {
            let mut b = [0u8; 1];
            if !read_phys(addr + len as u64, &mut b) || b[0] == 0 {
                break;
            }
            self.cmdline[len] = b[0];
            len += 1;
        }
        self.cmdline_len = len;
    }

    /// The command line (bytes up to the first NUL).
    pub fn cmdline(&self) -> &[u8] {
        self.cmdline.get(..self.cmdline_len).unwrap_or(&[])
    }

    /// The memory map entries read.
    pub fn memmap(&self) -> &[MemEntry] {
        self.memmap.get(..self.memmap_len).unwrap_or(&[])
    }

    /// Total usable RAM in the memory map, in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.memmap()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .fold(0u64, |acc, e| acc.saturating_add(e.size))
    }

    /// True when `[addr, addr + len)` lies inside one usable RAM entry.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.memmap()
            .iter()
            .any(|e| e.kind == E820_RAM && e.addr <= addr && e.addr.saturating_add(e.size) >= end)
    }

    /// Value of the first `key=value` word on the command line, if any.
    pub fn param(&self, key: &str) -> Option<&[u8]> {
        self.cmdline().split(|&b| b == b' ').find_map(|word| {
            let rest = word.strip_prefix(key.as_bytes())?;
            rest.strip_prefix(b"=")
        })
    }

    /// Iterates over the values of every `key=value` word on the command line.
    pub fn params<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.cmdline()
            .split(|&b| b == b' ')
            .filter_map(move |word| {
                let rest = word.strip_prefix(key.as_bytes())?;
                rest.strip_prefix(b"=")
            })
    }
}

/// Parses a decimal or `0x` hexadecimal number, rejecting overflow and junk.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses a size with an optional K/M/G suffix (as in `virtio_mmio.device=4K@...`).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, mult) = match s.last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1u64 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1u64 << 30),
        _ => (s, 1),
    };
    parse_u64(num)?.checked_mul(mult)
}
