//! A tiny vsock stream layer over [`crate::vsock::VsockDev`]: a table of [`MAX_CONNS`]
//! connections, listening ports, connect, credit accounting both ways, and the per-connection
//! behaviour the test modes need ([`App`]).
//!
//! Receive credit (virtio 1.2, 5.10.6.3): each connection advertises `buf_alloc` (at most
//! [`STAGE_LEN`]) and counts consumed bytes in `fwd_cnt`. Data that cannot be consumed at once
//! (no send credit towards the host, a paused connection) is copied into the connection's staging
//! buffer and counts as unconsumed until it has been sent back; the host may never have more
//! than `buf_alloc` unconsumed bytes outstanding, which is checked (`credit_violations`).
//! CREDIT_UPDATE goes out when a quarter of `buf_alloc` was consumed since the host last heard our
//! `fwd_cnt`, and in answer to CREDIT_REQUEST.
//!
//! Send credit: never more than `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight;
//! with none left and data waiting, one CREDIT_REQUEST until the host's credit changes.
//!
//! Echo is zero-copy when it can be: a received buffer whose bytes can go straight back is sent
//! out again with a rewritten header (the device returns it, then it is recycled).

use crate::vsock::{
    copy_in_region, op, rx_payload, stage_buf, Hdr, Rx, TxUse, VsockDev, HOST_CID, MAX_CONNS,
    MAX_PAYLOAD, PATTERN, PATTERN_LEN, SHUTDOWN_BOTH, SHUTDOWN_SEND, STAGE_LEN, TYPE_STREAM,
};

/// What a connection does with its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    /// Sends back everything it receives; closes after the peer stopped sending.
    Echo,
    /// Consumes and counts; on the peer's SHUTDOWN(SEND) replies with the count (8 bytes LE).
    Sink,
    /// Sends `source_bytes` pattern bytes, then SHUTDOWN(SEND); consumes and counts what the
    /// host still sends; RST once the host stopped sending too.
    Source,
    /// Consumes and records received bytes in [`Stats::control`]; closes when the peer does.
    Control,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// REQUEST sent (or owed), waiting for RESPONSE.
    Connecting,
    Established,
    /// We sent SHUTDOWN(BOTH): waiting for the host's RST.
    Closing,
}

#[derive(Clone, Copy)]
struct Conn {
    state: State,
    app: App,
    gen: u16,
    local_port: u32,
    peer_port: u32,
    paused: bool,
    // Receive side.
    buf_alloc: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    stage_head: u32,
    stage_len: u32,
    stage_inflight: u32,
    received: u64,
    // Send side.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    source_left: u64,
    // Owed control packets.
    owe_request: bool,
    owe_response: bool,
    owe_rst: bool,
    owe_credit: bool,
    count_sent: bool,
    peer_shut: u32,
    shut_sent: bool,
}

const FREE: Conn = Conn {
    state: State::Free,
    app: App::Echo,
    gen: 0,
    local_port: 0,
    peer_port: 0,
    paused: false,
    buf_alloc: 0,
    rx_cnt: 0,
    fwd_cnt: 0,
    last_fwd_sent: 0,
    stage_head: 0,
    stage_len: 0,
    stage_inflight: 0,
    received: 0,
    tx_cnt: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    credit_requested: false,
    source_left: 0,
    owe_request: false,
    owe_response: false,
    owe_rst: false,
    owe_credit: false,
    count_sent: false,
    peer_shut: 0,
    shut_sent: false,
};

impl Conn {
    fn send_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Counters the modes report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub accepted: u32,
    pub connected: u32,
    /// Our REQUESTs answered with RST.
    pub refused: u32,
    /// Connections that ended (RST received or sent).
    pub closed: u32,
    pub open: u32,
    pub max_open: u32,
    /// REQUESTs to ports nobody listens on, answered with RST.
    pub rst_sent_unknown: u32,
    /// RSTs received for packets that belong to no connection.
    pub rst_stray: u32,
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    /// Largest unconsumed byte count seen on any connection.
    pub max_unconsumed: u32,
    /// The host sent more than our credit allowed.
    pub credit_violations: u32,
    pub credit_requests_rx: u32,
    pub credit_requests_tx: u32,
    pub credit_updates_tx: u32,
    /// Received packets that fit nothing (wrong CID, type, op).
    pub bad_packets: u32,
    /// Packets answered zero-copy.
    pub zero_copy: u32,
    /// Bytes received on control connections, and the last one.
    pub control: u32,
    pub control_last: u8,
}

/// Listening port entry.
#[derive(Clone, Copy)]
struct Listen {
    port: u32,
    app: App,
    paused: bool,
}

const MAX_LISTEN: usize = 4;
const MAX_PENDING_RST: usize = 16;
const FIRST_LOCAL_PORT: u32 = 49152;

/// The connection table and its policies.
pub struct Stack {
    cid: u64,
    buf_alloc: u32,
    /// Bytes each new Source connection sends.
    pub source_bytes: u64,
    conns: [Conn; MAX_CONNS],
    listen: [Option<Listen>; MAX_LISTEN],
    pending_rst: [Hdr; MAX_PENDING_RST],
    pending_rst_len: usize,
    next_port: u32,
    rr: usize,
    /// One past the highest slot in use: loops stop there (every instruction costs here).
    used_hi: usize,
    pub stats: Stats,
}

impl Stack {
    /// A stack for guest `cid` advertising `buf_alloc` (clamped to 1..=[`STAGE_LEN`]).
    pub fn new(cid: u64, buf_alloc: u32) -> Stack {
        Stack {
            cid,
            buf_alloc: buf_alloc.clamp(1, STAGE_LEN),
            source_bytes: 0,
            conns: [FREE; MAX_CONNS],
            listen: [None; MAX_LISTEN],
            pending_rst: [Hdr::default(); MAX_PENDING_RST],
            pending_rst_len: 0,
            next_port: FIRST_LOCAL_PORT,
            rr: 0,
            used_hi: 0,
            stats: Stats::default(),
        }
    }

    /// Advertised receive buffer per connection.
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Accepts connections on `port`; new connections start paused (consume nothing) if asked.
    pub fn listen(&mut self, port: u32, app: App, paused: bool) -> bool {
        let Some(slot) = self.listen.iter_mut().find(|l| l.is_none()) else {
            return false;
        };
        *slot = Some(Listen { port, app, paused });
        true
    }

    /// Pauses or resumes consumption on every connection of `app`.
    pub fn set_paused(&mut self, app: App, paused: bool) {
        for c in self.conns.iter_mut().filter(|c| c.app == app) {
            c.paused = paused;
        }
        for l in self.listen.iter_mut().flatten().filter(|l| l.app == app) {
            l.paused = paused;
        }
    }

    /// Starts a connection to host `port`. False when the table is full.
    pub fn connect(&mut self, port: u32, app: App) -> bool {
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let Some(i) = self.alloc(local, port, app) else {
            return false;
        };
        self.conns[i].state = State::Connecting;
        self.conns[i].owe_request = true;
        true
    }

    fn alloc(&mut self, local_port: u32, peer_port: u32, app: App) -> Option<usize> {
        let i = self.conns.iter().position(|c| c.state == State::Free)?;
        self.used_hi = self.used_hi.max(i + 1);
        let gen = self.conns[i].gen.wrapping_add(1);
        self.conns[i] = Conn {
            state: State::Established,
            app,
            gen,
            local_port,
            peer_port,
            buf_alloc: self.buf_alloc,
            source_left: if app == App::Source {
                self.source_bytes
            } else {
                0
            },
            ..FREE
        };
        self.stats.open += 1;
        self.stats.max_open = self.stats.max_open.max(self.stats.open);
        Some(i)
    }

    fn release(&mut self, i: usize) {
        if self.conns[i].state != State::Free {
            self.conns[i].state = State::Free;
            self.stats.open = self.stats.open.saturating_sub(1);
            self.stats.closed += 1;
        }
        while self.used_hi > 0 && self.conns[self.used_hi - 1].state == State::Free {
            self.used_hi -= 1;
        }
    }

    fn header(&mut self, i: usize, op: u16, len: u32, flags: u32) -> Hdr {
        let c = &mut self.conns[i];
        c.last_fwd_sent = c.fwd_cnt;
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: c.buf_alloc,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn queue_rst(&mut self, to: &Hdr) {
        if to.op == op::RST || self.pending_rst_len >= MAX_PENDING_RST {
            return;
        }
        self.pending_rst[self.pending_rst_len] = Hdr {
            src_cid: self.cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Hdr::default()
        };
        self.pending_rst_len += 1;
    }

    /// Sends an RST for a connection that does not exist (tests of the device's RST path).
    pub fn send_stray(&mut self, dev: &mut VsockDev, host_port: u32, local_port: u32) -> bool {
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op: op::RW,
            buf_alloc: self.buf_alloc,
            ..Hdr::default()
        };
        dev.send_control(&h, b"stray")
    }

    /// One round: handles what the device returned, sends what is owed, notifies the device.
    pub fn poll(&mut self, dev: &mut VsockDev) {
        for _ in 0..crate::vsock::RX_QSIZE {
            let Some(rx) = dev.recv() else { break };
            if !self.on_packet(dev, &rx) {
                dev.recycle(rx.buf);
            }
        }
        while let Some(done) = dev.tx_done() {
            if let TxUse::Stage { conn, gen, len } = done {
                self.stage_sent(usize::from(conn), gen, len);
            }
        }
        self.pump(dev);
        dev.flush();
    }

    /// Handles one received packet. True if its buffer was lent to the tx queue.
    fn on_packet(&mut self, dev: &mut VsockDev, rx: &Rx) -> bool {
        let h = rx.hdr;
        if h.dst_cid != self.cid || h.src_cid != HOST_CID || h.type_ != TYPE_STREAM {
            self.stats.bad_packets += 1;
            return false;
        }
        let found = self.conns[..self.used_hi].iter().position(|c| {
            c.state != State::Free && c.local_port == h.dst_port && c.peer_port == h.src_port
        });
        let Some(i) = found else {
            self.on_unknown(&h);
            return false;
        };
        let c = &mut self.conns[i];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.send_credit() > 0 {
            c.credit_requested = false;
        }
        match (c.state, h.op) {
            (_, op::RST) => {
                if c.state == State::Connecting {
                    self.stats.refused += 1;
                }
                self.release(i);
            }
            (State::Connecting, op::RESPONSE) => {
                c.state = State::Established;
                self.stats.connected += 1;
            }
            (State::Connecting, _) => {
                c.owe_rst = true;
            }
            (_, op::RW) => return self.on_data(dev, i, rx),
            (_, op::CREDIT_UPDATE) => {}
            (_, op::CREDIT_REQUEST) => {
                self.stats.credit_requests_rx += 1;
                c.owe_credit = true;
            }
            (_, op::SHUTDOWN) => c.peer_shut |= h.flags & SHUTDOWN_BOTH,
            _ => {
                self.stats.bad_packets += 1;
                c.owe_rst = true;
            }
        }
        false
    }

    fn on_unknown(&mut self, h: &Hdr) {
        match h.op {
            op::RST => self.stats.rst_stray += 1,
            op::REQUEST => {
                let listener = self.listen.iter().flatten().find(|l| l.port == h.dst_port);
                let Some(&Listen { app, paused, .. }) = listener else {
                    self.stats.rst_sent_unknown += 1;
                    self.queue_rst(h);
                    return;
                };
                let Some(i) = self.alloc(h.dst_port, h.src_port, app) else {
                    self.queue_rst(h);
                    return;
                };
                let c = &mut self.conns[i];
                c.paused = paused;
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                c.owe_response = true;
                self.stats.accepted += 1;
            }
            _ => self.queue_rst(h),
        }
    }

    /// RW payload for connection `i`. True if the buffer was lent (zero-copy echo).
    fn on_data(&mut self, dev: &mut VsockDev, i: usize, rx: &Rx) -> bool {
        let n = rx.hdr.len;
        let c = &mut self.conns[i];
        if c.state != State::Established || c.peer_shut & SHUTDOWN_SEND != 0 {
            c.owe_rst = true;
            return false;
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(n);
        c.received += u64::from(n);
        self.stats.bytes_rx += u64::from(n);
        let unconsumed = c.rx_cnt.wrapping_sub(c.fwd_cnt);
        self.stats.max_unconsumed = self.stats.max_unconsumed.max(unconsumed);
        if unconsumed > c.buf_alloc || c.stage_len + n > STAGE_LEN {
            self.stats.credit_violations += 1;
            c.owe_rst = true;
            return false;
        }
        match c.app {
            App::Sink | App::Source => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                false
            }
            App::Control => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                if n > 0 {
                    self.stats.control += n;
                    self.stats.control_last =
                        crate::vsock::read_region_byte(rx_payload(rx.buf) + u64::from(n) - 1);
                }
                false
            }
            App::Echo => {
                if n == 0 {
                    return false;
                }
                let direct = !c.paused && c.stage_len == 0 && c.send_credit() >= n;
                if direct && dev.tx_free() > 0 {
                    // Consumed now: the same bytes go straight back out.
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n);
                    let h = self.header(i, op::RW, n, 0);
                    if dev.send_lent(rx.buf, &h) {
                        self.stats.bytes_tx += u64::from(n);
                        self.stats.zero_copy += 1;
                        return true;
                    }
                    let c = &mut self.conns[i];
                    c.fwd_cnt = c.fwd_cnt.wrapping_sub(n);
                    c.tx_cnt = c.tx_cnt.wrapping_sub(n);
                }
                self.stage(i, rx.buf, n);
                false
            }
        }
    }

    /// Copies `n` received bytes into connection `i`'s staging ring (room checked by the caller).
    fn stage(&mut self, i: usize, buf: u16, n: u32) {
        let c = &mut self.conns[i];
        let base = stage_buf(i);
        let mut tail = (c.stage_head + c.stage_len) % STAGE_LEN;
        let mut done = 0;
        while done < n {
            let chunk = (n - done).min(STAGE_LEN - tail);
            copy_in_region(
                base + u64::from(tail),
                rx_payload(buf) + u64::from(done),
                chunk as usize,
            );
            done += chunk;
            tail = (tail + chunk) % STAGE_LEN;
        }
        c.stage_len += n;
    }

    /// The device took `len` staged bytes of connection `i`: they are consumed now.
    fn stage_sent(&mut self, i: usize, gen: u16, len: u32) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if c.gen != gen || c.state == State::Free {
            return;
        }
        let len = len.min(c.stage_inflight);
        c.stage_head = (c.stage_head + len) % STAGE_LEN;
        c.stage_len -= len;
        c.stage_inflight -= len;
        c.fwd_cnt = c.fwd_cnt.wrapping_add(len);
    }

    /// Sends owed packets and data, connection by connection (round robin), while tx slots last.
    fn pump(&mut self, dev: &mut VsockDev) {
        while self.pending_rst_len > 0 && dev.tx_free() > 0 {
            self.pending_rst_len -= 1;
            let h = self.pending_rst[self.pending_rst_len];
            dev.send_control(&h, &[]);
        }
        let n = self.used_hi;
        if n == 0 {
            return;
        }
        let start = self.rr % n;
        self.rr = start + 1;
        for k in 0..n {
            if dev.tx_free() == 0 {
                return;
            }
            let i = (start + k) % n;
            if self.conns[i].state != State::Free {
                self.pump_one(dev, i);
            }
        }
    }

    fn control(
        &mut self,
        dev: &mut VsockDev,
        i: usize,
        op: u16,
        flags: u32,
        inline: &[u8],
    ) -> bool {
        let h = self.header(i, op, 0, flags);
        dev.send_control(&h, inline)
    }

    fn pump_one(&mut self, dev: &mut VsockDev, i: usize) {
        let c = self.conns[i];
        if c.owe_rst {
            if self.control(dev, i, op::RST, 0, &[]) {
                self.release(i);
            }
            return;
        }
        if c.owe_request {
            if self.control(dev, i, op::REQUEST, 0, &[]) {
                self.conns[i].owe_request = false;
            }
            return;
        }
        if c.state == State::Connecting || c.state == State::Closing {
            return;
        }
        if c.owe_response {
            if !self.control(dev, i, op::RESPONSE, 0, &[]) {
                return;
            }
            self.conns[i].owe_response = false;
        }
        if c.peer_shut == SHUTDOWN_BOTH {
            // The host closed its end completely: it waits for our RST.
            self.conns[i].owe_rst = true;
            return;
        }
        match c.app {
            App::Echo if !c.paused => self.pump_stage(dev, i),
            App::Source => self.pump_source(dev, i),
            _ => {}
        }
        let c = self.conns[i];
        let consumed = c.fwd_cnt.wrapping_sub(c.last_fwd_sent);
        if (c.owe_credit || consumed >= c.buf_alloc / 4)
            && self.control(dev, i, op::CREDIT_UPDATE, 0, &[])
        {
            self.conns[i].owe_credit = false;
            self.stats.credit_updates_tx += 1;
        }
        self.maybe_close(dev, i);
    }

    /// Sends staged bytes as far as credit and slots allow.
    fn pump_stage(&mut self, dev: &mut VsockDev, i: usize) {
        loop {
            let c = self.conns[i];
            let unsent = c.stage_len - c.stage_inflight;
            if unsent == 0 {
                return;
            }
            let credit = c.send_credit();
            if credit == 0 {
                self.request_credit(dev, i);
                return;
            }
            let from = (c.stage_head + c.stage_inflight) % STAGE_LEN;
            let len = unsent
                .min(STAGE_LEN - from)
                .min(credit)
                .min(MAX_PAYLOAD as u32);
            let h = self.header(i, op::RW, len, 0);
            let what = TxUse::Stage {
                conn: i as u16,
                gen: c.gen,
                len,
            };
            if !dev.send_split(&h, stage_buf(i) + u64::from(from), len, what) {
                return;
            }
            let c = &mut self.conns[i];
            c.stage_inflight += len;
            c.tx_cnt = c.tx_cnt.wrapping_add(len);
            self.stats.bytes_tx += u64::from(len);
        }
    }

    fn pump_source(&mut self, dev: &mut VsockDev, i: usize) {
        while self.conns[i].source_left > 0 {
            let c = self.conns[i];
            let credit = c.send_credit();
            if credit == 0 {
                self.request_credit(dev, i);
                return;
            }
            // Stream offset `o` carries pattern byte `o % PATTERN_LEN`.
            let sent = self.source_bytes.wrapping_sub(c.source_left);
            let at = (sent % PATTERN_LEN) as u32;
            let len = (c.source_left.min(MAX_PAYLOAD as u64) as u32)
                .min(credit)
                .min(PATTERN_LEN as u32 - at);
            let h = self.header(i, op::RW, len, 0);
            if !dev.send_split(&h, PATTERN + u64::from(at), len, TxUse::Pattern) {
                return;
            }
            let c = &mut self.conns[i];
            c.source_left -= u64::from(len);
            c.tx_cnt = c.tx_cnt.wrapping_add(len);
            self.stats.bytes_tx += u64::from(len);
        }
    }

    fn request_credit(&mut self, dev: &mut VsockDev, i: usize) {
        if !self.conns[i].credit_requested && self.control(dev, i, op::CREDIT_REQUEST, 0, &[]) {
            self.conns[i].credit_requested = true;
            self.stats.credit_requests_tx += 1;
        }
    }

    /// Orderly close once a connection has nothing left to do: SHUTDOWN(BOTH), then the host's
    /// RST ends it (Source connections half-close instead).
    fn maybe_close(&mut self, dev: &mut VsockDev, i: usize) {
        let c = self.conns[i];
        let peer_done = c.peer_shut & SHUTDOWN_SEND != 0;
        let done = match c.app {
            App::Echo | App::Control => peer_done && c.stage_len == 0,
            App::Source => {
                // Half close: SHUTDOWN(SEND) once everything went out, keep receiving until the
                // host stops sending too, then end it with RST (as Linux does).
                if c.source_left == 0
                    && !c.shut_sent
                    && self.control(dev, i, op::SHUTDOWN, SHUTDOWN_SEND, &[])
                {
                    self.conns[i].shut_sent = true;
                }
                if self.conns[i].shut_sent && peer_done {
                    self.conns[i].owe_rst = true;
                }
                return;
            }
            App::Sink => {
                if peer_done && !c.count_sent {
                    let count = c.received.to_le_bytes();
                    let h = self.header(i, op::RW, 0, 0);
                    if !dev.send_control(&h, &count) {
                        return;
                    }
                    self.conns[i].count_sent = true;
                    self.conns[i].tx_cnt = self.conns[i].tx_cnt.wrapping_add(8);
                    self.stats.bytes_tx += 8;
                }
                peer_done
            }
        };
        if done && !c.shut_sent && self.control(dev, i, op::SHUTDOWN, SHUTDOWN_BOTH, &[]) {
            let c = &mut self.conns[i];
            c.shut_sent = true;
            c.state = State::Closing;
        }
    }

    /// Number of connections not yet ended.
    pub fn open(&self) -> u32 {
        self.stats.open
    }
}
