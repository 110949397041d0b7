//! virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2, section 4.2.2).
//!
//! Owns the register state of one device: feature negotiation through the selector registers, the
//! configuration of each virtqueue, the device status state machine, InterruptStatus, and the
//! eventfds the VMM wires to KVM (one ioeventfd per queue on QueueNotify, one irqfd). It does no
//! request processing itself: once the driver sets DRIVER_OK it lends the queues to the device.
//!
//! Every guest access is checked: wrong sizes, unaligned offsets, unknown registers, writes in the
//! wrong status, and out-of-range queue selectors are logged and ignored, never a panic.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Interrupt, Processed, QueueContext, VirtioDevice, VirtioError, MAX_QUEUES, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;
use std::os::fd::RawFd;

/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4e4c_494b; // "KILN"

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; queues run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}
use status::*;

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    /// The driver acked a bit in a feature bank above 1, which nothing offers.
    acked_unknown_bank: bool,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`, creating one notification eventfd per queue and the interrupt eventfd.
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> Result<Self, VirtioError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(VirtioError::QueueCount(sizes.len()));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| VirtioError::QueueMaxSize { index, size })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            interrupt: Interrupt::new()?,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_bank: false,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Queue notification eventfds, indexed by queue. The VMM registers each as a KVM ioeventfd
    /// on `base + 0x50` with the queue index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd the VMM registers as a KVM irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The device's own host-side fd to poll, if it has one.
    pub fn host_event_fd(&self) -> Option<RawFd> {
        self.device.host_event_fd()
    }

    /// Whether the driver set DRIVER_OK and the device is running.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Current device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Handles a notification of queue `queue_index` (after the event loop drained its eventfd).
    /// Does nothing if the device is not running or the index is out of range.
    pub fn process_queue(&mut self, queue_index: usize) {
        if !self.running() || queue_index >= self.queues.len() {
            return;
        }
        let ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
        };
        match self.device.process_queue(queue_index, ctx) {
            Ok(Processed::Done) => {}
            Ok(Processed::MoreWork) => {
                // Come back after the event loop served everyone else.
                if let Err(e) = self.queue_evts[queue_index].write(1) {
                    log::error!("virtio: re-arming queue {queue_index} failed: {e}");
                }
            }
            Err(e) => self.device_broken(&e),
        }
    }

    /// Handles readiness of [`MmioTransport::host_event_fd`].
    pub fn process_host_event(&mut self) {
        let running = self.running();
        let ctx = running.then_some(QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
        });
        match self.device.process_host_event(ctx) {
            Ok(Processed::Done) => {}
            Ok(Processed::MoreWork) => {
                // The device stopped at its budget: come back through the queue handlers.
                for (i, evt) in self.queue_evts.iter().enumerate() {
                    if let Err(e) = evt.write(1) {
                        log::error!("virtio: re-arming queue {i} failed: {e}");
                    }
                }
            }
            Err(e) => self.device_broken(&e),
        }
    }

    fn running(&self) -> bool {
        self.activated && self.device_status & (NEEDS_RESET | FAILED) == 0
    }

    /// Marks the device as needing a reset and tells the driver (virtio 1.2, 2.1.2).
    fn device_broken(&mut self, err: &VirtioError) {
        log::error!(
            "virtio: device type {} needs a reset: {}",
            self.device.device_type(),
            error_chain(err)
        );
        self.device_status |= NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.device_status & FEATURES_OK != 0
            && self.device_status & (DRIVER_OK | FAILED | NEEDS_RESET) == 0
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        !self.acked_unknown_bank
            && self.acked_features & !offered == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            // Drop stale kicks; EAGAIN when there are none is expected.
            let _ = evt.read();
        }
        self.interrupt.ack(u32::MAX);
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_bank = false;
        self.queue_sel = 0;
        self.activated = false;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if value & old != old {
            log::warn!("virtio: status {value:#x} clears bits of {old:#x}; ignored");
            return;
        }
        let mut new = old;
        let added = value & !old;
        if added & ACKNOWLEDGE != 0 {
            new |= ACKNOWLEDGE;
        }
        if added & DRIVER != 0 && new & ACKNOWLEDGE != 0 {
            new |= DRIVER;
        }
        if added & FEATURES_OK != 0 && new & DRIVER != 0 {
            if self.features_acceptable() {
                new |= FEATURES_OK;
            } else {
                log::warn!(
                    "virtio: refusing features {:#x} (offered {:#x})",
                    self.acked_features,
                    self.device.features()
                );
            }
        }
        if added & FAILED != 0 {
            new |= FAILED;
        }
        let wants_driver_ok = added & DRIVER_OK != 0 && new & FEATURES_OK != 0;
        let refused = value & !new & !DRIVER_OK;
        if refused != 0 || (added & DRIVER_OK != 0 && !wants_driver_ok) {
            log::warn!("virtio: status write {value:#x} from {old:#x} partly refused");
        }
        self.device_status = new;
        if wants_driver_ok && new & FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                log::error!("virtio: queue {i} has an invalid layout; not starting the device");
                self.device_status |= NEEDS_RESET;
                self.interrupt.signal_config_change();
                return;
            }
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        let ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
        };
        match self.device.activate(self.acked_features, ctx) {
            Ok(()) => {
                self.device_status |= DRIVER_OK;
                self.activated = true;
            }
            Err(e) => self.device_broken(&e),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status,
            // No shared memory regions: a length of all ones means "absent".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW..=REG_QUEUE_USED_HIGH => {
                self.write_queue_register(offset, value)
            }
            REG_SHM_SEL => {}
            _ => {
                log::debug!("virtio: write {value:#x} to read-only or unknown register {offset:#x}")
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.device_status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            log::warn!(
                "virtio: driver features written in status {:#x}; ignored",
                self.device_status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => self.acked_unknown_bank |= value != 0,
        }
    }

    fn notify(&mut self, value: u32) {
        // Normally caught by the ioeventfd; this path serves VMMs without one.
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio: queue {value} notify failed: {e}");
                }
            }
            None => log::debug!("virtio: notify of nonexistent queue {value}"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            log::warn!(
                "virtio: queue register {offset:#x} written in status {:#x}; ignored",
                self.device_status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            log::warn!("virtio: queue register {offset:#x} written with bad QueueSel {sel}");
            return;
        };
        if q.ready() && offset != REG_QUEUE_READY {
            log::warn!("virtio: queue {sel} reconfigured while ready; ignored");
            return;
        }
        match offset {
            REG_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.set_size(size),
                Err(_) => log::warn!("virtio: queue {sel} size {value} too large"),
            },
            REG_QUEUE_READY => q.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!("virtio: {}-byte register read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio: {}-byte register write at {offset:#x}", data.len());
            return;
        };
        if offset % 4 != 0 {
            log::debug!("virtio: unaligned register write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// Formats an error with its sources on one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
