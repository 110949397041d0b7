//! virtio-blk request processing: parse one descriptor chain, run it against a backing store,
//! write the status byte.
//!
//! Pure with respect to the host: it sees guest memory and a [`DiskBackend`] (anything
//! `Read + Write + Seek` that can sync), never a file descriptor, so tests use an in-memory disk.
//! Every sector range is checked against the capacity with checked arithmetic; data moves through
//! a bounce buffer of fixed size, never one sized by the guest.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};

use virtio_queue::{Reader, Writer};

use crate::devices::virtio::chain::{self, Chain};
use vm_memory::{Bytes, GuestMemoryMmap};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Size of the request header (type, reserved, sector).
const HEADER_LEN: usize = 16;
/// Bytes moved per backend call.
pub const BOUNCE_LEN: usize = 64 * 1024;

/// Request types (virtio 1.2, 5.2.6).
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the write cache.
pub const T_FLUSH: u32 = 4;
/// Device identifier.
pub const T_GET_ID: u32 = 8;

/// Status values.
pub const S_OK: u8 = 0;
/// I/O error (also: bad request).
pub const S_IOERR: u8 = 1;
/// Unsupported request type.
pub const S_UNSUPP: u8 = 2;

/// Backing store of a block device.
pub trait DiskBackend: Read + Write + Seek {
    /// Makes written data durable (fdatasync for files).
    fn sync_data(&mut self) -> io::Result<()>;
}

impl DiskBackend for File {
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
}

impl DiskBackend for Cursor<Vec<u8>> {
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A disk as the guest sees it.
pub struct Disk<B> {
    /// Where the bytes live.
    pub backend: B,
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes are refused with IOERR.
    pub read_only: bool,
    /// GET_ID answer (zero-padded).
    pub id: [u8; ID_LEN],
    bounce: Vec<u8>,
}

impl<B: DiskBackend> Disk<B> {
    /// A disk of `capacity_sectors` over `backend`.
    pub fn new(backend: B, capacity_sectors: u64, read_only: bool, id: [u8; ID_LEN]) -> Self {
        Self {
            backend,
            capacity_sectors,
            read_only,
            id,
            bounce: vec![0; BOUNCE_LEN],
        }
    }

    /// Runs the request in `chain` (whose memory is `mem`) and returns the number of bytes written into guest buffers
    /// (the used-ring length). Never panics; a malformed request gets IOERR when it has a usable
    /// status byte and is otherwise only returned to the driver.
    pub fn handle_chain(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let info = match chain::validate(&chain) {
            Ok(info) => info,
            Err(e) => {
                log::debug!("virtio-blk: rejected chain {}: {e}", chain.head_index());
                return match chain::trailing_status_addr(&chain) {
                    Some(addr) if mem.write_obj(S_IOERR, addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        if info.writable_len == 0 {
            log::debug!("virtio-blk: request without a status byte");
            return 0;
        }
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            // validate() checked every buffer, so this is not expected; still no panic.
            return 0;
        };
        let data_len = writer.available_bytes() - 1;
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let status = self.execute(&mut reader, &mut writer);
        let data_written = writer.bytes_written();
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    }

    fn execute(&mut self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> u8 {
        let mut header = [0u8; HEADER_LEN];
        if reader.read_exact(&mut header).is_err() {
            log::debug!("virtio-blk: request shorter than its header");
            return S_IOERR;
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let result = match req_type {
            T_IN => self.read_sectors(sector, writer),
            T_OUT => self.write_sectors(sector, reader),
            T_FLUSH => self.backend.sync_data().map_err(RequestError::Io),
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                writer.write_all(&self.id[..n]).map_err(RequestError::Io)
            }
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                return S_UNSUPP;
            }
        };
        match result {
            Ok(()) => S_OK,
            Err(e) => {
                log::debug!("virtio-blk: request type {req_type} at sector {sector}: {e}");
                S_IOERR
            }
        }
    }

    /// Byte offset of `len` bytes at `sector`, if the range is whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let len = len as u64;
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let end = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange { sector, len })?;
        if end > self.capacity_sectors {
            return Err(RequestError::OutOfRange { sector, len });
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn read_sectors(&mut self, sector: u64, writer: &mut Writer<'_>) -> Result<(), RequestError> {
        let mut remaining = writer.available_bytes();
        let offset = self.check_range(sector, remaining)?;
        self.backend
            .seek(SeekFrom::Start(offset))
            .map_err(RequestError::Io)?;
        while remaining > 0 {
            let n = remaining.min(self.bounce.len());
            self.backend
                .read_exact(&mut self.bounce[..n])
                .map_err(RequestError::Io)?;
            writer
                .write_all(&self.bounce[..n])
                .map_err(RequestError::Io)?;
            remaining -= n;
        }
        Ok(())
    }

    fn write_sectors(&mut self, sector: u64, reader: &mut Reader<'_>) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let mut remaining = reader.available_bytes();
        let offset = self.check_range(sector, remaining)?;
        self.backend
            .seek(SeekFrom::Start(offset))
            .map_err(RequestError::Io)?;
        while remaining > 0 {
            let n = remaining.min(self.bounce.len());
            reader
                .read_exact(&mut self.bounce[..n])
                .map_err(RequestError::Io)?;
            self.backend
                .write_all(&self.bounce[..n])
                .map_err(RequestError::Io)?;
            remaining -= n;
        }
        Ok(())
    }
}

/// Why a request failed (logged; the guest sees IOERR).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("{len} bytes at sector {sector} are beyond the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("backing store I/O failed")]
    Io(#[source] io::Error),
}
