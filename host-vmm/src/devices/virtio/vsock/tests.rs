//! vsock device tests: a simulated guest driver on hand-built virtqueues, real unix sockets on
//! the host side, everything driven through the MMIO transport (no KVM).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::connection::CONN_BUF_ALLOC;
use super::packet::{op, Header, HDR_LEN, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::devices::virtio::mmio::{status, MmioTransport};
use crate::devices::virtio::test_driver::*;

const CID: u64 = 3;
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 4096;
const TX_SMALL: u64 = 0x20_0000;
const TX_LARGE: u64 = 0x30_0000;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "kiln-vsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

/// A guest driver talking to the device through its queues.
struct Guest {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    rx: TestQueue,
    tx: TestQueue,
    rx_seen: u16,
    tx_slot: u64,
    uds: PathBuf,
    _dir: TempDir,
}

fn guest() -> Guest {
    let dir = temp_dir();
    let uds = dir.0.join("v.sock");
    let dev = Vsock::new(CID, &uds).unwrap();
    let mem = guest_memory();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev)).unwrap();
    assert_ne!(
        negotiate(&mut t, VIRTIO_F_VERSION_1) & status::FEATURES_OK,
        0
    );
    let rx = TestQueue::new(QUEUE_SIZE, 0x1000);
    let tx = TestQueue::new(QUEUE_SIZE, 0x5000);
    let ev = TestQueue::new(QUEUE_SIZE, 0x9000);
    rx.install(&mut t, 0);
    tx.install(&mut t, 1);
    ev.install(&mut t, 2);
    driver_ok(&mut t);
    assert!(t.is_activated());
    Guest {
        t,
        mem,
        rx,
        tx,
        rx_seen: 0,
        tx_slot: 0,
        uds,
        _dir: dir,
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

impl Guest {
    /// Offers `n` rx buffers of 4 KiB and kicks the rx queue.
    fn fill_rx(&mut self, n: usize) {
        for _ in 0..n {
            let index = self.rx_next_index();
            self.rx.add_chain(
                &self.mem,
                &[(RX_BUF + u64::from(index) * 4096, RX_BUF_LEN, true)],
            );
        }
        self.t.process_queue(0);
    }

    fn rx_next_index(&self) -> u16 {
        // One descriptor per buffer: the head index advances by one each time.
        let avail_idx: u16 = self.mem.read_obj(GuestAddress(self.rx.avail + 2)).unwrap();
        avail_idx % QUEUE_SIZE
    }

    /// Puts one packet on the tx queue and kicks it.
    fn send(&mut self, h: Header, payload: &[u8]) {
        self.send_raw(
            &h.to_bytes(),
            payload,
            HDR_LEN as u32 + payload.len() as u32,
        );
    }

    fn send_raw(&mut self, header: &[u8], payload: &[u8], desc_len: u32) {
        let total = header.len() + payload.len();
        let addr = if total <= 0x400 {
            self.tx_slot = (self.tx_slot + 1) % 64;
            TX_SMALL + self.tx_slot * 0x400
        } else {
            TX_LARGE
        };
        self.mem.write_slice(header, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + header.len() as u64))
            .unwrap();
        self.tx.add_chain(&self.mem, &[(addr, desc_len, false)]);
        self.t.process_queue(1);
    }

    /// Packets the device delivered since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.rx.used_idx(&self.mem);
        while self.rx_seen != used {
            let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BUF + u64::from(id) * 4096;
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&raw);
            assert_eq!(len as usize, HDR_LEN + h.len as usize);
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((h, payload));
        }
        out
    }

    fn host_event(&mut self) {
        self.t.process_host_event();
    }

    /// Adds rx buffers until `target` are outstanding.
    fn top_up_rx(&mut self, target: u16) {
        let avail: u16 = self.mem.read_obj(GuestAddress(self.rx.avail + 2)).unwrap();
        let outstanding = avail.wrapping_sub(self.rx.used_idx(&self.mem));
        self.fill_rx(usize::from(target.saturating_sub(outstanding)));
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

/// The device's connection to a host listener, waiting at most 5 s (a device that never
/// connects fails the test instead of hanging it).
fn accept_timeout(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the device did not connect to the host listener within 5 s"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap(), 0, "expected EOF");
}

/// EOF, or a reset when the device closed with unread bytes in its receive buffer.
fn assert_closed(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the device to close the stream, got {other:?}"),
    }
}

#[test]
fn config_space_holds_cid() {
    let mut g = guest();
    let mut b = [0u8; 8];
    crate::devices::bus::BusDevice::read(&mut g.t, 0x100, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    assert_eq!(read_reg(&mut g.t, 0x8), 19);
    assert!(g.t.host_event_fd().is_some());
}

#[test]
fn setup_errors() {
    let dir = temp_dir();
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(bad, &dir.0.join("a")),
            Err(VsockError::InvalidCid(_))
        ));
    }
    let path = dir.0.join("taken");
    std::fs::write(&path, b"").unwrap();
    let err = Vsock::new(3, &path).err().unwrap();
    assert!(err.to_string().contains("taken"), "{err}");
}

#[test]
fn guest_connects_to_host_and_exchanges_data() {
    let mut g = guest();
    let listener = UnixListener::bind(format!("{}_1234", g.uds.display())).unwrap();
    g.fill_rx(8);
    g.send(hdr(op::REQUEST, 5000, 1234, 0), &[]);
    let mut host = accept_timeout(&listener);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::RESPONSE]);
    let (h, _) = &pkts[0];
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (2, CID, 1234, 5000)
    );
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);

    g.send(hdr(op::RW, 5000, 1234, 4), b"ping");
    assert_eq!(read_exact_timeout(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    g.host_event();
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::RW]);
    assert_eq!(pkts[0].1, b"pong");

    // Guest closes: SHUTDOWN(both) -> host sees EOF, guest gets RST.
    let mut sd = hdr(op::SHUTDOWN, 5000, 1234, 0);
    sd.flags = SHUTDOWN_BOTH;
    g.send(sd, &[]);
    assert_eq!(ops(&g.recv()), [op::RST]);
    assert_eof(&mut host);
    // The connection is gone: more data gets an RST.
    g.send(hdr(op::RW, 5000, 1234, 1), b"x");
    assert_eq!(ops(&g.recv()), [op::RST]);
}

#[test]
fn rst_for_closed_ports_and_unknown_connections() {
    let mut g = guest();
    g.fill_rx(32);
    g.send(hdr(op::REQUEST, 5000, 999, 0), &[]);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::RST]);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (999, 5000));
    for o in [
        op::RW,
        op::RESPONSE,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        77,
    ] {
        g.send(hdr(o, 5001, 1000, 0), &[]);
        assert_eq!(ops(&g.recv()), [op::RST], "op {o}");
    }
    // An RST for nothing is not answered.
    g.send(hdr(op::RST, 5001, 1000, 0), &[]);
    assert!(g.recv().is_empty());
    // Wrong destination CID or socket type: RST.
    let mut h = hdr(op::REQUEST, 5002, 1000, 0);
    h.dst_cid = 7;
    g.send(h, &[]);
    let mut h = hdr(op::REQUEST, 5002, 1000, 0);
    h.type_ = 2;
    g.send(h, &[]);
    assert_eq!(ops(&g.recv()), [op::RST, op::RST]);
    // A spoofed source CID is dropped silently.
    let mut h = hdr(op::REQUEST, 5003, 1000, 0);
    h.src_cid = 9;
    g.send(h, &[]);
    assert!(g.recv().is_empty());
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let mut g = guest();
    let listener = UnixListener::bind(format!("{}_80", g.uds.display())).unwrap();
    g.fill_rx(8);
    g.send(hdr(op::REQUEST, 6000, 80, 0), &[]);
    let mut host = accept_timeout(&listener);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    // len larger than the descriptor holds.
    g.send_raw(
        &hdr(op::RW, 6000, 80, 100).to_bytes(),
        b"short",
        HDR_LEN as u32 + 5,
    );
    // len above the 64 KiB maximum.
    g.send_raw(
        &hdr(op::RW, 6000, 80, u32::MAX).to_bytes(),
        b"",
        HDR_LEN as u32,
    );
    // Header cut short.
    g.send_raw(&hdr(op::RW, 6000, 80, 0).to_bytes()[..20], b"", 20);
    assert_eq!(g.tx.used_idx(&g.mem), 4, "every tx buffer returned");
    assert!(g.recv().is_empty());
    // The connection still works.
    g.send(hdr(op::RW, 6000, 80, 2), b"ok");
    assert_eq!(read_exact_timeout(&mut host, 2), b"ok");
    assert_eq!(g.t.device_status() & status::NEEDS_RESET, 0);
}

#[test]
fn host_connects_with_handshake() {
    let mut g = guest();
    g.fill_rx(8);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 52\nearly").unwrap();
    g.host_event();
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::REQUEST]);
    let req = pkts[0].0;
    assert_eq!((req.dst_cid, req.dst_port), (CID, 52));
    assert!(req.src_port >= 1 << 30);
    let mut resp = hdr(op::RESPONSE, 52, req.src_port, 0);
    resp.buf_alloc = 4096;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut client), format!("OK {}\n", req.src_port));
    // Bytes sent right after the CONNECT line reach the guest once connected.
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::RW]);
    assert_eq!(pkts[0].1, b"early");
    g.send(hdr(op::RW, 52, req.src_port, 5), b"hello");
    assert_eq!(read_exact_timeout(&mut client, 5), b"hello");
    // Host half-closes: the guest gets SHUTDOWN(SEND) and can still send.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    g.host_event();
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [op::SHUTDOWN]);
    assert_eq!(pkts[0].0.flags, SHUTDOWN_SEND);
    g.send(hdr(op::RW, 52, req.src_port, 3), b"end");
    assert_eq!(read_exact_timeout(&mut client, 3), b"end");
}

#[test]
fn bad_handshakes_are_closed() {
    let mut g = guest();
    g.fill_rx(8);
    let mut bad = UnixStream::connect(&g.uds).unwrap();
    bad.write_all(b"HELLO 52\n").unwrap();
    let mut long = UnixStream::connect(&g.uds).unwrap();
    long.write_all(&[b'1'; 100]).unwrap();
    let mut eof = UnixStream::connect(&g.uds).unwrap();
    eof.write_all(b"CONNECT 5").unwrap();
    eof.shutdown(std::net::Shutdown::Write).unwrap();
    g.host_event();
    assert_eof(&mut bad);
    assert_closed(&mut long);
    assert_eof(&mut eof);
    assert!(g.recv().is_empty(), "no REQUEST for refused clients");
}

#[test]
fn guest_refuses_host_connection() {
    let mut g = guest();
    g.fill_rx(8);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    g.host_event();
    let req = g.recv()[0].0;
    g.send(hdr(op::RST, 7, req.src_port, 0), &[]);
    assert_eof(&mut client);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut g = guest();
    g.fill_rx(16);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    g.host_event();
    let req = g.recv()[0].0;
    let port = req.src_port;
    let mut resp = hdr(op::RESPONSE, 9, port, 0);
    resp.buf_alloc = 6000;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut client), format!("OK {port}\n"));
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    client.write_all(&data).unwrap();
    g.host_event();
    let pkts = g.recv();
    let got: Vec<u8> = pkts
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(got.len(), 6000, "exactly the advertised credit");
    assert_eq!(*ops(&pkts).last().unwrap(), op::CREDIT_REQUEST);
    assert!(pkts
        .iter()
        .all(|(h, _)| h.len <= RX_BUF_LEN - HDR_LEN as u32));
    // More host events do not produce anything without credit.
    g.host_event();
    assert!(g.recv().is_empty());
    // The guest consumed everything.
    let mut up = hdr(op::CREDIT_UPDATE, 9, port, 0);
    up.buf_alloc = 6000;
    up.fwd_cnt = 6000;
    g.send(up, &[]);
    let more: Vec<u8> = g
        .recv()
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(more.len(), 6000);
    assert_eq!([got, more].concat(), data[..12_000]);
}

#[test]
fn packets_wait_for_rx_buffers() {
    let mut g = guest();
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 11\n").unwrap();
    g.host_event();
    assert!(g.recv().is_empty(), "no rx buffers yet");
    g.fill_rx(1);
    assert_eq!(ops(&g.recv()), [op::REQUEST]);
    // Tiny rx buffers cannot hold a header: returned unused, nothing lost.
    g.send(hdr(op::REQUEST, 1, 4444, 0), &[]);
    g.rx.add_chain(&g.mem, &[(RX_BUF, 10, true)]);
    g.t.process_queue(0);
    assert_eq!(g.rx.used_elem(&g.mem, 1).1, 0);
    g.rx_seen = g.rx.used_idx(&g.mem);
    g.fill_rx(1);
    assert_eq!(ops(&g.recv()), [op::RST]);
}

#[test]
fn many_concurrent_connections() {
    let mut g = guest();
    g.fill_rx(200);
    let n = 64;
    let mut clients: Vec<UnixStream> = (0..n)
        .map(|i| {
            let mut c = UnixStream::connect(&g.uds).unwrap();
            c.write_all(format!("CONNECT {}\n", 100 + i).as_bytes())
                .unwrap();
            c
        })
        .collect();
    g.host_event();
    let reqs = g.recv();
    assert_eq!(reqs.len(), n);
    let mut host_port_of: HashMap<u32, u32> = HashMap::new();
    for (req, _) in &reqs {
        assert_eq!(req.op, op::REQUEST);
        host_port_of.insert(req.dst_port, req.src_port);
        g.send(hdr(op::RESPONSE, req.dst_port, req.src_port, 0), &[]);
    }
    assert_eq!(host_port_of.len(), n);
    for (i, c) in clients.iter_mut().enumerate() {
        let guest_port = 100 + i as u32;
        assert_eq!(read_line(c), format!("OK {}\n", host_port_of[&guest_port]));
        let msg = format!("from guest {guest_port}");
        g.send(
            hdr(
                op::RW,
                guest_port,
                host_port_of[&guest_port],
                msg.len() as u32,
            ),
            msg.as_bytes(),
        );
        c.write_all(format!("from host {i}").as_bytes()).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("from guest {}", 100 + i);
        assert_eq!(read_exact_timeout(c, msg.len()), msg.as_bytes());
    }
    g.fill_rx(100);
    g.host_event();
    let mut seen = 0;
    for (h, p) in g.recv() {
        assert_eq!(h.op, op::RW);
        let i = h.dst_port - 100;
        assert_eq!(p, format!("from host {i}").as_bytes());
        assert_eq!(h.src_port, host_port_of[&h.dst_port]);
        seen += 1;
    }
    assert_eq!(seen, n);
}

#[test]
fn reset_drops_connections() {
    let mut g = guest();
    let listener = UnixListener::bind(format!("{}_77", g.uds.display())).unwrap();
    g.fill_rx(4);
    g.send(hdr(op::REQUEST, 1, 77, 0), &[]);
    let mut host = accept_timeout(&listener);
    assert_eq!(ops(&g.recv()), [op::RESPONSE]);
    write_reg(&mut g.t, 0x70, 0);
    assert_eof(&mut host);
    // The listener survives a reset.
    let _client = UnixStream::connect(&g.uds).unwrap();
}

#[test]
fn bulk_guest_to_host_with_credit_updates() {
    let mut g = guest();
    let listener = UnixListener::bind(format!("{}_5", g.uds.display())).unwrap();
    g.fill_rx(64);
    g.send(hdr(op::REQUEST, 9000, 5, 0), &[]);
    let mut host = accept_timeout(&listener);
    let resp = g.recv();
    let mut peer_buf = resp[0].0.buf_alloc;
    let mut peer_fwd = resp[0].0.fwd_cnt;
    let total = 4 * CONN_BUF_ALLOC as usize;
    let data: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        loop {
            // Read slowly so the device has to buffer and wait for EPOLLOUT.
            std::thread::sleep(Duration::from_micros(50));
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) => panic!("host read: {e}"),
            }
        }
        all
    });
    let mut sent = 0usize;
    let mut stalls = 0;
    while sent < total {
        let credit = peer_buf as usize - (sent as u32).wrapping_sub(peer_fwd) as usize;
        if credit == 0 {
            stalls += 1;
            std::thread::sleep(Duration::from_millis(1));
            g.host_event();
            g.top_up_rx(64);
            for (h, _) in g.recv() {
                assert_eq!(h.op, op::CREDIT_UPDATE);
                peer_buf = h.buf_alloc;
                peer_fwd = h.fwd_cnt;
            }
            assert!(stalls < 20_000, "credit never came back");
            continue;
        }
        let n = credit.min(4096).min(total - sent);
        g.send(hdr(op::RW, 9000, 5, n as u32), &data[sent..sent + n]);
        sent += n;
    }
    let mut sd = hdr(op::SHUTDOWN, 9000, 5, 0);
    sd.flags = SHUTDOWN_BOTH;
    g.send(sd, &[]);
    for _ in 0..10_000 {
        if g.recv().iter().any(|(h, _)| h.op == op::RST) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        g.host_event();
    }
    let got = reader.join().unwrap();
    assert_eq!(got.len(), total);
    assert!(got == data, "payload corrupted");
    assert!(stalls > 0, "the test should exhaust credit at least once");
}

#[test]
fn random_guest_packets_never_panic() {
    let mut g = guest();
    let _listener = UnixListener::bind(format!("{}_1", g.uds.display())).unwrap();
    let mut seed = 0x853c_49e6_748f_ea9bu64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let payload = vec![0x5au8; 0x300];
    for _ in 0..3000 {
        let v = next();
        let mut h = hdr(
            (v % 9) as u16,
            (v >> 8) as u32 % 4,
            (v >> 16) as u32 % 3,
            [0, 1, 16, 0x300, 0x10000, u32::MAX][(v >> 24) as usize % 6],
        );
        h.flags = (v >> 32) as u32 % 4;
        h.buf_alloc = [0, 1, 4096, u32::MAX][(v >> 36) as usize % 4];
        h.fwd_cnt = (v >> 40) as u32;
        if v & (1 << 50) != 0 {
            h.src_cid = 9;
        }
        let plen = (h.len as usize).min(payload.len());
        let desc_len = (HDR_LEN + plen) as u32 - ((v >> 52) as u32 % 3);
        g.send_raw(&h.to_bytes(), &payload[..plen], desc_len);
        if v & (1 << 60) != 0 {
            g.top_up_rx(32);
        }
        if v & (1 << 61) != 0 {
            g.host_event();
        }
        g.recv();
        assert_eq!(g.t.device_status() & status::NEEDS_RESET, 0);
    }
}

#[test]
fn unanswered_host_request_times_out() {
    let dir = temp_dir();
    let uds = dir.0.join("m.sock");
    let mut mux = muxer::VsockMuxer::new(CID, &uds).unwrap();
    mux.set_request_timeout(Duration::from_millis(30));
    let mut ignored = UnixStream::connect(&uds).unwrap();
    ignored.write_all(b"CONNECT 8\n").unwrap();
    let mut answered = UnixStream::connect(&uds).unwrap();
    answered.write_all(b"CONNECT 9\n").unwrap();
    let mut silent = UnixStream::connect(&uds).unwrap();
    silent.write_all(b"CONN").unwrap();
    mux.process_host_events();
    let mut buf = [0u8; 64];
    let mut reqs = HashMap::new();
    while let Some((h, _)) = mux.next_rx_packet(&mut buf) {
        assert_eq!(h.op, op::REQUEST);
        reqs.insert(h.dst_port, h.src_port);
    }
    assert_eq!(mux.connection_count(), 2);
    mux.handle_guest_packet(&hdr(op::RESPONSE, 9, reqs[&9], 0), &[]);
    assert_eq!(read_line(&mut answered), format!("OK {}\n", reqs[&9]));
    // Driven only by the epoll fd's timer, as in the VMM.
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(10));
        mux.process_host_events();
        if mux.connection_count() == 1 {
            break;
        }
    }
    assert_eq!(
        mux.connection_count(),
        1,
        "only the unanswered connection expires"
    );
    assert_eof(&mut ignored);
    assert_closed(&mut silent);
    assert_eq!(
        mux.connection_state(reqs[&9], 9),
        Some(connection::ConnState::Established)
    );
    // A late RESPONSE for the expired connection is answered with RST.
    mux.handle_guest_packet(&hdr(op::RESPONSE, 8, reqs[&8], 0), &[]);
    assert_eq!(mux.next_rx_packet(&mut buf).unwrap().0.op, op::RST);
}
