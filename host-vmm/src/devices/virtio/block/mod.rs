//! virtio-blk device backed by a host file.
//!
//! Split three ways: this file opens the image and builds the configuration space (set-up), and
//! drives the request queue for the transport (event wiring); [`request`] parses and runs single
//! requests against guest memory and a [`DiskBackend`] without touching any fd.
//!
//! `--read-only` opens the image with `O_RDONLY` and offers VIRTIO_BLK_F_RO, so the image stays
//! byte-identical whatever the guest sends.

pub mod drive;
pub mod request;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use virtio_queue::{QueueOwnedT, QueueT};

pub use drive::{DriveConfig, DriveError, MAX_DRIVES};
pub use request::{Disk, DiskBackend};

use super::{
    read_config_bytes, Processed, QueueContext, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio device ID of a block device.
pub const DEVICE_TYPE_BLOCK: u32 = 2;
/// Descriptors per request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Requests served per notification before yielding to the event loop.
pub const MAX_REQUESTS_PER_CALL: usize = 128;

/// Feature: `seg_max` in config space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device supports FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Length of the configuration space we expose (capacity, size_max, seg_max, geometry, blk_size).
const CONFIG_LEN: usize = 24;

/// Errors setting up a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// Image path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The image size or identity could not be read.
    #[error("cannot read the size of disk image {}", path.display())]
    Size {
        /// Image path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than one sector.
    #[error("disk image {} is smaller than 512 bytes", path.display())]
    Empty {
        /// Image path.
        path: PathBuf,
    },
}

/// A virtio-blk device over a host file or block device.
pub struct Block {
    disk: Disk<File>,
    config: [u8; CONFIG_LEN],
    features: u64,
    queue_sizes: [u16; 1],
}

impl Block {
    /// Opens `path` (read-only when `read_only`) as the disk. A size that is not a multiple of
    /// 512 is rounded down (the tail is unreachable), as other VMMs do.
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        Self::with_serial(path, read_only, None)
    }

    /// [`Block::new`] answering GET_ID with `serial` (at most 20 bytes are used) instead of an
    /// ID derived from the file's device and inode numbers.
    pub fn with_serial(
        path: &Path,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Block, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size_err = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        // Seeking works for regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = file.metadata().map_err(size_err)?;
        let capacity_sectors = size / request::SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::Empty {
                path: path.to_owned(),
            });
        }
        if size % request::SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {} is not a multiple of 512 bytes; the last {} bytes are unused",
                path.display(),
                size % request::SECTOR_SIZE
            );
        }
        let id = match serial {
            Some(serial) => drive::serial_id(serial),
            None => disk_id(meta.dev(), meta.ino()),
        };
        Ok(Self::with_disk(Disk::new(
            file,
            capacity_sectors,
            read_only,
            id,
        )))
    }

    fn with_disk(disk: Disk<File>) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity_sectors.to_le_bytes());
        // seg_max: a request uses one descriptor each for header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        Self {
            disk,
            config,
            features,
            queue_sizes: [QUEUE_SIZE],
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; request::ID_LEN] {
        &self.disk.id
    }
}

/// A 20-byte serial derived from the image's device and inode numbers.
fn disk_id(dev: u64, ino: u64) -> [u8; request::ID_LEN] {
    let text = format!("kiln{:x}-{:x}", dev, ino);
    let mut id = [0u8; request::ID_LEN];
    let n = text.len().min(id.len());
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

fn queue_err(source: virtio_queue::Error) -> VirtioError {
    VirtioError::Queue { queue: 0, source }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _acked_features: u64, ctx: QueueContext<'_>) -> Result<(), VirtioError> {
        if !ctx.queues.first().is_some_and(|q| q.ready()) {
            return Err(VirtioError::Activate(
                "virtio-blk request queue is not ready".into(),
            ));
        }
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        ctx: QueueContext<'_>,
    ) -> Result<Processed, VirtioError> {
        let (Some(queue), 0) = (ctx.queues.first_mut(), index) else {
            return Ok(Processed::Done);
        };
        let mem = ctx.mem;
        let mut served = 0;
        let mut outcome = Processed::Done;
        'outer: loop {
            queue.disable_notification(mem).map_err(queue_err)?;
            loop {
                let next = queue.iter(mem).map_err(queue_err)?.next();
                let Some(chain) = next else { break };
                let head = chain.head_index();
                let used_len = self.disk.handle_chain(mem, chain);
                queue.add_used(mem, head, used_len).map_err(queue_err)?;
                served += 1;
                if served >= MAX_REQUESTS_PER_CALL {
                    outcome = Processed::MoreWork;
                    break 'outer;
                }
            }
            if !queue.enable_notification(mem).map_err(queue_err)? {
                break;
            }
        }
        if served > 0 && queue.needs_notification(mem).map_err(queue_err)? {
            ctx.interrupt.signal_used_queue();
        }
        Ok(outcome)
    }

    fn reset(&mut self) {
        // No in-flight state: requests complete synchronously.
    }
}
