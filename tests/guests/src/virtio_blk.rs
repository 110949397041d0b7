//! Minimal virtio-mmio (version 2, "modern") virtio-blk driver: one queue, polled, no interrupts.
//!
//! Devices are found through `virtio_mmio.device=<size>@<addr>:<irq>` words on the command line,
//! exactly as a Linux guest would find them. Each request is a three-descriptor chain
//! (header, data, status) and the driver polls the used ring until the device returns it.

use crate::arch::{mmio_read32, mmio_write32, pause, rdtsc};
use crate::bootinfo::{parse_size, parse_u64, BootInfo};

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

/// virtio-blk feature bits.
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_VERSION_1: u64 = 1 << 32;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Status byte value the driver pre-fills, so "device never wrote it" is visible.
pub const STATUS_UNTOUCHED: u8 = 0xee;

const QSIZE: usize = 8;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Largest data buffer of one request.
pub const MAX_DATA: usize = 8 * 512;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Queue memory and request buffers, each in its own page (identity-mapped, so the guest-physical
/// address of each is its pointer value).
struct QueueMem {
    desc: Page,
    avail: Page,
    used: Page,
    header: Page,
    data: [Page; 2],
}

static mut QUEUE_MEM: QueueMem = QueueMem {
    desc: Page([0; 4096]),
    avail: Page([0; 4096]),
    used: Page([0; 4096]),
    header: Page([0; 4096]),
    data: [Page([0; 4096]), Page([0; 4096])],
};

/// Why the driver could not set a device up or finish a request.
#[derive(Debug)]
pub enum BlkError {
    NoDevice,
    BadMagic,
    BadVersion(u32),
    NotBlock(u32),
    NoVersion1,
    FeaturesRejected,
    QueueUnavailable,
    Timeout,
    TooLarge,
}

/// A set-up virtio-blk device.
pub struct VirtioBlk {
    base: u64,
    pub features: u64,
    pub capacity: u64,
    pub queue_size: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// Base addresses of the `virtio_mmio.device=` words on the command line, in order.
pub fn mmio_devices(boot: &BootInfo) -> impl Iterator<Item = u64> + '_ {
    boot.params("virtio_mmio.device").filter_map(|v| {
        let at = v.iter().position(|&b| b == b'@')?;
        let size = parse_size(v.get(..at)?)?;
        let rest = v.get(at + 1..)?;
        let colon = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
        let addr = parse_u64(rest.get(..colon)?)?;
        // Only what the guest page tables map, and whole registers.
        (size >= 0x200 && addr & 0x1ff == 0 && addr < 0x1_0000_0000 - size).then_some(addr)
    })
}

impl VirtioBlk {
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: `base` came from the command line, was checked to lie below 4 GiB (identity
        // mapped) and page aligned; `off` is a register offset inside the 4 KiB window.
        unsafe { mmio_read32(self.base + off) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as for `r32`.
        unsafe { mmio_write32(self.base + off, v) }
    }

    /// Finds the first virtio-blk device on the command line and initialises it.
    pub fn find(boot: &BootInfo) -> Result<VirtioBlk, BlkError> {
        Self::find_nth(boot, 0)
    }

    /// Initialises the `index`-th (from 0) device on the command line that is a virtio-blk
    /// device. Only one device may be in use at a time (the queue memory is shared).
    pub fn find_nth(boot: &BootInfo, index: usize) -> Result<VirtioBlk, BlkError> {
        let mut last = BlkError::NoDevice;
        let mut seen = 0;
        for base in mmio_devices(boot) {
            match Self::init(base) {
                Ok(dev) if seen == index => return Ok(dev),
                Ok(dev) => {
                    dev.w32(STATUS, 0);
                    seen += 1;
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn init(base: u64) -> Result<VirtioBlk, BlkError> {
        let mut dev = VirtioBlk {
            base,
            features: 0,
            capacity: 0,
            queue_size: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        if dev.r32(MAGIC) != 0x7472_6976 {
            return Err(BlkError::BadMagic);
        }
        let version = dev.r32(VERSION);
        if version != 2 {
            return Err(BlkError::BadVersion(version));
        }
        let id = dev.r32(DEVICE_ID);
        if id != 2 {
            return Err(BlkError::NotBlock(id));
        }
        dev.w32(STATUS, 0);
        dev.w32(STATUS, STATUS_ACKNOWLEDGE);
        dev.w32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        dev.w32(DEVICE_FEATURES_SEL, 0);
        let lo = dev.r32(DEVICE_FEATURES);
        dev.w32(DEVICE_FEATURES_SEL, 1);
        let hi = dev.r32(DEVICE_FEATURES);
        dev.features = (u64::from(hi) << 32) | u64::from(lo);
        if dev.features & F_VERSION_1 == 0 {
            return Err(BlkError::NoVersion1);
        }
        let accept = dev.features & (F_VERSION_1 | F_RO | F_FLUSH);
        dev.w32(DRIVER_FEATURES_SEL, 0);
        dev.w32(DRIVER_FEATURES, accept as u32);
        dev.w32(DRIVER_FEATURES_SEL, 1);
        dev.w32(DRIVER_FEATURES, (accept >> 32) as u32);
        let st = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        dev.w32(STATUS, st);
        if dev.r32(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(BlkError::FeaturesRejected);
        }
        dev.w32(QUEUE_SEL, 0);
        let max = dev.r32(QUEUE_NUM_MAX);
        if max == 0 || dev.r32(QUEUE_READY) != 0 {
            return Err(BlkError::QueueUnavailable);
        }
        let size = (max as usize).min(QSIZE) as u16;
        dev.queue_size = size;
        // SAFETY: single-threaded guest; only this driver touches QUEUE_MEM, and only through raw
        // pointers obtained here.
        let (desc, avail, used) = unsafe {
            let mem = &raw mut QUEUE_MEM;
            core::ptr::write_bytes(mem, 0, 1);
            (
                (&raw mut (*mem).desc) as u64,
                (&raw mut (*mem).avail) as u64,
                (&raw mut (*mem).used) as u64,
            )
        };
        dev.w32(QUEUE_NUM, u32::from(size));
        dev.w32(QUEUE_DESC_LOW, desc as u32);
        dev.w32(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        dev.w32(QUEUE_DRIVER_LOW, avail as u32);
        dev.w32(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        dev.w32(QUEUE_DEVICE_LOW, used as u32);
        dev.w32(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        dev.w32(QUEUE_READY, 1);
        dev.w32(STATUS, st | STATUS_DRIVER_OK);
        let cap_lo = dev.r32(CONFIG);
        let cap_hi = dev.r32(CONFIG + 4);
        dev.capacity = (u64::from(cap_hi) << 32) | u64::from(cap_lo);
        Ok(dev)
    }

    /// Device status register (for reporting DEVICE_NEEDS_RESET / FAILED).
    pub fn device_status(&self) -> u32 {
        self.r32(STATUS)
    }

    /// Submits one request and waits for it. For `T_OUT` the first `len` bytes of `buf` are
    /// sent; for `T_IN`/`T_GET_ID` up to `len` bytes are received into `buf`. Returns the status
    /// byte the device wrote ([`STATUS_UNTOUCHED`] if it wrote none) and the used length.
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        buf: &mut [u8],
        len: usize,
    ) -> Result<(u8, u32), BlkError> {
        if len > MAX_DATA || len > buf.len() {
            return Err(BlkError::TooLarge);
        }
        let q = &raw mut QUEUE_MEM;
        // SAFETY: single-threaded guest; the device only reads/writes these pages between the
        // notify below and the used-ring update we wait for, so no Rust reference aliases them.
        unsafe {
            let header = (&raw mut (*q).header) as *mut u8;
            let data = (&raw mut (*q).data) as *mut u8;
            core::ptr::write_bytes(header, 0, 16);
            core::ptr::write_unaligned(header as *mut u32, kind);
            core::ptr::write_unaligned(header.add(8) as *mut u64, sector);
            let status = header.add(64);
            core::ptr::write_volatile(status, STATUS_UNTOUCHED);
            if kind == T_OUT {
                core::ptr::copy_nonoverlapping(buf.as_ptr(), data, len);
            } else {
                core::ptr::write_bytes(data, 0, len);
            }
            let desc = (&raw mut (*q).desc) as *mut u8;
            let mut n = 0u16;
            let mut put = |addr: u64, dlen: u32, flags: u16| {
                let d = desc.add(usize::from(n) * 16);
                core::ptr::write_unaligned(d as *mut u64, addr);
                core::ptr::write_unaligned(d.add(8) as *mut u32, dlen);
                core::ptr::write_unaligned(d.add(12) as *mut u16, flags | DESC_F_NEXT);
                core::ptr::write_unaligned(d.add(14) as *mut u16, n + 1);
                n += 1;
            };
            put(header as u64, 16, 0);
            if len > 0 {
                let flags = if kind == T_OUT { 0 } else { DESC_F_WRITE };
                put(data as u64, len as u32, flags);
            }
            put(status as u64, 1, DESC_F_WRITE);
            // Clear NEXT on the last descriptor.
            let last = desc.add(usize::from(n - 1) * 16);
            core::ptr::write_unaligned(last.add(12) as *mut u16, DESC_F_WRITE);

            let avail = (&raw mut (*q).avail) as *mut u8;
            let slot = usize::from(self.avail_idx % self.queue_size);
            core::ptr::write_volatile(avail.add(4 + slot * 2) as *mut u16, 0);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            core::ptr::write_volatile(avail.add(2) as *mut u16, self.avail_idx);
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            self.w32(QUEUE_NOTIFY, 0);

            let used = (&raw mut (*q).used) as *mut u8;
            let start = rdtsc();
            while core::ptr::read_volatile(used.add(2) as *const u16) == self.used_seen {
                if rdtsc().wrapping_sub(start) > 20_000_000_000 {
                    return Err(BlkError::Timeout);
                }
                pause();
            }
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            let uslot = usize::from(self.used_seen % self.queue_size);
            let used_len = core::ptr::read_volatile(used.add(4 + uslot * 8 + 4) as *const u32);
            self.used_seen = self.used_seen.wrapping_add(1);
            let isr = self.r32(INTERRUPT_STATUS);
            if isr != 0 {
                self.w32(INTERRUPT_ACK, isr);
            }
            if kind != T_OUT {
                core::ptr::copy_nonoverlapping(data, buf.as_mut_ptr(), len);
            }
            Ok((core::ptr::read_volatile(status), used_len))
        }
    }
}
