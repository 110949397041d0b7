//! virtio-vsock packet header (virtio 1.2, 5.10.6): 44 bytes, little endian.
//!
//! Pure encoding and decoding plus the checks every guest packet must pass before anything else
//! looks at it: a payload length bounded by [`MAX_PAYLOAD`] and by what the descriptor chain
//! actually holds.

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from or sent to the guest (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The only socket type supported.
pub const TYPE_STREAM: u16 = 1;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or reset.
    pub const RST: u16 = 3;
    /// Orderly shutdown of one or both directions.
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

/// Why a guest packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain holds fewer than 44 readable bytes.
    #[error("packet shorter than the {HDR_LEN}-byte header ({0} bytes)")]
    ShortHeader(usize),
    /// `len` is above [`MAX_PAYLOAD`].
    #[error("payload length {0} above the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(u32),
    /// `len` is more than the chain holds after the header.
    #[error("payload length {len} but only {available} bytes in the descriptors")]
    PayloadBeyondBuffer {
        /// Claimed length.
        len: u32,
        /// Bytes present.
        available: usize,
    },
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the header at the start of `readable` guest bytes, given how many readable bytes
    /// the chain holds in total, and checks the payload length.
    pub fn parse(readable: &[u8], chain_readable: usize) -> Result<Self, PacketError> {
        let bytes: &[u8; HDR_LEN] = readable
            .get(..HDR_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(PacketError::ShortHeader(readable.len()))?;
        let hdr = Self::from_bytes(bytes);
        if hdr.len as usize > MAX_PAYLOAD {
            return Err(PacketError::PayloadTooLarge(hdr.len));
        }
        let available = chain_readable.saturating_sub(HDR_LEN);
        if hdr.len as usize > available {
            return Err(PacketError::PayloadBeyondBuffer {
                len: hdr.len,
                available,
            });
        }
        Ok(hdr)
    }

    /// The header of a reply travelling the other way on the same connection.
    pub fn reply(&self, op: u16) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 0xffff_fff0,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        // Field offsets from the specification.
        assert_eq!(b[0], 3);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&b[24..28], &10u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &0xffff_fff0u32.to_le_bytes());
    }

    #[test]
    fn parse_checks_lengths() {
        let b = sample().to_bytes();
        assert_eq!(Header::parse(&b, HDR_LEN + 10), Ok(sample()));
        assert_eq!(
            Header::parse(&b[..43], 43),
            Err(PacketError::ShortHeader(43))
        );
        assert_eq!(
            Header::parse(&b, HDR_LEN + 9),
            Err(PacketError::PayloadBeyondBuffer {
                len: 10,
                available: 9
            })
        );
        let mut big = sample();
        big.len = u32::MAX;
        assert_eq!(
            Header::parse(&big.to_bytes(), usize::MAX),
            Err(PacketError::PayloadTooLarge(u32::MAX))
        );
        big.len = MAX_PAYLOAD as u32;
        assert!(Header::parse(&big.to_bytes(), HDR_LEN + MAX_PAYLOAD).is_ok());
    }

    #[test]
    fn reply_swaps_addresses() {
        let r = sample().reply(op::RST);
        assert_eq!((r.src_cid, r.dst_cid), (2, 3));
        assert_eq!((r.src_port, r.dst_port), (1024, 0x1234_5678));
        assert_eq!((r.op, r.len, r.type_), (op::RST, 0, TYPE_STREAM));
    }
}
