//! Intel MultiProcessor table parsing and application-processor bring-up (INIT-SIPI-SIPI).
//!
//! The MP floating pointer is searched where the MP spec says: the first KiB of the EBDA, the last
//! KiB of base memory, and the BIOS ROM area 0xF0000-0xFFFFF. Both checksums are verified and the
//! processor entries counted. Bring-up copies a real-mode trampoline below 1 MiB; each AP that runs
//! it sets its APIC id bit in a bitmap and increments a counter, then halts.

use crate::arch::{self, mmio_read32, mmio_write32, pause, rdtsc, read_phys};
use crate::bootinfo::BootInfo;
use crate::report;

/// What the MP table says.
#[derive(Default)]
pub struct MpInfo {
    pub fp_addr: u64,
    pub table_addr: u64,
    pub table_checksum_ok: bool,
    pub entries: u32,
    pub cpus: u32,
    pub enabled_cpus: u32,
    pub bsp_apic_id: u32,
    pub apic_id_bitmap: u32,
    pub ioapics: u32,
    pub lapic_addr: u32,
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

fn find_floating_pointer_in(start: u64, len: u64) -> Option<u64> {
    let mut buf = [0u8; 16];
    let mut addr = start & !15;
    while addr + 16 <= start + len {
        if read_phys(addr, &mut buf) && &buf[..4] == b"_MP_" && buf[8] == 1 && checksum_ok(&buf) {
            return Some(addr);
        }
        addr += 16;
    }
    None
}

/// Searches the three places the MP spec allows.
fn find_floating_pointer() -> Option<u64> {
    let mut w = [0u8; 2];
    if read_phys(0x40e, &mut w) {
        let ebda = u64::from(u16::from_le_bytes(w)) << 4;
        if ebda >= 0x400 {
            if let Some(a) = find_floating_pointer_in(ebda, 1024) {
                return Some(a);
            }
        }
    }
    find_floating_pointer_in(0x9fc00, 1024).or_else(|| find_floating_pointer_in(0xf0000, 0x10000))
}

/// Finds and parses the MP table. `Err` names what is wrong.
pub fn parse_mp_table() -> Result<MpInfo, &'static str> {
    let fp = find_floating_pointer().ok_or("no-floating-pointer")?;
    let mut fpb = [0u8; 16];
    if !read_phys(fp, &mut fpb) {
        return Err("floating-pointer-unreadable");
    }
    let table = u64::from(u32::from_le_bytes([fpb[4], fpb[5], fpb[6], fpb[7]]));
    if table == 0 {
        return Err("default-configuration-unsupported");
    }
    let mut hdr = [0u8; 44];
    if !read_phys(table, &mut hdr) || &hdr[..4] != b"PCMP" {
        return Err("bad-config-table-signature");
    }
    let len = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
    let count = usize::from(u16::from_le_bytes([hdr[34], hdr[35]]));
    let mut info = MpInfo {
        fp_addr: fp,
        table_addr: table,
        lapic_addr: u32::from_le_bytes([hdr[36], hdr[37], hdr[38], hdr[39]]),
        ..MpInfo::default()
    };
    const MAX_TABLE: usize = 4096;
    if !(44..=MAX_TABLE).contains(&len) {
        return Err("bad-config-table-length");
    }
    let mut buf = [0u8; MAX_TABLE];
    let body = &mut buf[..len];
    if !read_phys(table, body) {
        return Err("config-table-unreadable");
    }
    info.table_checksum_ok = checksum_ok(body);
    info.entries = count as u32;
    let mut off = 44;
    for _ in 0..count {
        let Some(&kind) = body.get(off) else {
            return Err("entries-overrun-table");
        };
        let size = if kind == 0 { 20 } else { 8 };
        let Some(entry) = body.get(off..off + size) else {
            return Err("entries-overrun-table");
        };
        match kind {
            0 => {
                info.cpus += 1;
                let id = u32::from(entry[1]);
                if entry[3] & 1 != 0 {
                    info.enabled_cpus += 1;
                    if id < 32 {
                        info.apic_id_bitmap |= 1 << id;
                    }
                }
                if entry[3] & 2 != 0 {
                    info.bsp_apic_id = id;
                }
            }
            2 => info.ioapics += 1,
            1 | 3 | 4 => {}
            _ => return Err("unknown-entry-type"),
        }
        off += size;
    }
    Ok(info)
}

/// Physical page the AP trampoline is copied to (SIPI vector 0x08).
const TRAMPOLINE: u64 = 0x8000;
const LAPIC_DEFAULT: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const ICR_PENDING: u32 = 1 << 12;
/// All-excluding-self, level assert, INIT.
const ICR_INIT_ALL: u32 = 0x000c_4500;
/// All-excluding-self, level assert, start-up.
const ICR_SIPI_ALL: u32 = 0x000c_4600;

fn wait_cycles(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        pause();
    }
}

fn send_ipi(lapic: u64, low: u32) -> bool {
    // SAFETY: `lapic` is the local APIC MMIO page, identity-mapped by the guest page tables.
    unsafe {
        mmio_write32(lapic + LAPIC_ICR_HIGH, 0);
        mmio_write32(lapic + LAPIC_ICR_LOW, low);
    }
    let start = rdtsc();
    // SAFETY: as above.
    while unsafe { mmio_read32(lapic + LAPIC_ICR_LOW) } & ICR_PENDING != 0 {
        if rdtsc().wrapping_sub(start) > 1_000_000_000 {
            return false;
        }
        pause();
    }
    true
}

fn trampoline_word(offset_from_end: usize) -> u32 {
    let tramp_len = arch::ap_trampoline().len();
    let mut w = [0u8; 4];
    let addr = TRAMPOLINE + (tramp_len - offset_from_end) as u64;
    for (i, b) in w.iter_mut().enumerate() {
        // SAFETY: the trampoline page is RAM (checked before it was copied); volatile because
        // APs write it behind the compiler's back.
        *b = unsafe { core::ptr::read_volatile((addr + i as u64) as *const u8) };
    }
    u32::from_le_bytes(w)
}

/// `kiln.test=smp`: count CPUs in the MP table, wake the APs, count those that check in.
pub fn run(boot: &BootInfo) {
    let mp = match parse_mp_table() {
        Ok(mp) => {
            report!("mp.found=1");
            report!("mp.fp_addr={:#x}", mp.fp_addr);
            report!("mp.table_addr={:#x}", mp.table_addr);
            report!(
                "mp.table_checksum={}",
                if mp.table_checksum_ok { "ok" } else { "bad" }
            );
            report!("mp.entries={}", mp.entries);
            report!("mp.cpus={}", mp.cpus);
            report!("mp.enabled_cpus={}", mp.enabled_cpus);
            report!("mp.bsp_apic_id={}", mp.bsp_apic_id);
            report!("mp.apic_ids={:#x}", mp.apic_id_bitmap);
            report!("mp.ioapics={}", mp.ioapics);
            report!("mp.lapic={:#x}", mp.lapic_addr);
            Some(mp)
        }
        Err(why) => {
            report!("mp.found=0");
            report!("mp.error={}", why);
            None
        }
    };
    let tramp = arch::ap_trampoline();
    if tramp.len() > 4096 || !boot.is_ram(TRAMPOLINE, 4096) {
        report!("smp.error=trampoline-page-not-ram");
        return;
    }
    // SAFETY: the trampoline page is usable RAM per the memory map, below this image (2 MiB) and
    // not used by the guest for anything else; boot information has already been copied out.
    unsafe {
        core::ptr::write_bytes(TRAMPOLINE as *mut u8, 0, 4096);
        core::ptr::copy_nonoverlapping(tramp.as_ptr(), TRAMPOLINE as *mut u8, tramp.len());
    }
    let lapic = match mp.as_ref().map(|m| u64::from(m.lapic_addr)) {
        Some(a) if a != 0 && a & 0xfff == 0 => a,
        _ => LAPIC_DEFAULT,
    };
    // SAFETY: software-enable the local APIC (spurious vector 0xff) at its MMIO page.
    unsafe { mmio_write32(lapic + LAPIC_SVR, 0x1ff) };
    let vector = (TRAMPOLINE >> 12) as u32;
    let mut ok = send_ipi(lapic, ICR_INIT_ALL);
    wait_cycles(10_000_000);
    ok &= send_ipi(lapic, ICR_SIPI_ALL | vector);
    wait_cycles(1_000_000);
    ok &= send_ipi(lapic, ICR_SIPI_ALL | vector);
    if !ok {
        report!("smp.ipi=stuck");
    }
    let expected = mp.as_ref().map_or(0, |m| m.enabled_cpus.saturating_sub(1));
    let start = rdtsc();
    // Wait for every AP the MP table lists (10 s or so at most: a loaded host may be slow to run
    // 32 vCPU threads); without a table wait briefly.
    let limit = if expected > 0 {
        30_000_000_000
    } else {
        200_000_000
    };
    while trampoline_word(arch::AP_COUNT_OFFSET_FROM_END) < expected
        && rdtsc().wrapping_sub(start) < limit
    {
        pause();
    }
    // Give stragglers beyond the MP table a moment, so extra CPUs would show too.
    wait_cycles(20_000_000);
    let aps = trampoline_word(arch::AP_COUNT_OFFSET_FROM_END);
    let bitmap = trampoline_word(arch::AP_BITMAP_OFFSET_FROM_END);
    report!("smp.aps_started={}", aps);
    report!("smp.cpus_online={}", aps + 1);
    report!("smp.ap_apic_ids={:#x}", bitmap);
}
