//! virtio-blk tests: requests built by hand in guest memory, driven through the MMIO transport
//! against a real temporary image file (no KVM).

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{Disk, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{status, MmioTransport};
use crate::devices::virtio::test_driver::*;

const SECTORS: u64 = 64;
const HDR: u64 = 0x10_000;
const STATUS: u64 = 0x18_000;
const DATA: u64 = 0x20_000;

struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn temp_image(len: usize) -> (TempImage, Vec<u8>) {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "kiln-blk-test-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let data = pattern(len);
    std::fs::write(&path, &data).unwrap();
    (TempImage(path), data)
}

struct Rig {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    q: TestQueue,
    image: TempImage,
    original: Vec<u8>,
}

fn rig(read_only: bool) -> Rig {
    let (image, original) = temp_image((SECTORS * 512) as usize);
    let block = Block::new(&image.0, read_only).unwrap();
    let mem = guest_memory();
    let mut t = MmioTransport::new(mem.clone(), Box::new(block)).unwrap();
    let s = negotiate(
        &mut t,
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_RING_F_INDIRECT_DESC,
    );
    assert_ne!(s & status::FEATURES_OK, 0);
    let q = TestQueue::new(QUEUE_SIZE, 0x1000);
    q.install(&mut t, 0);
    driver_ok(&mut t);
    assert!(t.is_activated());
    Rig {
        t,
        mem,
        q,
        image,
        original,
    }
}

impl Rig {
    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Publishes a chain, runs the queue, returns (used length, status byte).
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, u8) {
        let before = self.q.used_idx(&self.mem);
        let head = self.q.add_chain(&self.mem, bufs);
        self.t.process_queue(0);
        assert_eq!(self.q.used_idx(&self.mem), before.wrapping_add(1));
        let (id, len) = self.q.used_elem(&self.mem, before);
        assert_eq!(id, u32::from(head));
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(&mut self, req_type: u32, sector: u64, data_len: u32, write: bool) -> (u32, u8) {
        self.header(req_type, sector);
        self.submit(&[(HDR, 16, false), (DATA, data_len, write), (STATUS, 1, true)])
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.image.0).unwrap()
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }
}

#[test]
fn config_space_and_features() {
    let mut r = rig(false);
    let mut cap = [0u8; 8];
    r.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut seg = [0u8; 4];
    r.t.read(0x100 + 12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), u32::from(QUEUE_SIZE) - 2);
    assert_eq!(read_reg(&mut r.t, 0x8), 2);
    write_reg(&mut r.t, 0x14, 0);
    assert_eq!(read_reg(&mut r.t, 0x10) as u64 & VIRTIO_BLK_F_RO, 0);
    let mut ro = rig(true);
    write_reg(&mut ro.t, 0x14, 0);
    assert_ne!(read_reg(&mut ro.t, 0x10) as u64 & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn read_returns_file_bytes() {
    let mut r = rig(false);
    let (len, st) = r.request(T_IN, 1, 1024, true);
    assert_eq!(st, S_OK);
    assert_eq!(len, 1025);
    assert_eq!(r.data(1024), r.original[512..1536]);
    // Data split over several descriptors.
    r.header(T_IN, 3);
    let (_, st) = r.submit(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 0x1000, 1024, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(st, S_OK);
    assert_eq!(r.data(512), r.original[3 * 512..4 * 512]);
    let mut second = vec![0u8; 1024];
    r.mem
        .read_slice(&mut second, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(second, r.original[4 * 512..6 * 512]);
    // A large request through the bounce buffer, ending on the last sector.
    let (_, st) = r.request(T_IN, 0, (SECTORS * 512) as u32, true);
    assert_eq!(st, S_OK);
    assert_eq!(r.data((SECTORS * 512) as usize), r.original);
}

#[test]
fn write_reaches_file() {
    let mut r = rig(false);
    let payload: Vec<u8> = (0..1024).map(|i| (255 - i % 251) as u8).collect();
    r.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    let (len, st) = r.request(T_OUT, 5, 1024, false);
    assert_eq!(st, S_OK);
    assert_eq!(len, 1);
    let mut expect = r.original.clone();
    expect[5 * 512..7 * 512].copy_from_slice(&payload);
    assert_eq!(r.file(), expect);
    let (_, st) = r.request(T_FLUSH, 0, 0, false);
    assert_eq!(st, S_OK);
}

#[test]
fn read_only_rejects_writes_and_leaves_file_unchanged() {
    let mut r = rig(true);
    r.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let (_, st) = r.request(T_OUT, 0, 512, false);
    assert_eq!(st, S_IOERR);
    let (_, st) = r.request(T_IN, 0, 512, true);
    assert_eq!(st, S_OK);
    let (_, st) = r.request(T_FLUSH, 0, 0, false);
    assert_eq!(st, S_OK);
    assert_eq!(r.file(), r.original);
}

#[test]
fn out_of_range_sectors_get_ioerr() {
    let mut r = rig(false);
    for (sector, len) in [
        (SECTORS, 512),
        (SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512 + 1, 512),
        (u64::MAX - 1, 1024),
    ] {
        let (_, st) = r.request(T_IN, sector, len, true);
        assert_eq!(st, S_IOERR, "read at {sector}");
        let (_, st) = r.request(T_OUT, sector, len, false);
        assert_eq!(st, S_IOERR, "write at {sector}");
    }
    // Not a whole number of sectors.
    let (_, st) = r.request(T_IN, 0, 100, true);
    assert_eq!(st, S_IOERR);
    let (_, st) = r.request(T_OUT, 0, 513, false);
    assert_eq!(st, S_IOERR);
    assert_eq!(r.file(), r.original);
}

#[test]
fn get_id_and_unsupported() {
    let mut r = rig(false);
    let (len, st) = r.request(T_GET_ID, 0, 20, true);
    assert_eq!(st, S_OK);
    assert_eq!(len, 21);
    let id = r.data(20);
    assert!(id.starts_with(b"kiln"), "{id:?}");
    // A short buffer gets a truncated id, not an overflow.
    r.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    let (len, st) = r.request(T_GET_ID, 0, 8, true);
    assert_eq!((len, st), (9, S_OK));
    assert_eq!(r.data(20)[..8], id[..8]);
    assert_eq!(r.data(20)[8..], [0xee; 12]);
    let (len, st) = r.request(99, 0, 0, false);
    assert_eq!((len, st), (1, S_UNSUPP));
}

#[test]
fn short_chains_are_rejected() {
    let mut r = rig(false);
    // Header only: no status byte to write; the buffer is still returned.
    r.header(T_IN, 0);
    let (len, st) = r.submit(&[(HDR, 16, false)]);
    assert_eq!((len, st), (0, 0xff));
    // Truncated header.
    r.header(T_IN, 0);
    let (len, st) = r.submit(&[(HDR, 8, false), (STATUS, 1, true)]);
    assert_eq!((len, st), (1, S_IOERR));
    // Header in a device-writable buffer.
    r.header(T_IN, 0);
    let (_, st) = r.submit(&[(HDR, 16, true), (STATUS, 1, true)]);
    assert_eq!(st, S_IOERR);
    // Readable descriptor after a writable one: rejected, no status (last desc is readable).
    r.header(T_OUT, 0);
    let (len, st) = r.submit(&[(HDR, 16, false), (STATUS, 1, true), (DATA, 512, false)]);
    assert_eq!((len, st), (0, 0xff));
    // Readable after writable but the chain ends in a writable byte: status written.
    r.header(T_OUT, 0);
    let (len, st) = r.submit(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 0x1000, 512, false),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, st), (1, S_IOERR));
    assert_eq!(r.file(), r.original);
    // The device still works.
    let (_, st) = r.request(T_IN, 0, 512, true);
    assert_eq!(st, S_OK);
}

#[test]
fn looping_chain_is_rejected() {
    let mut r = rig(false);
    r.header(T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> ...
    r.q.set_desc(&r.mem, 0, HDR, 16, F_NEXT, 1);
    r.q.set_desc(&r.mem, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    r.q.set_desc(&r.mem, 2, STATUS, 1, F_NEXT | F_WRITE, 1);
    r.q.publish(&r.mem, 0);
    r.t.process_queue(0);
    assert_eq!(r.q.used_idx(&r.mem), 1);
    assert_eq!(r.q.used_elem(&r.mem, 0), (0, 0));
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    // `next` beyond the queue size.
    r.q.set_desc(&r.mem, 3, HDR, 16, F_NEXT, 0x8000);
    r.q.publish(&r.mem, 3);
    r.t.process_queue(0);
    assert_eq!(r.q.used_idx(&r.mem), 2);
    assert_eq!(r.t.device_status() & status::NEEDS_RESET, 0);
}

#[test]
fn descriptors_outside_memory_are_rejected() {
    let mut r = rig(false);
    let end = MEM_SIZE as u64;
    // Data buffer straddles the end of guest memory.
    let (_, st) = {
        r.header(T_IN, 0);
        r.submit(&[(HDR, 16, false), (end - 256, 512, true), (STATUS, 1, true)])
    };
    assert_eq!(st, S_IOERR);
    // Header far outside memory; address arithmetic that would wrap.
    r.header(T_OUT, 0);
    let (_, st) = r.submit(&[(u64::MAX - 4, 16, false), (STATUS, 1, true)]);
    assert_eq!(st, S_IOERR);
    // Status byte outside memory: nothing can be written, but the chain is returned.
    let (len, _) = r.submit(&[(HDR, 16, false), (end + 0x1000, 1, true)]);
    assert_eq!(len, 0);
    assert_eq!(r.file(), r.original);
}

#[test]
fn indirect_descriptor_table() {
    let mut r = rig(false);
    r.header(T_IN, 2);
    let table = 0x30_000u64;
    // An indirect table has the descriptor-table layout: reuse the driver helper to fill it.
    let t = TestQueue::new(4, table);
    t.set_desc(&r.mem, 0, HDR, 16, F_NEXT, 1);
    t.set_desc(&r.mem, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    t.set_desc(&r.mem, 2, STATUS, 1, F_WRITE, 0);
    r.q.set_desc(&r.mem, 0, table, 48, F_INDIRECT, 0);
    r.q.publish(&r.mem, 0);
    r.t.process_queue(0);
    assert_eq!(r.q.used_elem(&r.mem, 0), (0, 513));
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(r.data(512), r.original[1024..1536]);
}

#[test]
fn work_per_notification_is_bounded() {
    let mut r = rig(false);
    r.header(T_FLUSH, 0);
    let total = 200u16;
    for _ in 0..total {
        r.q.add_chain(&r.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    r.t.process_queue(0);
    assert_eq!(r.q.used_idx(&r.mem), MAX_REQUESTS_PER_CALL as u16);
    assert_eq!(r.t.queue_evts()[0].read().unwrap(), 1, "queue re-armed");
    r.t.process_queue(0);
    assert_eq!(r.q.used_idx(&r.mem), total);
    assert_eq!(read_reg(&mut r.t, 0x60) & 1, 1);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (image, _) = temp_image(4096);
    let mem = guest_memory();
    let mut t =
        MmioTransport::new(mem.clone(), Box::new(Block::new(&image.0, false).unwrap())).unwrap();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let mut q = TestQueue::new(QUEUE_SIZE, 0x1000);
    q.install(&mut t, 0);
    driver_ok(&mut t);
    let used_event = GuestAddress(q.avail + 4 + 2 * u64::from(QUEUE_SIZE));
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_FLUSH.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    // The driver asks for an interrupt only once the used index passes 2.
    mem.write_obj(2u16, used_event).unwrap();
    for expected in [false, false, true] {
        q.add_chain(&mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        t.process_queue(0);
        assert_eq!(t.irq_evt().read().is_ok(), expected);
    }
    assert_eq!(q.used_idx(&mem), 3);
    // The device published avail_event so the driver can suppress kicks as well.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(q.used + 4 + 8 * u64::from(QUEUE_SIZE)))
        .unwrap();
    assert_eq!(avail_event, 3);
}

#[test]
fn random_descriptor_tables_never_panic() {
    let mut r = rig(false);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let addrs = [
        HDR,
        DATA,
        STATUS,
        MEM_SIZE as u64 - 8,
        MEM_SIZE as u64,
        u64::MAX - 3,
        0x1000,
    ];
    for round in 0..300 {
        for i in 0..16u16 {
            let v = next();
            let addr = addrs[v as usize % addrs.len()].wrapping_add((v >> 40) % 64);
            let len = [0u32, 1, 16, 17, 512, 4096, u32::MAX][(v >> 8) as usize % 7];
            let flags = ((v >> 16) & 7) as u16;
            let nxt = ((v >> 24) % 20) as u16;
            r.q.set_desc(&r.mem, i, addr, len, flags, nxt);
        }
        if round % 3 == 0 {
            r.header((next() % 10) as u32, next() % (SECTORS + 2));
        }
        for _ in 0..(next() % 4) {
            r.q.publish(&r.mem, (next() % 20) as u16);
        }
        r.t.process_queue(0);
        if r.t.device_status() & status::NEEDS_RESET != 0 {
            // An out-of-range head index is a driver bug: the device asks for a reset.
            let mem = r.mem.clone();
            r.q = TestQueue::new(QUEUE_SIZE, 0x1000);
            mem.write_slice(&[0u8; 0x2000], GuestAddress(0x1000))
                .unwrap();
            negotiate(&mut r.t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC);
            r.q.install(&mut r.t, 0);
            driver_ok(&mut r.t);
            assert!(r.t.is_activated());
        }
    }
    // The image is still readable afterwards.
    let (_, st) = r.request(T_IN, 0, 512, true);
    assert_eq!(st, S_OK);
}

#[test]
fn pure_request_path_with_in_memory_disk() {
    let mem = guest_memory();
    let mut tq = TestQueue::new(16, 0x1000);
    let mut disk = Disk::new(
        Cursor::new(pattern(4096)),
        8,
        false,
        *b"in-memory-disk-00000",
    );
    let mut q = Queue::new(16).unwrap();
    q.set_desc_table_address(Some(tq.desc as u32), Some(0));
    q.set_avail_ring_address(Some(tq.avail as u32), Some(0));
    q.set_used_ring_address(Some(tq.used as u32), Some(0));
    q.set_ready(true);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&7u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    tq.add_chain(
        &mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    let chain = q.iter(&mem).unwrap().next().unwrap();
    assert_eq!(disk.handle_chain(&mem, chain), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(disk.backend.get_ref()[7 * 512..], [0x5a; 512]);
    assert_eq!(disk.backend.get_ref()[..7 * 512], pattern(4096)[..7 * 512]);
}

#[test]
fn open_errors_name_the_file() {
    let missing = std::env::temp_dir().join("kiln-blk-test-does-not-exist.img");
    let err = Block::new(&missing, false).err().unwrap();
    assert!(
        err.to_string().contains("kiln-blk-test-does-not-exist.img"),
        "{err}"
    );
    let (small, _) = temp_image(100);
    let err = Block::new(&small.0, true).err().unwrap();
    assert!(matches!(err, BlockError::Empty { .. }), "{err}");
}
