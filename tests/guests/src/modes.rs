//! The test modes selected by `kiln.test=<mode>` (see the crate docs for the list).

use crate::arch::{halt_forever, triple_fault, PROTOCOL_LINUX64, PROTOCOL_PVH};
use crate::bootinfo::{parse_u64, BootInfo};
use crate::report;
use crate::serial;
use crate::virtio_blk::{
    BlkError, VirtioBlk, F_FLUSH, F_RO, MAX_DATA, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};

/// Runs the mode named on the command line.
pub fn run(boot: &BootInfo) {
    serial::init();
    let mode = boot.param("kiln.test").unwrap_or(b"marker");
    match mode {
        b"marker" | b"reset" => {}
        b"idle" => halt_forever(),
        b"bootinfo" => bootinfo(boot),
        b"smp" => crate::smp::run(boot),
        b"blk-read" => with_blk(boot, blk_read),
        b"blk-write" => with_blk(boot, blk_write),
        b"blk-ro" => with_blk(boot, blk_ro),
        b"blk-oob" => with_blk(boot, blk_oob),
        b"blk-flush" => with_blk(boot, blk_flush),
        b"triple-fault" => {
            report!("triple-fault=now");
            triple_fault()
        }
        b"panic" => {
            let v = [1u8, 2, 3];
            let i = boot.cmdline_len + 10;
            // A deliberate out-of-bounds index: the panic handler must report it.
            report!("unreachable={}", v[i]);
        }
        m if m.starts_with(b"vsock-") => crate::vsock_modes::run(boot, m),
        _ => report!("error=unknown-mode"),
    }
}

/// Prints bytes as text, replacing anything unprintable with `?`.
struct Text<'a>(&'a [u8]);

impl core::fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            core::fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

fn bootinfo(boot: &BootInfo) {
    report!("boot.info_addr={:#x}", boot.info_addr);
    match boot.protocol {
        PROTOCOL_PVH => {
            let p = &boot.pvh;
            report!("boot.protocol=pvh");
            report!("pvh.magic={:#x}", p.magic);
            report!("pvh.version={}", p.version);
            report!("pvh.flags={:#x}", p.flags);
            report!("pvh.nr_modules={}", p.nr_modules);
            report!("pvh.cmdline_paddr={:#x}", p.cmdline_paddr);
            report!("pvh.rsdp_paddr={:#x}", p.rsdp_paddr);
            report!("pvh.memmap_paddr={:#x}", p.memmap_paddr);
            report!("pvh.memmap_entries={}", p.memmap_entries);
        }
        PROTOCOL_LINUX64 => {
            let z = &boot.zero_page;
            report!("boot.protocol=linux64");
            report!("zp.boot_flag={:#x}", z.boot_flag);
            report!("zp.header={}", Text(&z.header.to_le_bytes()));
            report!("zp.version={:#x}", z.version);
            report!("zp.type_of_loader={:#x}", z.type_of_loader);
            report!("zp.loadflags={:#x}", z.loadflags);
            report!("zp.cmd_line_ptr={:#x}", z.cmd_line_ptr);
            report!("zp.cmdline_size={}", z.cmdline_size);
            report!("zp.e820_entries={}", z.e820_entries);
        }
        _ => report!("boot.protocol=unknown"),
    }
    report!("cmdline={}", Text(boot.cmdline()));
    report!("cmdline.len={}", boot.cmdline_len);
    report!("e820.entries={}", boot.memmap_len);
    let mut ram_end = 0u64;
    for (i, e) in boot.memmap().iter().enumerate() {
        report!("e820.{}={:#x},{:#x},{}", i, e.addr, e.size, e.kind);
        if e.kind == crate::bootinfo::E820_RAM {
            ram_end = ram_end.max(e.addr.saturating_add(e.size));
        }
    }
    report!("e820.ram_bytes={}", boot.ram_bytes());
    report!("e820.ram_end={:#x}", ram_end);
    // The guest image itself must be inside RAM the map reports.
    report!(
        "e820.image_in_ram={}",
        u8::from(boot.is_ram(0x20_0000, 0x1_0000))
    );
}

fn with_blk(boot: &BootInfo, f: fn(&BootInfo, &mut VirtioBlk) -> Result<(), BlkError>) {
    let devices = crate::virtio_blk::mmio_devices(boot).count();
    report!("virtio.devices={}", devices);
    // `kiln.blk_index=N` picks the N-th block device (0 = the first, the rootfs).
    let index = num_param(boot, "kiln.blk_index", 0) as usize;
    report!("blk.index={}", index);
    let mut dev = match VirtioBlk::find_nth(boot, index) {
        Ok(dev) => dev,
        Err(e) => {
            report!("blk.error={:?}", e);
            return;
        }
    };
    report!("blk.features={:#x}", dev.features);
    report!("blk.capacity={}", dev.capacity);
    report!("blk.queue_size={}", dev.queue_size);
    report!("blk.ro={}", u8::from(dev.features & F_RO != 0));
    report!("blk.flush={}", u8::from(dev.features & F_FLUSH != 0));
    if let Err(e) = f(boot, &mut dev) {
        report!("blk.error={:?}", e);
        report!("blk.device_status={:#x}", dev.device_status());
    }
}

/// FNV-1a, 64 bit: cheap enough for the emulated guest, and the host recomputes it.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Byte `i` of the write pattern, as a function of its absolute offset on the disk
/// (the host test computes the same).
pub fn pattern_byte(offset: u64) -> u8 {
    ((offset.wrapping_mul(0x9e37_79b1) >> 11) as u8) ^ 0xa5
}

fn num_param(boot: &BootInfo, key: &str, default: u64) -> u64 {
    boot.param(key).and_then(parse_u64).unwrap_or(default)
}

fn blk_read(boot: &BootInfo, dev: &mut VirtioBlk) -> Result<(), BlkError> {
    let sectors = num_param(boot, "kiln.sectors", 64).min(dev.capacity);
    let mut buf = [0u8; MAX_DATA];
    let mut hash = FNV_OFFSET;
    let mut sector = 0;
    let mut worst = 0u8;
    while sector < sectors {
        let n = (sectors - sector).min((MAX_DATA / 512) as u64);
        let len = (n * 512) as usize;
        let (status, _) = dev.request(T_IN, sector, &mut buf, len)?;
        worst = worst.max(status);
        if sector == 0 {
            let b = &buf[..16];
            report!(
                "blk.read.first16={:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
            );
        }
        hash = fnv1a(hash, buf.get(..len).unwrap_or(&[]));
        sector += n;
    }
    report!("blk.read.status={}", worst);
    report!("blk.read.sectors={}", sectors);
    report!("blk.read.fnv={:#018x}", hash);
    let (istatus, _) = dev.request(T_GET_ID, 0, &mut buf, 20)?;
    let id = buf.get(..20).unwrap_or(&[]);
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    report!("blk.read.get_id.status={}", istatus);
    report!("blk.read.get_id={}", Text(id.get(..end).unwrap_or(&[])));
    Ok(())
}

fn blk_write(boot: &BootInfo, dev: &mut VirtioBlk) -> Result<(), BlkError> {
    let first = num_param(boot, "kiln.sector", 2);
    let count = num_param(boot, "kiln.sectors", 4).min((MAX_DATA / 512) as u64);
    let len = (count * 512) as usize;
    let mut buf = [0u8; MAX_DATA];
    for (i, b) in buf.iter_mut().take(len).enumerate() {
        *b = pattern_byte(first * 512 + i as u64);
    }
    let (status, _) = dev.request(T_OUT, first, &mut buf, len)?;
    report!("blk.write.status={}", status);
    report!("blk.write.sectors={}..{}", first, first + count);
    let mut back = [0u8; MAX_DATA];
    let (rstatus, _) = dev.request(T_IN, first, &mut back, len)?;
    report!("blk.readback.status={}", rstatus);
    let same = buf.get(..len) == back.get(..len);
    report!("blk.readback={}", if same { "match" } else { "mismatch" });
    let (fstatus, _) = dev.request(T_FLUSH, 0, &mut buf, 0)?;
    report!("blk.flush.status={}", fstatus);
    Ok(())
}

fn blk_ro(_boot: &BootInfo, dev: &mut VirtioBlk) -> Result<(), BlkError> {
    let mut buf = [0x5au8; 512];
    let (rstatus, _) = dev.request(T_IN, 0, &mut buf, 512)?;
    report!("blk.read.status={}", rstatus);
    let mut pattern = [0x5au8; 512];
    let (wstatus, _) = dev.request(T_OUT, 0, &mut pattern, 512)?;
    report!("blk.write.status={}", wstatus);
    let (fstatus, _) = dev.request(T_FLUSH, 0, &mut buf, 0)?;
    report!("blk.flush.status={}", fstatus);
    Ok(())
}

fn blk_oob(_boot: &BootInfo, dev: &mut VirtioBlk) -> Result<(), BlkError> {
    let cap = dev.capacity;
    let mut buf = [0u8; 1024];
    let (last, _) = dev.request(T_IN, cap.saturating_sub(1), &mut buf, 512)?;
    report!("blk.oob.last_sector.status={}", last);
    let (at_cap, _) = dev.request(T_IN, cap, &mut buf, 512)?;
    report!("blk.oob.at_capacity.status={}", at_cap);
    let (span, _) = dev.request(T_IN, cap.saturating_sub(1), &mut buf, 1024)?;
    report!("blk.oob.span.status={}", span);
    let (huge, _) = dev.request(T_IN, u64::MAX, &mut buf, 512)?;
    report!("blk.oob.huge.status={}", huge);
    let (wr, _) = dev.request(T_OUT, cap, &mut buf, 512)?;
    report!("blk.oob.write.status={}", wr);
    Ok(())
}

fn blk_flush(_boot: &BootInfo, dev: &mut VirtioBlk) -> Result<(), BlkError> {
    let mut buf = [0u8; 512];
    let (fstatus, _) = dev.request(T_FLUSH, 0, &mut buf, 0)?;
    report!("blk.flush.status={}", fstatus);
    let (istatus, used) = dev.request(T_GET_ID, 0, &mut buf, 20)?;
    report!("blk.get_id.status={}", istatus);
    let id = buf.get(..20).unwrap_or(&[]);
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    report!("blk.get_id={}", Text(id.get(..end).unwrap_or(&[])));
    report!("blk.get_id.used_len={}", used);
    Ok(())
}
