//! Register-level tests of the virtio-mmio transport with a recording fake device.

use std::sync::{Arc, Mutex};

use super::*;
use crate::devices::virtio::test_driver::*;
use crate::devices::virtio::{INT_CONFIG_CHANGE, INT_USED_RING};

#[derive(Default)]
struct Record {
    activated: Option<u64>,
    processed: Vec<usize>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    fail_activate: bool,
    next_result: Option<Result<Processed, ()>>,
}

struct FakeDevice {
    rec: Arc<Mutex<Record>>,
    sizes: Vec<u16>,
}

const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 | VIRTIO_RING_F_EVENT_IDX;

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, acked: u64, ctx: QueueContext<'_>) -> Result<(), VirtioError> {
        let mut r = self.rec.lock().unwrap();
        assert_eq!(ctx.queues.len(), self.sizes.len());
        if r.fail_activate {
            return Err(VirtioError::Activate("test".into()));
        }
        r.activated = Some(acked);
        Ok(())
    }
    fn process_queue(
        &mut self,
        index: usize,
        ctx: QueueContext<'_>,
    ) -> Result<Processed, VirtioError> {
        let mut r = self.rec.lock().unwrap();
        r.processed.push(index);
        ctx.interrupt.signal_used_queue();
        match r.next_result.take() {
            None | Some(Ok(Processed::Done)) => Ok(Processed::Done),
            Some(Ok(Processed::MoreWork)) => Ok(Processed::MoreWork),
            Some(Err(())) => Err(VirtioError::Activate("broken".into())),
        }
    }
    fn reset(&mut self) {
        self.rec.lock().unwrap().resets += 1;
    }
}

fn transport() -> (MmioTransport, Arc<Mutex<Record>>, GuestMemoryMmap) {
    let rec = Arc::new(Mutex::new(Record::default()));
    let mem = guest_memory();
    let dev = FakeDevice {
        rec: rec.clone(),
        sizes: vec![16, 8],
    };
    (
        MmioTransport::new(mem.clone(), Box::new(dev)).unwrap(),
        rec,
        mem,
    )
}

fn start(t: &mut MmioTransport) -> (TestQueue, TestQueue) {
    assert_ne!(negotiate(t, VIRTIO_F_VERSION_1) & FEATURES_OK, 0);
    let q0 = TestQueue::new(16, 0x1000);
    let q1 = TestQueue::new(8, 0x2000);
    q0.install(t, 0);
    q1.install(t, 1);
    driver_ok(t);
    assert!(t.is_activated());
    (q0, q1)
}

#[test]
fn identification_registers() {
    let (mut t, _, _) = transport();
    assert_eq!(read_reg(&mut t, 0x0), 0x7472_6976);
    assert_eq!(read_reg(&mut t, 0x4), 2);
    assert_eq!(read_reg(&mut t, 0x8), 42);
    assert_eq!(read_reg(&mut t, 0xc), VENDOR_ID);
    assert_eq!(read_reg(&mut t, 0xfc), 0);
    assert_eq!(read_reg(&mut t, 0xb0), u32::MAX, "no shared memory");
    let mut cfg = [0u8; 4];
    t.read(0x102, &mut cfg);
    assert_eq!(cfg, [3, 4, 5, 6]);
    // Narrow or unaligned register reads return zero.
    let mut two = [0xffu8; 2];
    t.read(0x0, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xffu8; 4];
    t.read(0x2, &mut four);
    assert_eq!(four, [0; 4]);
}

#[test]
fn feature_banks_and_negotiation() {
    let (mut t, _, _) = transport();
    write_reg(&mut t, 0x14, 0);
    assert_eq!(read_reg(&mut t, 0x10), FAKE_FEATURES as u32);
    write_reg(&mut t, 0x14, 1);
    assert_eq!(read_reg(&mut t, 0x10), (FAKE_FEATURES >> 32) as u32);
    write_reg(&mut t, 0x14, 7);
    assert_eq!(read_reg(&mut t, 0x10), 0);

    // An unoffered feature is refused: FEATURES_OK does not stick.
    assert_eq!(
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 3) & FEATURES_OK,
        0
    );
    // A legacy driver (no VERSION_1) is refused too.
    assert_eq!(negotiate(&mut t, 1) & FEATURES_OK, 0);
    // A bit in a bank that does not exist.
    write_reg(&mut t, 0x70, 0);
    write_reg(&mut t, 0x70, ACKNOWLEDGE);
    write_reg(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    write_reg(&mut t, 0x24, 1);
    write_reg(&mut t, 0x20, 1);
    write_reg(&mut t, 0x24, 2);
    write_reg(&mut t, 0x20, 1);
    write_reg(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(read_reg(&mut t, 0x70) & FEATURES_OK, 0);
    // The offered set is accepted.
    assert_ne!(negotiate(&mut t, FAKE_FEATURES) & FEATURES_OK, 0);
    // Features can no longer change after FEATURES_OK.
    write_reg(&mut t, 0x24, 0);
    write_reg(&mut t, 0x20, 0xffff_ffff);
    assert!(t.features_acceptable());
}

#[test]
fn status_transitions_must_follow_order() {
    let (mut t, rec, _) = transport();
    // DRIVER_OK straight away does nothing.
    write_reg(&mut t, 0x70, DRIVER_OK);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert!(!t.is_activated());
    // DRIVER without ACKNOWLEDGE is refused.
    write_reg(&mut t, 0x70, DRIVER);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    write_reg(&mut t, 0x70, ACKNOWLEDGE);
    // Clearing a bit without reset is refused.
    write_reg(&mut t, 0x70, DRIVER);
    assert_eq!(read_reg(&mut t, 0x70), ACKNOWLEDGE);
    // DRIVER_OK before FEATURES_OK is refused.
    write_reg(&mut t, 0x70, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(read_reg(&mut t, 0x70), ACKNOWLEDGE | DRIVER);
    assert!(rec.lock().unwrap().activated.is_none());
}

#[test]
fn queue_setup_and_bad_queue_sel() {
    let (mut t, _, _) = transport();
    // Queue registers before FEATURES_OK are ignored.
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x44, 1);
    assert_eq!(read_reg(&mut t, 0x44), 0);

    negotiate(&mut t, VIRTIO_F_VERSION_1);
    assert_eq!(read_reg(&mut t, 0x34), 16);
    write_reg(&mut t, 0x30, 1);
    assert_eq!(read_reg(&mut t, 0x34), 8);
    for sel in [2, 8, u32::MAX] {
        write_reg(&mut t, 0x30, sel);
        assert_eq!(read_reg(&mut t, 0x34), 0);
        assert_eq!(read_reg(&mut t, 0x44), 0);
        // Writes to a nonexistent queue are ignored.
        for reg in [0x38, 0x44, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4] {
            write_reg(&mut t, reg, 1);
        }
    }
    // A size above the maximum or not a power of two does not stick.
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x38, 17);
    write_reg(&mut t, 0x38, 0x1_0000);
    write_reg(&mut t, 0x38, 12);
    assert_eq!(t.queues[0].size(), 16);
    write_reg(&mut t, 0x38, 4);
    assert_eq!(t.queues[0].size(), 4);
    TestQueue::new(16, 0x1000).install(&mut t, 0);
    assert_eq!(read_reg(&mut t, 0x44), 1);
    // A ready queue cannot be moved.
    write_reg(&mut t, 0x80, 0x5000);
    assert_eq!(t.queues[0].desc_table(), 0x1000);
}

#[test]
fn activation_and_queue_processing() {
    let (mut t, rec, _) = transport();
    start(&mut t);
    assert_eq!(rec.lock().unwrap().activated, Some(VIRTIO_F_VERSION_1));
    assert_ne!(read_reg(&mut t, 0x70) & DRIVER_OK, 0);
    t.process_queue(1);
    t.process_queue(2);
    t.process_queue(usize::MAX);
    assert_eq!(rec.lock().unwrap().processed, vec![1]);
    assert_eq!(read_reg(&mut t, 0x60), INT_USED_RING);
    assert_eq!(t.irq_evt().read().unwrap(), 1);
    write_reg(&mut t, 0x64, INT_USED_RING);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    // Queue registers are frozen after DRIVER_OK.
    write_reg(&mut t, 0x30, 0);
    write_reg(&mut t, 0x44, 0);
    assert_eq!(read_reg(&mut t, 0x44), 1);
}

#[test]
fn no_processing_before_driver_ok() {
    let (mut t, rec, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    t.process_queue(0);
    t.process_host_event();
    assert!(rec.lock().unwrap().processed.is_empty());
}

#[test]
fn notify_register_signals_eventfd() {
    let (mut t, _, _) = transport();
    write_reg(&mut t, 0x50, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert!(t.queue_evts()[0].read().is_err(), "queue 0 not kicked");
    write_reg(&mut t, 0x50, 99);
}

#[test]
fn more_work_rearms_and_errors_need_reset() {
    let (mut t, rec, _) = transport();
    start(&mut t);
    rec.lock().unwrap().next_result = Some(Ok(Processed::MoreWork));
    t.process_queue(0);
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    rec.lock().unwrap().next_result = Some(Err(()));
    t.process_queue(0);
    assert_ne!(read_reg(&mut t, 0x70) & NEEDS_RESET, 0);
    assert_ne!(read_reg(&mut t, 0x60) & INT_CONFIG_CHANGE, 0);
    // A broken device is not called again until reset.
    t.process_queue(0);
    assert_eq!(rec.lock().unwrap().processed.len(), 2);
    write_reg(&mut t, 0x70, 0);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    start(&mut t);
    t.process_queue(0);
    assert_eq!(rec.lock().unwrap().processed.len(), 3);
}

#[test]
fn invalid_queue_layout_is_not_activated() {
    let (mut t, rec, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    // Used ring far outside guest memory.
    let mut q = TestQueue::new(16, 0x1000);
    q.used = 0x10_0000_0000;
    q.install(&mut t, 0);
    driver_ok(&mut t);
    assert!(!t.is_activated());
    assert!(rec.lock().unwrap().activated.is_none());
    assert_ne!(read_reg(&mut t, 0x70) & NEEDS_RESET, 0);
    t.process_queue(0);
    assert!(rec.lock().unwrap().processed.is_empty());
}

#[test]
fn failed_activation_needs_reset() {
    let (mut t, rec, _) = transport();
    rec.lock().unwrap().fail_activate = true;
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    driver_ok(&mut t);
    assert!(!t.is_activated());
    assert_ne!(read_reg(&mut t, 0x70) & NEEDS_RESET, 0);
}

#[test]
fn reset_returns_to_initial_state() {
    let (mut t, rec, _) = transport();
    start(&mut t);
    t.process_queue(0);
    let resets = rec.lock().unwrap().resets;
    write_reg(&mut t, 0x70, 0);
    assert_eq!(rec.lock().unwrap().resets, resets + 1);
    assert!(!t.is_activated());
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    write_reg(&mut t, 0x30, 0);
    assert_eq!(read_reg(&mut t, 0x44), 0);
    assert_eq!(t.queues[0].size(), 16);
    assert_eq!(t.acked_features, 0);
    t.process_queue(0);
    assert_eq!(rec.lock().unwrap().processed, vec![0]);
}

#[test]
fn config_writes_reach_device() {
    let (mut t, rec, _) = transport();
    t.write(0x100 + 3, &[7, 8]);
    assert_eq!(rec.lock().unwrap().config_writes, vec![(3, vec![7, 8])]);
}

#[test]
fn odd_accesses_never_panic() {
    let (mut t, _, _) = transport();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let r = next();
        let offset = (r % 0x1100) & !(if r & 0x10000 != 0 { 3 } else { 0 });
        let len = [0usize, 1, 2, 3, 4, 8][(r >> 20) as usize % 6];
        let value = next();
        if r & 1 == 0 {
            let mut buf = vec![0u8; len];
            t.read(offset, &mut buf);
        } else {
            let bytes = value.to_le_bytes();
            // Bias writes towards the status and queue registers.
            let offset = if r & 2 != 0 {
                [0x70, 0x30, 0x38, 0x44, 0x20, 0x24][(r >> 8) as usize % 6]
            } else {
                offset
            };
            t.write(offset, &bytes[..len]);
        }
        let q = (next() % 4) as usize;
        t.process_queue(q);
    }
}
