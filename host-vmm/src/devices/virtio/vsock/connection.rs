//! One vsock stream connection between a guest socket and a host stream: state machine and
//! credit accounting (virtio 1.2, 5.10.6.3).
//!
//! Pure with respect to the event machinery: it reads and writes a [`HostStream`] (a unix socket
//! in the VMM, an in-memory fake in tests) but knows nothing about epoll or virtqueues. The muxer
//! tells it when the host stream became readable or writable, hands it guest packets, and asks it
//! for the next packet to put in the guest's rx queue.
//!
//! Credit, both ways:
//! - towards the guest we never send more than `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)` bytes;
//! - towards the host we advertise [`CONN_BUF_ALLOC`] and count in `fwd_cnt` the guest bytes
//!   written to the host stream. Guest data that the host stream cannot take yet waits in a
//!   buffer that the guest's credit bounds; a guest that overruns its credit is reset.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::handshake::ok_line;
use super::packet::{
    op, Header, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise to the guest per connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes after which we tell the guest about its new credit unprompted.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// The host end of a connection.
pub trait HostStream: Read + Write {
    /// Shuts down the writing half (the host process reads EOF).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A host process asked for this connection; waiting for the guest's RESPONSE.
    LocalInit,
    /// Both ends connected.
    Established,
    /// Finished; removed once a pending RST (if any) reached the guest.
    Closed,
}

/// Control packets owed to the guest.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    rst: bool,
    credit_update: bool,
}

impl Pending {
    fn any(&self) -> bool {
        self.request || self.response || self.rst || self.credit_update
    }
}

/// A vsock stream connection.
pub struct Connection<S> {
    stream: S,
    state: ConnState,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    pending: Pending,
    /// Handshake reply (`OK <port>\n`) not yet written to the host; not guest data.
    to_host_prefix: Vec<u8>,
    /// Guest bytes the host stream has not taken yet.
    to_host: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    host_write_shut: bool,
    peer_shutdown: u32,
}

impl<S: HostStream> Connection<S> {
    fn new(stream: S, state: ConnState, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            pending: Pending::default(),
            to_host_prefix: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            peer_shutdown: 0,
        }
    }

    /// A connection a host process asked for with `CONNECT <peer_port>`: owes the guest a REQUEST.
    pub fn new_local(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            stream,
            ConnState::LocalInit,
            guest_cid,
            local_port,
            peer_port,
        );
        c.pending.request = true;
        c
    }

    /// A connection the guest asked for with `req` and the host accepted: owes a RESPONSE.
    pub fn new_peer(stream: S, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(
            stream,
            ConnState::Established,
            guest_cid,
            req.dst_port,
            req.src_port,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c.pending.response = true;
        c.host_readable = true;
        c
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Host-side port (the guest's destination port for guest-initiated connections).
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host stream.
    pub fn buffered_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Closed and nothing left to tell the guest: the muxer may drop it.
    pub fn is_finished(&self) -> bool {
        self.state == ConnState::Closed && !self.pending.rst
    }

    /// Aborts the connection: the guest gets an RST, the host stream is dropped with us.
    pub fn reset(&mut self) {
        if self.state != ConnState::Closed {
            self.state = ConnState::Closed;
            self.pending = Pending {
                rst: true,
                ..Pending::default()
            };
        }
        self.to_host.clear();
        self.to_host_prefix.clear();
    }

    fn close_quietly(&mut self) {
        self.state = ConnState::Closed;
        self.pending = Pending::default();
        self.to_host.clear();
    }

    /// Handles a packet from the guest addressed to this connection. `payload` has already been
    /// checked against `hdr.len`.
    pub fn recv_from_guest(&mut self, hdr: &Header, payload: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match (self.state, hdr.op) {
            (ConnState::Closed, _) => {}
            (_, op::RST) => self.close_quietly(),
            (ConnState::LocalInit, op::RESPONSE) => {
                self.state = ConnState::Established;
                self.to_host_prefix = ok_line(self.local_port);
                // Data the host wrote before the guest answered is waiting in the socket.
                self.host_readable = true;
                self.flush_to_host();
            }
            (ConnState::LocalInit, _) => self.reset(),
            (ConnState::Established, op::RW) => self.recv_data(payload),
            // Credit came with the header; `credit_requested` is cleared below only if the
            // update actually grants some (an update without credit must not trigger another
            // CREDIT_REQUEST at once: a paused reader would be asked again and again).
            (ConnState::Established, op::CREDIT_UPDATE) => {}
            (ConnState::Established, op::CREDIT_REQUEST) => self.pending.credit_update = true,
            (ConnState::Established, op::SHUTDOWN) => {
                self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                self.after_flush();
            }
            (ConnState::Established, _) => self.reset(),
        }
        // Fresh credit from the guest may unblock data waiting on the host side.
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    fn recv_data(&mut self, payload: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            log::debug!("vsock: data after the guest's SHUTDOWN(SEND); resetting");
            self.reset();
            return;
        }
        if self.to_host.len() + payload.len() > CONN_BUF_ALLOC as usize {
            log::warn!(
                "vsock: guest overran its credit on port {}; resetting",
                self.local_port
            );
            self.reset();
            return;
        }
        let mut written = 0;
        if self.to_host.is_empty() && self.to_host_prefix.is_empty() {
            match write_some(&mut self.stream, payload) {
                Ok(n) => written = n,
                Err(e) => {
                    log::debug!("vsock: host stream write failed: {e}");
                    self.reset();
                    return;
                }
            }
        }
        self.count_forwarded(written);
        self.to_host.extend(&payload[written..]);
    }

    fn count_forwarded(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// Writes buffered data to the host stream (it became writable, or new data arrived).
    pub fn flush_to_host(&mut self) {
        if self.state == ConnState::Closed {
            return;
        }
        while !self.to_host_prefix.is_empty() {
            match write_some(&mut self.stream, &self.to_host_prefix) {
                Ok(0) => return,
                Ok(n) => {
                    self.to_host_prefix.drain(..n);
                }
                Err(e) => {
                    log::debug!("vsock: handshake reply failed: {e}");
                    self.reset();
                    return;
                }
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match write_some(&mut self.stream, front) {
                Ok(0) => return,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.count_forwarded(n);
                }
                Err(e) => {
                    log::debug!("vsock: host stream write failed: {e}");
                    self.reset();
                    return;
                }
            }
        }
        if self.to_host.capacity() > CONN_BUF_ALLOC as usize / 4 {
            self.to_host.shrink_to_fit();
        }
        self.after_flush();
    }

    /// Acts on the guest's SHUTDOWN flags once everything it sent reached the host.
    fn after_flush(&mut self) {
        if self.state != ConnState::Established || !self.to_host.is_empty() {
            return;
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed its socket and waits for our RST (Linux does).
            self.reset();
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown_write() {
                log::debug!("vsock: host stream shutdown failed: {e}");
            }
        }
    }

    /// Readiness of the host stream reported by epoll.
    pub fn on_host_event(&mut self, readable: bool, writable: bool, hang_up: bool, error: bool) {
        if error {
            self.reset();
            return;
        }
        if readable || hang_up {
            self.host_readable = true;
        }
        if hang_up {
            self.host_hup = true;
        }
        if writable {
            self.flush_to_host();
        }
    }

    /// Whether [`Connection::next_packet`] has something to produce.
    pub fn has_rx(&self) -> bool {
        if self.pending.any() {
            return true;
        }
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && (self.peer_credit() > 0 || !self.credit_requested)
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, with up to `buf.len()` payload bytes read into `buf`
    /// from the host stream. `None` when there is nothing to send right now.
    pub fn next_packet(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if self.pending.rst {
            self.pending.rst = false;
            return Some((self.header(op::RST, 0, 0), 0));
        }
        if self.pending.request {
            self.pending.request = false;
            return Some((self.header(op::REQUEST, 0, 0), 0));
        }
        if self.pending.response {
            self.pending.response = false;
            return Some((self.header(op::RESPONSE, 0, 0), 0));
        }
        if self.pending.credit_update {
            self.pending.credit_update = false;
            return Some((self.header(op::CREDIT_UPDATE, 0, 0), 0));
        }
        if !self.has_rx() {
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            self.credit_requested = true;
            return Some((self.header(op::CREDIT_REQUEST, 0, 0), 0));
        }
        let max = buf.len().min(credit);
        if max == 0 {
            return None;
        }
        match self.stream.read(&mut buf[..max]) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                let flags = if self.host_hup {
                    SHUTDOWN_BOTH
                } else {
                    SHUTDOWN_SEND
                };
                Some((self.header(op::SHUTDOWN, 0, flags), 0))
            }
            Ok(n) => {
                self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                Some((self.header(op::RW, n as u32, 0), n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                log::debug!("vsock: host stream read failed: {e}");
                self.reset();
                self.pending.rst = false;
                Some((self.header(op::RST, 0, 0), 0))
            }
        }
    }
}

/// Writes what the stream takes now: `Ok(0)` when it would block.
fn write_some<S: Write>(stream: &mut S, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
