//! Minimal virtio-mmio (version 2) virtio-vsock driver: the device and its three virtqueues,
//! polled, no interrupts. The connection layer on top is [`crate::vsock_conn`].
//!
//! Memory: queues and buffers live in a fixed guest-physical region ([`MEM_BASE`], [`MEM_LEN`])
//! that [`VsockDev::find`] checks is RAM in the boot memory map; the guest identity-maps it, so a
//! buffer's address is also its guest-physical address. Nothing is zeroed beyond the ring headers
//! (the guest's RAM starts zeroed and every byte the device reads is written first).
//!
//! - rx: [`RX_QSIZE`] buffers of one descriptor each (`44 + 64 KiB`), descriptor `j` always
//!   describes buffer `j`. A received buffer is either recycled at once or *lent* to the tx queue
//!   (zero-copy echo: the header is rewritten in place and the same bytes go back out) and
//!   recycled when the device returns it.
//! - tx: [`TX_SLOTS`] slots of two descriptors (`2s`, `2s + 1`): a header slot plus an optional
//!   payload descriptor, or a single lent rx buffer.
//! - event: a few 8-byte buffers, never read (kiln's device sends no events).

use crate::arch::{mmio_read32, mmio_write32};
use crate::bootinfo::BootInfo;
use crate::virtio_blk::mmio_devices;
use core::sync::atomic::{fence, Ordering};

// virtio-mmio v2 registers (virtio 1.2, 4.2.2); the blk driver keeps its own private copy.
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
const F_VERSION_1: u64 = 1 << 32;

/// virtio device ID of a socket device.
pub const DEVICE_ID_VSOCK: u32 = 19;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload of one packet (Linux's and host-vmm's limit).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// rx queue entries (and rx buffers).
pub const RX_QSIZE: u16 = 64;
/// tx slots; the tx queue has two descriptors per slot.
pub const TX_SLOTS: usize = 64;
const TX_QSIZE: u16 = (TX_SLOTS * 2) as u16;
const EV_QSIZE: u16 = 4;
const RX_Q: u32 = 0;
const TX_Q: u32 = 1;
const EV_Q: u32 = 2;

/// Start of the driver's memory region (16 MiB: above the guest image, below 128 MiB of RAM).
pub const MEM_BASE: u64 = 0x100_0000;
const RX_DESC: u64 = MEM_BASE;
const RX_AVAIL: u64 = MEM_BASE + 0x1000;
const RX_USED: u64 = MEM_BASE + 0x2000;
const TX_DESC: u64 = MEM_BASE + 0x3000;
const TX_AVAIL: u64 = MEM_BASE + 0x4000;
const TX_USED: u64 = MEM_BASE + 0x5000;
const EV_DESC: u64 = MEM_BASE + 0x6000;
const EV_AVAIL: u64 = MEM_BASE + 0x7000;
const EV_USED: u64 = MEM_BASE + 0x8000;
const EV_BUFS: u64 = MEM_BASE + 0x9000;
/// 64 bytes per tx slot: a header and up to 20 bytes of inline payload.
const TX_HDRS: u64 = MEM_BASE + 0x1_0000;
const TX_HDR_STRIDE: u64 = 64;
/// Largest inline payload of a control packet.
pub const INLINE_MAX: usize = (TX_HDR_STRIDE as usize) - HDR_LEN;
/// 64 KiB of pattern bytes that source connections send, over and over.
pub const PATTERN: u64 = MEM_BASE + 0x2_0000;
/// Bytes of the pattern.
pub const PATTERN_LEN: u64 = 0x1_0000;
const RX_BUFS: u64 = MEM_BASE + 0x4_0000;
const RX_STRIDE: u64 = 0x1_1000;
const RX_BUF_LEN: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;
/// Per-connection staging buffers (see `vsock_conn`), [`STAGE_LEN`] bytes each.
pub const STAGE_BASE: u64 = RX_BUFS + RX_STRIDE * RX_QSIZE as u64;
/// Bytes of one connection's staging buffer: the most the guest ever advertises as buf_alloc.
pub const STAGE_LEN: u32 = 128 * 1024;
/// Connection slots (each with a staging buffer).
pub const MAX_CONNS: usize = 66;
/// Bytes of the whole region.
pub const MEM_LEN: u64 = STAGE_BASE + STAGE_LEN as u64 * MAX_CONNS as u64 - MEM_BASE;

// The region's RAM accessors. Every address passed to them is computed from the constants above
// plus indices the callers bound (queue slots, buffer numbers, offsets below a buffer's length),
// so it lies inside the region that `VsockDev::find` checked is RAM; the guest identity-maps the
// first 4 GiB, is single-threaded, and the device only touches these bytes as virtio allows.

fn w16(addr: u64, v: u16) {
    // SAFETY: see the comment above; `addr` is 2-aligned (ring and header field offsets).
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
fn w32(addr: u64, v: u32) {
    // SAFETY: as for `w16`, 4-aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}
fn w64(addr: u64, v: u64) {
    // SAFETY: as for `w16`, 8-aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}
fn r16(addr: u64) -> u16 {
    // SAFETY: as for `w16`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
fn r32(addr: u64) -> u32 {
    // SAFETY: as for `w32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
fn r64(addr: u64) -> u64 {
    // SAFETY: as for `w64`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Copies `len` bytes between two places of the region (staging, rx buffers, pattern).
pub fn copy_in_region(dst: u64, src: u64, len: usize) {
    debug_assert!(dst >= MEM_BASE && dst + len as u64 <= MEM_BASE + MEM_LEN);
    debug_assert!(src >= MEM_BASE && src + len as u64 <= MEM_BASE + MEM_LEN);
    // SAFETY: both ranges are inside the region (callers bound them by buffer lengths) and do
    // not overlap (different buffers); no Rust reference points into the region.
    unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) }
}

/// Writes `bytes` into the region at `dst`.
pub fn write_region(dst: u64, bytes: &[u8]) {
    debug_assert!(dst >= MEM_BASE && dst + bytes.len() as u64 <= MEM_BASE + MEM_LEN);
    // SAFETY: as for `copy_in_region`; `bytes` is a Rust object outside the region.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len()) }
}

/// Reads one byte of the region.
pub fn read_region_byte(addr: u64) -> u8 {
    // SAFETY: as for `w16`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Packet operations (virtio 1.2, 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flags.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = 3;
/// Stream sockets, the only type.
pub const TYPE_STREAM: u16 = 1;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// A packet header.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    fn read(at: u64) -> Hdr {
        Hdr {
            src_cid: r64(at),
            dst_cid: r64(at + 8),
            src_port: r32(at + 16),
            dst_port: r32(at + 20),
            len: r32(at + 24),
            type_: r16(at + 28),
            op: r16(at + 30),
            flags: r32(at + 32),
            buf_alloc: r32(at + 36),
            fwd_cnt: r32(at + 40),
        }
    }

    fn write(&self, at: u64) {
        w64(at, self.src_cid);
        w64(at + 8, self.dst_cid);
        w32(at + 16, self.src_port);
        w32(at + 20, self.dst_port);
        w32(at + 24, self.len);
        w16(at + 28, self.type_);
        w16(at + 30, self.op);
        w32(at + 32, self.flags);
        w32(at + 36, self.buf_alloc);
        w32(at + 40, self.fwd_cnt);
    }
}

/// One split virtqueue.
struct Vq {
    sel: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    published: u16,
    used_seen: u16,
}

impl Vq {
    fn new(sel: u32, size: u16, desc: u64, avail: u64, used: u64) -> Vq {
        Vq {
            sel,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            published: 0,
            used_seen: 0,
        }
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + u64::from(i % self.size) * 16;
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next);
    }

    /// Puts a chain head in the avail ring (made visible by [`Vq::publish`]).
    fn offer(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        w16(self.avail + 4 + slot * 2, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes offered heads; true if there were any (the device needs a notification).
    fn publish(&mut self) -> bool {
        if self.next_avail == self.published {
            return false;
        }
        fence(Ordering::SeqCst);
        w16(self.avail + 2, self.next_avail);
        fence(Ordering::SeqCst);
        self.published = self.next_avail;
        true
    }

    /// The next used element: (descriptor id, bytes written).
    fn take_used(&mut self) -> Option<(u32, u32)> {
        if r16(self.used + 2) == self.used_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = u64::from(self.used_seen % self.size);
        let id = r32(self.used + 4 + slot * 8);
        let len = r32(self.used + 4 + slot * 8 + 4);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
}

/// What a busy tx slot carries, handed back when the device returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxUse {
    /// Header (and inline bytes) only.
    Control,
    /// A lent rx buffer, to recycle.
    Lent(u16),
    /// `len` bytes of connection `conn`'s staging buffer (generation `gen`).
    Stage { conn: u16, gen: u16, len: u32 },
    /// Pattern bytes (nothing to release).
    Pattern,
}

/// Why the device could not be set up.
#[derive(Debug)]
pub enum VsockError {
    NoDevice,
    NotRam,
    FeaturesRejected,
    QueueUnavailable(u32),
}

/// A set-up virtio-vsock device.
pub struct VsockDev {
    base: u64,
    /// Guest CID from the config space.
    pub cid: u64,
    rx: Vq,
    tx: Vq,
    ev: Vq,
    tx_use: [TxUse; TX_SLOTS],
    free: [u8; TX_SLOTS],
    free_len: usize,
    /// Device bugs seen: used ids out of range, rx lengths shorter than the header.
    pub bad_used: u32,
}

/// A received packet, still in rx buffer `buf`.
#[derive(Clone, Copy, Debug)]
pub struct Rx {
    pub buf: u16,
    pub hdr: Hdr,
}

impl VsockDev {
    fn r(&self, off: u64) -> u32 {
        // SAFETY: `base` came from the command line and was checked to be below 4 GiB (identity
        // mapped) and aligned; `off` is a register offset inside the device window.
        unsafe { mmio_read32(self.base + off) }
    }

    fn w(&self, off: u64, v: u32) {
        // SAFETY: as for `r`.
        unsafe { mmio_write32(self.base + off, v) }
    }

    /// Finds the first virtio-vsock device on the command line and brings it up.
    pub fn find(boot: &BootInfo) -> Result<VsockDev, VsockError> {
        if !boot.is_ram(MEM_BASE, MEM_LEN) {
            return Err(VsockError::NotRam);
        }
        let base = mmio_devices(boot)
            .find(|&b| {
                // SAFETY: as in `VsockDev::r`; reading identification registers has no effect.
                let (magic, version, id) = unsafe {
                    (
                        mmio_read32(b + MAGIC),
                        mmio_read32(b + VERSION),
                        mmio_read32(b + DEVICE_ID),
                    )
                };
                magic == 0x7472_6976 && version == 2 && id == DEVICE_ID_VSOCK
            })
            .ok_or(VsockError::NoDevice)?;
        let mut dev = VsockDev {
            base,
            cid: 0,
            rx: Vq::new(RX_Q, RX_QSIZE, RX_DESC, RX_AVAIL, RX_USED),
            tx: Vq::new(TX_Q, TX_QSIZE, TX_DESC, TX_AVAIL, TX_USED),
            ev: Vq::new(EV_Q, EV_QSIZE, EV_DESC, EV_AVAIL, EV_USED),
            tx_use: [TxUse::Control; TX_SLOTS],
            free: [0; TX_SLOTS],
            free_len: 0,
            bad_used: 0,
        };
        for s in 0..TX_SLOTS {
            dev.free[s] = (TX_SLOTS - 1 - s) as u8;
        }
        dev.free_len = TX_SLOTS;
        dev.w(STATUS, 0);
        dev.w(STATUS, STATUS_ACKNOWLEDGE);
        dev.w(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        dev.w(DEVICE_FEATURES_SEL, 1);
        let hi = dev.r(DEVICE_FEATURES);
        if (u64::from(hi) << 32) & F_VERSION_1 == 0 {
            return Err(VsockError::FeaturesRejected);
        }
        dev.w(DRIVER_FEATURES_SEL, 0);
        dev.w(DRIVER_FEATURES, 0);
        dev.w(DRIVER_FEATURES_SEL, 1);
        dev.w(DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
        let st = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        dev.w(STATUS, st);
        if dev.r(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(VsockError::FeaturesRejected);
        }
        for q in [&dev.rx, &dev.tx, &dev.ev] {
            // Ring headers: flags (no interrupts please) and index; the rest is written before use.
            w16(q.avail, AVAIL_F_NO_INTERRUPT);
            w16(q.avail + 2, 0);
            w16(q.used, 0);
            w16(q.used + 2, 0);
            dev.w(QUEUE_SEL, q.sel);
            let max = dev.r(QUEUE_NUM_MAX);
            if max < u32::from(q.size) || dev.r(QUEUE_READY) != 0 {
                return Err(VsockError::QueueUnavailable(q.sel));
            }
            dev.w(QUEUE_NUM, u32::from(q.size));
            for (lo, hi, addr) in [
                (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, q.desc),
                (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, q.avail),
                (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, q.used),
            ] {
                dev.w(lo, addr as u32);
                dev.w(hi, (addr >> 32) as u32);
            }
            dev.w(QUEUE_READY, 1);
        }
        dev.w(STATUS, st | STATUS_DRIVER_OK);
        dev.cid = u64::from(dev.r(CONFIG)) | (u64::from(dev.r(CONFIG + 4)) << 32);
        for j in 0..RX_QSIZE {
            dev.rx.set_desc(j, rx_buf(j), RX_BUF_LEN, DESC_F_WRITE, 0);
            dev.rx.offer(j);
        }
        for j in 0..EV_QSIZE {
            dev.ev
                .set_desc(j, EV_BUFS + u64::from(j) * 8, 8, DESC_F_WRITE, 0);
            dev.ev.offer(j);
        }
        dev.flush();
        Ok(dev)
    }

    /// Device status register (DEVICE_NEEDS_RESET shows here).
    pub fn device_status(&self) -> u32 {
        self.r(STATUS)
    }

    /// Publishes everything offered since the last call and notifies the device.
    pub fn flush(&mut self) {
        for q in [&mut self.rx, &mut self.tx, &mut self.ev] {
            if q.publish() {
                // SAFETY: as in `VsockDev::r`.
                unsafe { mmio_write32(self.base + QUEUE_NOTIFY, q.sel) };
            }
        }
    }

    /// The next packet the device delivered, or `None`. Packets whose used length cannot hold
    /// the header and the payload it announces are recycled and counted in `bad_used`.
    pub fn recv(&mut self) -> Option<Rx> {
        loop {
            let (id, len) = self.rx.take_used()?;
            if id >= u32::from(RX_QSIZE) {
                self.bad_used += 1;
                continue;
            }
            let buf = id as u16;
            let hdr = Hdr::read(rx_buf(buf));
            let fits = (len as usize)
                .checked_sub(HDR_LEN)
                .is_some_and(|room| hdr.len as usize <= room && hdr.len as usize <= MAX_PAYLOAD);
            if !fits {
                self.bad_used += 1;
                self.recycle(buf);
                continue;
            }
            return Some(Rx { buf, hdr });
        }
    }

    /// The next tx slot the device returned, with what it carried.
    pub fn tx_done(&mut self) -> Option<TxUse> {
        loop {
            let (id, _) = self.tx.take_used()?;
            let slot = (id / 2) as usize;
            if id % 2 != 0 || slot >= TX_SLOTS {
                self.bad_used += 1;
                continue;
            }
            let what = self.tx_use[slot];
            if self.free_len < TX_SLOTS {
                self.free[self.free_len] = slot as u8;
                self.free_len += 1;
            }
            if let TxUse::Lent(buf) = what {
                self.recycle(buf);
            }
            return Some(what);
        }
    }

    /// Gives rx buffer `buf` back to the device.
    pub fn recycle(&mut self, buf: u16) {
        self.rx.offer(buf);
    }

    /// Free tx slots.
    pub fn tx_free(&self) -> usize {
        self.free_len
    }

    fn take_slot(&mut self, what: TxUse) -> Option<u16> {
        self.free_len = self.free_len.checked_sub(1)?;
        let slot = self.free[self.free_len];
        self.tx_use[usize::from(slot)] = what;
        Some(u16::from(slot))
    }

    /// Sends a header with up to [`INLINE_MAX`] inline payload bytes. False if no slot is free.
    pub fn send_control(&mut self, hdr: &Hdr, inline: &[u8]) -> bool {
        let inline = inline.get(..inline.len().min(INLINE_MAX)).unwrap_or(&[]);
        let Some(slot) = self.take_slot(TxUse::Control) else {
            return false;
        };
        let at = TX_HDRS + u64::from(slot) * TX_HDR_STRIDE;
        let mut h = *hdr;
        h.len = inline.len() as u32;
        h.write(at);
        write_region(at + HDR_LEN as u64, inline);
        self.tx
            .set_desc(slot * 2, at, (HDR_LEN + inline.len()) as u32, 0, 0);
        self.tx.offer(slot * 2);
        true
    }

    /// Sends a header followed by `len` bytes at `addr` (staging or pattern memory).
    pub fn send_split(&mut self, hdr: &Hdr, addr: u64, len: u32, what: TxUse) -> bool {
        let Some(slot) = self.take_slot(what) else {
            return false;
        };
        let at = TX_HDRS + u64::from(slot) * TX_HDR_STRIDE;
        let mut h = *hdr;
        h.len = len;
        h.write(at);
        self.tx
            .set_desc(slot * 2, at, HDR_LEN as u32, DESC_F_NEXT, slot * 2 + 1);
        self.tx.set_desc(slot * 2 + 1, addr, len, 0, 0);
        self.tx.offer(slot * 2);
        true
    }

    /// Sends rx buffer `buf` back out with header `hdr` written over the received one; its
    /// payload (`hdr.len` bytes) is what was received. The buffer is recycled when the device
    /// returns it. False (buffer untouched) if no slot is free.
    pub fn send_lent(&mut self, buf: u16, hdr: &Hdr) -> bool {
        let Some(slot) = self.take_slot(TxUse::Lent(buf)) else {
            return false;
        };
        let at = rx_buf(buf);
        hdr.write(at);
        self.tx
            .set_desc(slot * 2, at, HDR_LEN as u32 + hdr.len, 0, 0);
        self.tx.offer(slot * 2);
        true
    }
}

/// Guest-physical address of rx buffer `j` (its header; the payload follows).
pub fn rx_buf(j: u16) -> u64 {
    RX_BUFS + u64::from(j % RX_QSIZE) * RX_STRIDE
}

/// Guest-physical address of the payload of rx buffer `j`.
pub fn rx_payload(j: u16) -> u64 {
    rx_buf(j) + HDR_LEN as u64
}

/// Address of connection `i`'s staging buffer.
pub fn stage_buf(i: usize) -> u64 {
    STAGE_BASE + (i % MAX_CONNS) as u64 * u64::from(STAGE_LEN)
}
