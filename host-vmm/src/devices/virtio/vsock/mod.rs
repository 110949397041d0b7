//! virtio-vsock device in userspace with a hybrid unix-socket host side (as Firecracker does).
//!
//! - [`packet`]: the 44-byte header and its checks (pure).
//! - [`handshake`]: the `CONNECT <port>\n` / `OK <port>\n` exchange (pure).
//! - [`connection`]: one connection's state machine and credit accounting (pure over a stream).
//! - [`muxer`]: unix sockets and the internal epoll fd (host side).
//! - this file: configuration (guest CID) and the virtqueue wiring: guest tx packets to the
//!   muxer, muxer packets into guest rx buffers. The event queue is accepted but unused (it only
//!   carries transport-reset events, which kiln never sends).

pub mod connection;
pub mod handshake;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::chain;
use super::{
    read_config_bytes, Processed, QueueContext, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1,
};
use muxer::VsockMuxer;
use packet::{Header, HDR_LEN, MAX_PAYLOAD};

/// virtio device ID of a socket device.
pub const DEVICE_TYPE_VSOCK: u32 = 19;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Packets moved per queue per call before yielding to the event loop.
pub const MAX_PACKETS_PER_CALL: usize = 256;

const RX: usize = 0;
const TX: usize = 1;
const NUM_QUEUES: usize = 3;

/// Errors setting up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved and the guest CID must fit Linux's 32-bit `svm_cid`.
    #[error("invalid guest CID {0}: must be between 3 and 4294967294")]
    InvalidCid(u64),
    /// The unix socket could not be created.
    #[error("cannot listen on vsock unix socket {}", path.display())]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The internal epoll set could not be set up.
    #[error("vsock epoll setup failed")]
    Epoll(#[source] io::Error),
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    muxer: VsockMuxer,
    queue_sizes: [u16; NUM_QUEUES],
    bounce: Vec<u8>,
}

enum TxStop {
    Empty,
    Budget,
    Blocked,
}

fn queue_err(queue: usize) -> impl Fn(virtio_queue::Error) -> VirtioError {
    move |source| VirtioError::Queue { queue, source }
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path` (which must not exist).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::InvalidCid(cid));
        }
        Ok(Self {
            cid,
            muxer: VsockMuxer::new(cid, uds_path)?,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            bounce: vec![0; MAX_PAYLOAD],
        })
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host-side multiplexer (diagnostics and tests).
    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// Moves guest packets from the tx queue to the muxer.
    fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        used: &mut bool,
    ) -> Result<TxStop, VirtioError> {
        for _ in 0..MAX_PACKETS_PER_CALL {
            if self.muxer.tx_blocked() {
                return Ok(TxStop::Blocked);
            }
            let next = queue.iter(mem).map_err(queue_err(TX))?.next();
            let Some(chain) = next else {
                return Ok(TxStop::Empty);
            };
            let head = chain.head_index();
            match self.read_tx_packet(mem, chain) {
                Ok((hdr, len)) => {
                    queue.add_used(mem, head, 0).map_err(queue_err(TX))?;
                    *used = true;
                    self.muxer.handle_guest_packet(&hdr, &self.bounce[..len]);
                }
                Err(e) => {
                    log::debug!("vsock: dropped tx packet: {e}");
                    queue.add_used(mem, head, 0).map_err(queue_err(TX))?;
                    *used = true;
                }
            }
        }
        Ok(TxStop::Budget)
    }

    /// Reads one tx packet: header parsed and checked, payload copied into the bounce buffer.
    fn read_tx_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: chain::Chain<'_>,
    ) -> Result<(Header, usize), TxError> {
        let info = chain::validate(&chain).map_err(TxError::Chain)?;
        let mut reader = Reader::new(mem, chain).map_err(|_| TxError::Memory)?;
        let mut raw = [0u8; HDR_LEN];
        let readable = usize::try_from(info.readable_len).unwrap_or(usize::MAX);
        let got = reader.read(&mut raw).map_err(|_| TxError::Memory)?;
        let hdr = Header::parse(&raw[..got], readable).map_err(TxError::Packet)?;
        let len = hdr.len as usize;
        reader
            .read_exact(&mut self.bounce[..len])
            .map_err(|_| TxError::Memory)?;
        Ok((hdr, len))
    }

    /// Fills guest rx buffers with whatever the muxer has to deliver.
    fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        used: &mut bool,
    ) -> Result<Processed, VirtioError> {
        for _ in 0..MAX_PACKETS_PER_CALL {
            if !self.muxer.has_rx() {
                return Ok(Processed::Done);
            }
            let next = queue.iter(mem).map_err(queue_err(RX))?.next();
            let Some(chain) = next else {
                // No buffers: the driver kicks the rx queue when it adds some.
                return Ok(Processed::Done);
            };
            let head = chain.head_index();
            let writer = chain::validate(&chain)
                .ok()
                .and_then(|_| Writer::new(mem, chain).ok())
                .filter(|w| w.available_bytes() >= HDR_LEN);
            let Some(mut writer) = writer else {
                log::debug!("vsock: unusable rx buffer {head}");
                queue.add_used(mem, head, 0).map_err(queue_err(RX))?;
                *used = true;
                continue;
            };
            let cap = (writer.available_bytes() - HDR_LEN).min(MAX_PAYLOAD);
            let Some((hdr, n)) = self.muxer.next_rx_packet(&mut self.bounce[..cap]) else {
                // Nothing after all (a stream would block): give the buffer back unused.
                queue.go_to_previous_position();
                return Ok(Processed::Done);
            };
            let written = writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(&self.bounce[..n]));
            if let Err(e) = written {
                // validate() checked the buffers; not expected.
                log::error!("vsock: writing an rx packet failed: {e}");
            }
            let len = u32::try_from(writer.bytes_written()).unwrap_or(0);
            queue.add_used(mem, head, len).map_err(queue_err(RX))?;
            *used = true;
        }
        Ok(Processed::MoreWork)
    }

    /// Runs tx then rx and signals the guest if any used ring changed.
    fn run(&mut self, ctx: QueueContext<'_>) -> Result<Processed, VirtioError> {
        let mem = ctx.mem;
        let [rxq, txq, _] = ctx.queues else {
            return Ok(Processed::Done);
        };
        let (mut rx_used, mut tx_used) = (false, false);
        let tx = self.process_tx(mem, txq, &mut tx_used)?;
        let rx = self.process_rx(mem, rxq, &mut rx_used)?;
        let mut outcome = rx;
        match tx {
            TxStop::Budget => outcome = Processed::MoreWork,
            TxStop::Blocked if !self.muxer.tx_blocked() => outcome = Processed::MoreWork,
            _ => {}
        }
        let mut notify = false;
        if tx_used {
            notify |= txq.needs_notification(mem).map_err(queue_err(TX))?;
        }
        if rx_used {
            notify |= rxq.needs_notification(mem).map_err(queue_err(RX))?;
        }
        if notify {
            ctx.interrupt.signal_used_queue();
        }
        Ok(outcome)
    }
}

#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("bad descriptor chain")]
    Chain(#[source] chain::ChainError),
    #[error("bad packet")]
    Packet(#[source] packet::PacketError),
    #[error("guest memory access failed")]
    Memory,
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _acked: u64, ctx: QueueContext<'_>) -> Result<(), VirtioError> {
        let ready = |i: usize| ctx.queues.get(i).is_some_and(|q| q.ready());
        if !ready(RX) || !ready(TX) {
            return Err(VirtioError::Activate(
                "virtio-vsock rx and tx queues must be ready".into(),
            ));
        }
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        ctx: QueueContext<'_>,
    ) -> Result<Processed, VirtioError> {
        match index {
            RX | TX => self.run(ctx),
            // Event queue: buffers are kept for events kiln never sends.
            _ => Ok(Processed::Done),
        }
    }

    fn reset(&mut self) {
        self.muxer.reset();
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_host_event(
        &mut self,
        ctx: Option<QueueContext<'_>>,
    ) -> Result<Processed, VirtioError> {
        self.muxer.process_host_events();
        match ctx {
            Some(ctx) => self.run(ctx),
            None => Ok(Processed::Done),
        }
    }
}
