//! The host side of the vsock device: a unix listener at `uds_path`, the `CONNECT` handshakes of
//! host processes, unix connections to `<uds_path>_<port>` for guest-initiated connections, and
//! one internal epoll fd over all of them (what the VMM's event loop polls).
//!
//! Streams are registered edge-triggered: an event only sets a connection's readable/writable
//! flag, and the connection reads when the guest has credit and rx buffers. So the epoll fd never
//! stays ready for data we cannot deliver yet, and the VMM loop never spins. Each registration
//! carries a fresh token rather than the fd number, so a recycled fd cannot be mistaken for an
//! older stream. A timerfd in the same epoll set closes host-initiated connections the guest
//! never answered.
//!
//! It owns no virtqueue: the device hands it parsed guest packets and asks it for the next packet
//! to deliver. Memory per connection is bounded by the credit we advertise.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnState, Connection};
use super::handshake::HandshakeParser;
use super::packet::{op, Header, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// Most connections and pending handshakes at once.
pub const MAX_CONNECTIONS: usize = 256;
/// RSTs for unknown connections waiting for rx buffers before tx processing pauses.
pub const MAX_PENDING_RST: usize = 256;
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;

/// (host port, guest port).
type ConnKey = (u32, u32);

/// Host-side connection multiplexer.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: BTreeMap<ConnKey, Connection<UnixStream>>,
    /// Epoll token of each connection's stream, and the reverse.
    conn_token: HashMap<ConnKey, u64>,
    token_conn: HashMap<u64, ConnKey>,
    /// Host clients that have not finished `CONNECT <port>\n`, by epoll token.
    handshakes: HashMap<u64, (UnixStream, HandshakeParser, Instant)>,
    next_token: u64,
    pending_rst: VecDeque<Header>,
    /// Round-robin position for rx.
    last_served: Option<ConnKey>,
    next_local_port: u32,
    timer: TimerFd,
    timer_armed: bool,
    request_timeout: Duration,
    /// REQUESTs sent to the guest and not answered yet, with their deadlines.
    awaiting_response: HashMap<ConnKey, Instant>,
}

impl VsockMuxer {
    /// Binds the listener at `uds_path` (which must not exist yet) for guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        })?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new()
            .map_err(|e| VsockError::Epoll(io::Error::from_raw_os_error(e.errno())))?;
        let mux = Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: BTreeMap::new(),
            conn_token: HashMap::new(),
            token_conn: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: 0,
            pending_rst: VecDeque::new(),
            last_served: None,
            next_local_port: FIRST_LOCAL_PORT,
            timer,
            timer_armed: false,
            request_timeout: REQUEST_TIMEOUT,
            awaiting_response: HashMap::new(),
        };
        mux.listener
            .set_nonblocking(true)
            .map_err(VsockError::Epoll)?;
        mux.epoll
            .ctl(
                ControlOperation::Add,
                mux.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        mux.epoll
            .ctl(
                ControlOperation::Add,
                mux.timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(mux)
    }

    /// The epoll fd over the listener and every stream.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections (handshakes not counted).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether tx processing should pause until RSTs drain to the guest.
    pub fn tx_blocked(&self) -> bool {
        self.pending_rst.len() >= MAX_PENDING_RST
    }

    /// Drops every connection and handshake (device reset). The listener stays.
    pub fn reset(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let tokens: Vec<_> = self.handshakes.keys().copied().collect();
        for token in tokens {
            self.drop_handshake(token);
        }
        self.pending_rst.clear();
        self.last_served = None;
        self.awaiting_response.clear();
        self.disarm_timer();
    }

    /// Changes how long the guest has to answer a host-initiated REQUEST (and a host client to
    /// send its `CONNECT` line).
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    fn stream_events() -> EventSet {
        EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
    }

    /// Adds `fd` to the epoll set under a new token.
    fn watch(&mut self, fd: RawFd) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(Self::stream_events(), token),
        )?;
        Ok(token)
    }

    fn unwatch(&self, fd: RawFd) {
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            log::debug!("vsock: epoll delete of fd {fd}: {e}");
        }
    }

    fn insert(&mut self, key: ConnKey, token: u64, conn: Connection<UnixStream>) {
        self.conns.insert(key, conn);
        self.conn_token.insert(key, token);
        self.token_conn.insert(token, key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.unwatch(conn.stream().as_raw_fd());
        }
        if let Some(token) = self.conn_token.remove(&key) {
            self.token_conn.remove(&token);
        }
        self.awaiting_response.remove(&key);
    }

    fn drop_handshake(&mut self, token: u64) {
        if let Some((stream, _, _)) = self.handshakes.remove(&token) {
            self.unwatch(stream.as_raw_fd());
        }
    }

    fn remove_if_finished(&mut self, key: ConnKey) {
        if self.conns.get(&key).is_some_and(Connection::is_finished) {
            self.remove(key);
        }
    }

    fn queue_rst(&mut self, to: &Header) {
        if to.op == op::RST {
            return;
        }
        let mut rst = to.reply(op::RST);
        rst.src_cid = HOST_CID;
        rst.dst_cid = self.guest_cid;
        if self.pending_rst.len() < MAX_PENDING_RST {
            self.pending_rst.push_back(rst);
        } else {
            log::warn!("vsock: RST queue full; dropping reply");
        }
    }

    /// Handles one packet from the guest's tx queue.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            log::debug!("vsock: dropping packet from cid {}", hdr.src_cid);
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.queue_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.recv_from_guest(hdr, payload);
            if conn.state() != ConnState::LocalInit {
                self.awaiting_response.remove(&key);
            }
            self.remove_if_finished(key);
            return;
        }
        if hdr.op == op::REQUEST {
            self.connect_to_host(hdr, key);
        } else {
            self.queue_rst(hdr);
        }
    }

    /// Guest connects to host port P: a unix connection to `<uds_path>_P`.
    fn connect_to_host(&mut self, req: &Header, key: ConnKey) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            log::warn!(
                "vsock: connection limit reached; refusing port {}",
                req.dst_port
            );
            self.queue_rst(req);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", req.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.queue_rst(req);
                return;
            }
        };
        let token = match self.watch(stream.as_raw_fd()) {
            Ok(t) => t,
            Err(e) => {
                log::error!("vsock: epoll add failed: {e}");
                self.queue_rst(req);
                return;
            }
        };
        let conn = Connection::new_peer(stream, self.guest_cid, req);
        self.insert(key, token, conn);
    }

    /// Drains the internal epoll fd (without blocking) and acts on every event.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        // Bounded: the listener accepts at most MAX_CONNECTIONS, streams are edge-triggered.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let set = ev.event_set();
                let token = ev.data();
                if token == LISTENER_TOKEN {
                    self.accept_all();
                } else if token == TIMER_TOKEN {
                    self.expire_requests();
                } else if self.handshakes.contains_key(&token) {
                    self.advance_handshake(token);
                } else if let Some(&key) = self.token_conn.get(&token) {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.on_host_event(
                            set.intersects(EventSet::IN | EventSet::READ_HANG_UP),
                            set.contains(EventSet::OUT),
                            set.contains(EventSet::HANG_UP),
                            set.contains(EventSet::ERROR),
                        );
                    }
                    self.remove_if_finished(key);
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                        log::warn!("vsock: connection limit reached; closing new host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::error!("vsock: cannot make host client nonblocking: {e}");
                        continue;
                    }
                    let token = match self.watch(stream.as_raw_fd()) {
                        Ok(t) => t,
                        Err(e) => {
                            log::error!("vsock: epoll add failed: {e}");
                            continue;
                        }
                    };
                    let deadline = Instant::now() + self.request_timeout;
                    self.handshakes
                        .insert(token, (stream, HandshakeParser::new(), deadline));
                    self.arm_timer();
                    // Bytes may already be there; the edge was reported on add, but read now
                    // anyway so a client that sent everything at once is not missed.
                    self.advance_handshake(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the handshake one byte at a time, so no connection data is consumed with it.
    fn advance_handshake(&mut self, token: u64) {
        let Some((stream, parser, _)) = self.handshakes.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => {
                    self.drop_handshake(token);
                    return;
                }
                Ok(_) => match parser.push(byte[0]) {
                    Ok(None) => continue,
                    Ok(Some(port)) => break port,
                    Err(e) => {
                        log::debug!("vsock: host client handshake refused: {e}");
                        self.drop_handshake(token);
                        return;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("vsock: host client read failed: {e}");
                    self.drop_handshake(token);
                    return;
                }
            }
        };
        let Some((stream, _, _)) = self.handshakes.remove(&token) else {
            return;
        };
        let local_port = self.allocate_local_port(port);
        let conn = Connection::new_local(stream, self.guest_cid, local_port, port);
        self.insert((local_port, port), token, conn);
    }

    /// Starts the clock for a REQUEST that just went to the guest.
    fn await_response(&mut self, key: ConnKey) {
        self.awaiting_response
            .insert(key, Instant::now() + self.request_timeout);
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            let period =
                (self.request_timeout / 2).clamp(Duration::from_millis(1), Duration::from_secs(1));
            match self.timer.reset(period, Some(period)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => log::error!("vsock: arming the request timer failed: {e}"),
            }
        }
    }

    fn disarm_timer(&mut self) {
        if self.timer_armed {
            if let Err(e) = self.timer.clear() {
                log::error!("vsock: disarming the request timer failed: {e}");
            }
            self.timer_armed = false;
        }
    }

    /// Closes host-initiated connections whose REQUEST the guest left unanswered, and host
    /// clients that did not finish their `CONNECT` line, both after the request timeout: the
    /// host client sees EOF instead of waiting forever or holding a connection slot.
    fn expire_requests(&mut self) {
        if self.timer_armed {
            // Readable per epoll, so this does not block; the count is irrelevant.
            let _ = self.timer.wait();
        }
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .awaiting_response
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            log::debug!("vsock: guest did not answer REQUEST to port {}", key.1);
            self.remove(key);
        }
        let stale: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, (_, _, deadline))| *deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in stale {
            log::debug!("vsock: host client sent no CONNECT line in time");
            self.drop_handshake(token);
        }
        if self.awaiting_response.is_empty() && self.handshakes.is_empty() {
            self.disarm_timer();
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// Whether some packet is waiting for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.pending_rst.is_empty() || self.conns.values().any(Connection::has_rx)
    }

    /// The next packet for the guest, its payload read into `buf` (at most `buf.len()` bytes).
    /// Connections are served round-robin.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(rst) = self.pending_rst.pop_front() {
            return Some((rst, 0));
        }
        let ready = |(k, c): (&ConnKey, &Connection<UnixStream>)| c.has_rx().then_some(*k);
        let candidates: Vec<ConnKey> = match self.last_served {
            Some(last) => self
                .conns
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.conns.range(..=last))
                .filter_map(ready)
                .collect(),
            None => self.conns.iter().filter_map(ready).collect(),
        };
        for key in candidates {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let produced = conn.next_packet(buf);
            self.remove_if_finished(key);
            if let Some((hdr, _)) = &produced {
                if hdr.op == op::REQUEST {
                    self.await_response(key);
                }
            }
            if let Some(pkt) = produced {
                self.last_served = Some(key);
                return Some(pkt);
            }
        }
        None
    }

    /// State of a connection, for tests and diagnostics.
    pub fn connection_state(&self, host_port: u32, guest_port: u32) -> Option<ConnState> {
        self.conns
            .get(&(host_port, guest_port))
            .map(Connection::state)
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // We created the socket file; leave no stale path behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Connects to a unix socket without blocking (a full backlog fails instead of waiting).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
