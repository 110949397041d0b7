//! Validation of guest descriptor chains before a device touches them.
//!
//! The `virtio-queue` iterator stops quietly when a chain loops (its time-to-live runs out), when
//! a `next` index is out of range, or when a descriptor cannot be read; a device would then see a
//! silently truncated request. [`validate`] walks a chain once and turns each of those cases into
//! a [`ChainError`], and also checks that device-readable descriptors come before device-writable
//! ones and that every buffer lies inside guest memory. It owns no state and never allocates in
//! proportion to guest values.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Chain type used by all devices: borrowed guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head descriptor (or its indirect table) could not be read.
    #[error("descriptor chain is empty or its head is unreadable")]
    Empty,
    /// The chain loops, names an out-of-range `next`, or runs past the descriptor table.
    #[error("descriptor chain is not terminated (loop or bad next index)")]
    Unterminated,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
}

/// Shape of a validated chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainInfo {
    /// Number of descriptors (after following an indirect table).
    pub descriptors: u32,
    /// Total bytes the device may read.
    pub readable_len: u64,
    /// Total bytes the device may write.
    pub writable_len: u64,
}

/// Checks `chain` without consuming it. See the module documentation for the rules.
pub fn validate(chain: &Chain<'_>) -> Result<ChainInfo, ChainError> {
    let mem = chain.memory();
    let mut info = ChainInfo {
        descriptors: 0,
        readable_len: 0,
        writable_len: 0,
    };
    let mut last_has_next = false;
    let mut seen_writable = false;
    for desc in chain.clone() {
        info.descriptors += 1;
        let len = desc.len();
        if len > 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len,
            });
        }
        if desc.is_write_only() {
            seen_writable = true;
            info.writable_len += u64::from(len);
        } else {
            if seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            info.readable_len += u64::from(len);
        }
        last_has_next = desc.has_next();
    }
    if info.descriptors == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    Ok(info)
}

/// Address of the last byte of the chain's last descriptor if that descriptor is device-writable
/// and non-empty: where a block device puts its status byte. `None` for malformed chains whose
/// end cannot be trusted.
pub fn trailing_status_addr(chain: &Chain<'_>) -> Option<GuestAddress> {
    let mut last = None;
    let mut has_next = false;
    for desc in chain.clone() {
        last = Some(desc);
        has_next = desc.has_next();
    }
    let last = last?;
    if has_next || !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    GuestMemoryBackend::check_range(chain.memory(), addr, 1).then_some(addr)
}
