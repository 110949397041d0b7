//! virtio-mmio transport and virtio devices.
//!
//! Layout, following the rust-vmm split of every device into three parts:
//! - [`mmio`]: the virtio-mmio (version 2) register file. It owns the virtqueue configuration,
//!   the feature negotiation and the status state machine, and forwards queue notifications and
//!   host events to the device once the driver has set DRIVER_OK.
//! - [`chain`]: validation of descriptor chains shared by all devices (loops, direction order,
//!   guest-memory bounds).
//! - [`block`] and [`vsock`]: the devices. Each keeps its guest-facing request processing free of
//!   file descriptors so it can be unit-tested with a plain `GuestMemoryMmap`.
//!
//! Nothing here talks to KVM: the VMM registers [`MmioTransport::queue_evts`] as ioeventfds and
//! [`MmioTransport::irq_evt`] as an irqfd, and calls [`MmioTransport::process_queue`] from its
//! event loop.

pub mod block;
pub mod chain;
pub mod mmio;
#[cfg(test)]
mod test_driver;
pub mod vsock;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockError, DriveConfig, DriveError, MAX_DRIVES};
pub use mmio::{MmioTransport, MMIO_LEN};
pub use vsock::{Vsock, VsockError};

/// Feature bit: the device conforms to virtio 1.0 or later (required by this transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: `used_event`/`avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// InterruptStatus bit: the device used a buffer in at least one queue.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device configuration changed (or the device needs a reset).
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Creating an eventfd for a queue notification or the interrupt failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] io::Error),
    /// The device advertises no queues or more than the transport supports.
    #[error("device offers {0} queues; between 1 and {max} are supported", max = MAX_QUEUES)]
    QueueCount(usize),
    /// A queue maximum size is zero, not a power of two, or above 32768.
    #[error("queue {index} has invalid maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The rejected size.
        size: u16,
    },
    /// Reading or writing a virtqueue's rings in guest memory failed.
    #[error("virtqueue {queue} is broken")]
    Queue {
        /// Queue index.
        queue: usize,
        /// What the virtqueue crate reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device could not start with the negotiated configuration.
    #[error("device activation failed: {0}")]
    Activate(String),
}

/// Most queues a device may have on this transport.
pub const MAX_QUEUES: usize = 8;

/// The interrupt line of one virtio-mmio device: the InterruptStatus register plus the irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    evt: EventFd,
}

impl Interrupt {
    fn new() -> Result<Self, VirtioError> {
        Ok(Self {
            status: Arc::new(AtomicU32::new(0)),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
        })
    }

    /// Sets `bit` in InterruptStatus and raises the interrupt line.
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("virtio: failed to signal the irqfd: {e}");
        }
    }

    /// Tells the driver that buffers were placed in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the configuration space (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    /// Current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd the VMM registers as a KVM irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device needs to touch the guest: memory, its queues and its interrupt line.
///
/// Lent by the transport for the duration of one call; the transport keeps ownership of the
/// queues so that a reset can always rebuild them.
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, indexed as in [`VirtioDevice::queue_max_sizes`].
    pub queues: &'a mut [Queue],
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
}

/// Whether a device finished the work it was given or stopped at its per-call budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Nothing left to do until the next notification.
    Done,
    /// The budget was used up with work left: the transport re-arms the queue notification so
    /// that the event loop comes back after serving other devices.
    MoreWork,
}

/// A virtio device behind a transport.
///
/// Every method is called with guest-controlled values and must never panic on them.
pub trait VirtioDevice: Send {
    /// virtio device ID (2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers, including [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Maximum size of each queue; the slice length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space. Ignored by default (read-only config).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }
    /// Starts the device after the driver set DRIVER_OK with `acked_features`.
    fn activate(&mut self, acked_features: u64, ctx: QueueContext<'_>) -> Result<(), VirtioError>;
    /// Handles a notification of queue `index` (always a valid index).
    fn process_queue(
        &mut self,
        index: usize,
        ctx: QueueContext<'_>,
    ) -> Result<Processed, VirtioError>;
    /// Returns the device to its initial state (driver wrote 0 to Status).
    fn reset(&mut self);
    /// A single stable fd the VMM should poll for the device's host-side events.
    fn host_event_fd(&self) -> Option<RawFd> {
        None
    }
    /// Handles readiness of [`VirtioDevice::host_event_fd`]. `ctx` is `None` while the driver
    /// has not activated the device. [`Processed::MoreWork`] makes the transport re-arm every
    /// queue notification so the device is called again through [`VirtioDevice::process_queue`].
    fn process_host_event(
        &mut self,
        ctx: Option<QueueContext<'_>>,
    ) -> Result<Processed, VirtioError> {
        let _ = ctx;
        Ok(Processed::Done)
    }
}

/// Copies `src` (a little-endian config structure) at `offset` into `data`, zero-filling
/// whatever lies outside `src`.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_are_bounded() {
        let src = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&src, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&src, 4, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&src, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG_CHANGE);
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
    }
}
