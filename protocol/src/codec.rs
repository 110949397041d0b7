//! Frames: `u32` little-endian body length, then a bincode body of at most [`MAX_FRAME_LEN`]
//! bytes.
//!
//! bincode 1.3.3 is used with explicit options, never its global defaults: little-endian,
//! **fixed-width integers** (a `u64` is always 8 bytes, enum tags are `u32`, lengths of strings,
//! sequences and maps are `u64`), a size limit of [`MAX_FRAME_LEN`] (bincode never reads or
//! allocates past it) and trailing bytes rejected (a body is exactly one message). Fixed-width
//! integers cost a few bytes per message but make the layout obvious in hex dumps and golden
//! tests and let [`peek_request_id`] and [`peek_version`] read fields at fixed offsets from bodies
//! that do not decode.
//!
//! Two ways to read frames:
//! - [`FrameDecoder`]: push bytes from partial reads (a non-blocking event loop), take complete
//!   messages out.
//! - [`read_frame`] / [`write_frame`]: blocking, over `Read` / `Write`.
//!
//! The length is always checked against the maximum before anything is allocated for the body.

use std::io::{self, Read, Write};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::messages::ProtocolVersion;
use crate::{FRAME_HEADER_LEN, MAX_FRAME_LEN};

/// Errors of framing, encoding and decoding.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The header announced a body longer than the maximum. Nothing was allocated for it.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A complete frame whose body is not a valid message. The frame has been consumed: the
    /// stream is still in sync and the next frame can be read.
    #[error("malformed frame body")]
    Malformed(#[source] bincode::Error),
    /// A message to send that does not fit in [`MAX_FRAME_LEN`] bytes.
    #[error("message does not fit in a frame of at most {max} bytes")]
    MessageTooLarge {
        /// The limit in force.
        max: u32,
    },
    /// A message that bincode could not encode.
    #[error("could not encode message")]
    Encode(#[source] bincode::Error),
    /// The peer closed the stream at a frame boundary.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed after {got} of {expected} bytes of a frame")]
    Truncated {
        /// Bytes of the frame (header included) received.
        got: usize,
        /// Bytes of the frame (header included) expected; 4 while the header is incomplete.
        expected: usize,
    },
    /// Reading or writing the stream failed.
    #[error("I/O error on the protocol stream")]
    Io(#[source] io::Error),
}

/// The bincode options of the wire format (see the module documentation).
fn options() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_little_endian()
        .with_fixint_encoding()
        .with_limit(u64::from(MAX_FRAME_LEN))
        .reject_trailing_bytes()
}

/// Encodes `msg` as a frame body (no header).
pub fn encode_body<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    options().serialize(msg).map_err(|e| match *e {
        bincode::ErrorKind::SizeLimit => FrameError::MessageTooLarge { max: MAX_FRAME_LEN },
        _ => FrameError::Encode(e),
    })
}

/// Encodes `msg` as a complete frame: header and body.
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = encode_body(msg)?;
    let len = u32::try_from(body.len())
        .map_err(|_| FrameError::MessageTooLarge { max: MAX_FRAME_LEN })?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes one frame body. The whole body must be one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN as usize {
        return Err(FrameError::TooLarge {
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            max: MAX_FRAME_LEN,
        });
    }
    options().deserialize(body).map_err(FrameError::Malformed)
}

/// Writes `msg` as one frame with a single `write_all` (so frames written by several threads
/// through a shared lock never interleave) and flushes.
pub fn write_frame<W: Write + ?Sized, T: Serialize + ?Sized>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Reads one frame and decodes it.
///
/// On [`FrameError::Malformed`] the frame was consumed and the stream is still in sync. On
/// [`FrameError::TooLarge`] the body was left unread: the stream is out of sync and the caller
/// should send an error and close it.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let body = read_frame_body(r)?;
    decode_body(&body)
}

/// Reads one frame and returns its raw body (for callers that want to peek at it on errors).
pub fn read_frame_body<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < FRAME_HEADER_LEN {
        return Err(FrameError::Truncated {
            got,
            expected: FRAME_HEADER_LEN,
        });
    }
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // Bounded by MAX_FRAME_LEN, checked above.
    let mut body = vec![0u8; len as usize];
    let got = read_full(r, &mut body)?;
    if got < body.len() {
        return Err(FrameError::Truncated {
            got: FRAME_HEADER_LEN + got,
            expected: FRAME_HEADER_LEN + body.len(),
        });
    }
    Ok(body)
}

/// Reads until `buf` is full or end of stream; returns the number of bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads the request id of a [`crate::HostMessage::Request`] body, even one whose request does
/// not decode (an unknown variant from a newer minor version): variant tag `2u32` at offset 0,
/// id `u64` at offset 4.
pub fn peek_request_id(body: &[u8]) -> Option<u64> {
    let tag = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?);
    if tag != 2 {
        return None;
    }
    Some(u64::from_le_bytes(body.get(4..12)?.try_into().ok()?))
}

/// Reads the protocol version of a [`crate::HostMessage::Hello`] or
/// [`crate::HostMessage::Attach`] body even if the rest does not decode (a client of another
/// major version): variant tag `0u32` or `1u32` at offset 0, then `major: u16`, `minor: u16`.
/// This layout is frozen across major versions so an agent can always name the version it
/// refuses.
pub fn peek_version(body: &[u8]) -> Option<ProtocolVersion> {
    let tag = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?);
    if tag > 1 {
        return None;
    }
    Some(ProtocolVersion {
        major: u16::from_le_bytes(body.get(4..6)?.try_into().ok()?),
        minor: u16::from_le_bytes(body.get(6..8)?.try_into().ok()?),
    })
}

/// Incremental frame decoder for partial reads.
///
/// Push whatever a read returned with [`FrameDecoder::feed`], then take messages out with
/// [`FrameDecoder::next_message`] (or raw bodies with [`FrameDecoder::next_frame`]) until it
/// returns `Ok(None)`. Memory use is the bytes fed and not yet taken out: at most one partial
/// frame (header + limit) plus the last chunk fed, if the caller drains after each feed. No body
/// buffer is reserved from the announced length; bytes are only stored as they arrive.
///
/// Errors leave the decoder usable:
/// - [`FrameError::Malformed`]: the frame was consumed; the next call returns the next frame.
/// - [`FrameError::TooLarge`]: the decoder discards the announced body as it arrives (without
///   storing it) and then continues with the next frame. Callers that do not want to wait for
///   that many bytes should reply with an error and close the connection.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already consumed.
    start: usize,
    /// Bytes of an oversize body still to discard.
    skip: u64,
    max_len: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol limit [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        FrameDecoder::with_max_len(MAX_FRAME_LEN)
    }

    /// A decoder with a lower limit (values above [`MAX_FRAME_LEN`] are clamped to it).
    pub fn with_max_len(max_len: u32) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            skip: 0,
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }

    /// Appends bytes received from the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.skip > 0 {
            let n = usize::try_from(self.skip).map_or(data.len(), |s| s.min(data.len()));
            self.skip -= n as u64;
            data = &data[n..];
        }
        if data.is_empty() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True when the decoder holds part of a frame (a header or body started but not complete),
    /// or is still discarding an oversize body. End of stream in that state means the peer
    /// truncated a frame.
    pub fn has_partial_frame(&self) -> bool {
        self.buffered_len() > 0 || self.skip > 0
    }

    /// Takes the next complete frame body out, if there is one.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        Ok(self
            .next_body_range()?
            .map(|(from, to)| self.buf[from..to].to_vec()))
    }

    /// Takes the next complete frame out and decodes it, if there is one.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_body_range()? {
            None => Ok(None),
            Some((from, to)) => decode_body(&self.buf[from..to]).map(Some),
        }
    }

    /// Finds the next complete frame, marks it consumed and returns the range of its body in
    /// `buf` (valid until the next `feed`).
    fn next_body_range(&mut self) -> Result<Option<(usize, usize)>, FrameError> {
        let avail = &self.buf[self.start..];
        let Some(header) = avail.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; FRAME_HEADER_LEN];
        len_bytes.copy_from_slice(header);
        let len = u32::from_le_bytes(len_bytes);
        if len > self.max_len {
            self.start += FRAME_HEADER_LEN;
            // Discard whatever part of the body is already buffered; `feed` drops the rest.
            let buffered = self.buf.len() - self.start;
            let now = buffered.min(len as usize);
            self.start += now;
            self.skip = u64::from(len) - now as u64;
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let end = FRAME_HEADER_LEN + len as usize;
        if avail.len() < end {
            return Ok(None);
        }
        let from = self.start + FRAME_HEADER_LEN;
        self.start += end;
        Ok(Some((from, self.start)))
    }
}
