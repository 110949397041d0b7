//! Connection state machine and credit tests against an in-memory host stream.

use super::*;

/// A host stream whose reads come from `input` and whose writes go to `output`, with a limit on
/// how much it accepts before it "would block".
#[derive(Default)]
struct FakeStream {
    input: VecDeque<u8>,
    input_eof: bool,
    output: Vec<u8>,
    accept: usize,
    write_shut: bool,
    broken: bool,
}

impl Read for FakeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if self.input.is_empty() {
            return if self.input_eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.input.len());
        for (d, s) in buf.iter_mut().zip(self.input.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

impl Write for FakeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.broken || self.write_shut {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.accept);
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.accept -= n;
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HostStream for FakeStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.write_shut = true;
        Ok(())
    }
}

const CID: u64 = 3;

fn guest_hdr(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1024,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn stream(accept: usize) -> FakeStream {
    FakeStream {
        accept,
        ..FakeStream::default()
    }
}

fn established(accept: usize, peer_buf: u32) -> Connection<FakeStream> {
    let req = guest_hdr(op::REQUEST, 0, peer_buf, 0);
    let mut c = Connection::new_peer(stream(accept), CID, &req);
    let (h, n) = c.next_packet(&mut [0u8; 64]).unwrap();
    assert_eq!((h.op, n), (op::RESPONSE, 0));
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (1024, 5000, CID));
    c
}

fn drain(c: &mut Connection<FakeStream>, buf: &mut [u8]) -> Vec<Header> {
    let mut out = Vec::new();
    while let Some((h, _)) = c.next_packet(buf) {
        out.push(h);
        if out.len() > 1000 {
            panic!("connection keeps producing packets");
        }
    }
    out
}

#[test]
fn host_initiated_handshake() {
    let mut c = Connection::new_local(stream(100), CID, 1 << 30, 52);
    assert_eq!(c.state(), ConnState::LocalInit);
    let (h, _) = c.next_packet(&mut [0u8; 16]).unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::REQUEST, 1 << 30, 52));
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    // Host data waiting before the guest answered is not read yet.
    c.stream.input.extend(b"early");
    assert!(c.next_packet(&mut [0u8; 16]).is_none());
    let mut resp = guest_hdr(op::RESPONSE, 0, 4096, 0);
    resp.dst_port = 1 << 30;
    c.recv_from_guest(&resp, &[]);
    assert_eq!(c.state(), ConnState::Established);
    assert_eq!(c.stream.output, b"OK 1073741824\n");
    let mut buf = [0u8; 64];
    let (h, n) = c.next_packet(&mut buf).unwrap();
    assert_eq!((h.op, n, &buf[..n]), (op::RW, 5, &b"early"[..]));
}

#[test]
fn guest_refuses_host_connection() {
    let mut c = Connection::new_local(stream(100), CID, 7, 52);
    c.next_packet(&mut [0u8; 16]).unwrap();
    c.recv_from_guest(&guest_hdr(op::RST, 0, 0, 0), &[]);
    assert!(c.is_finished());
    assert!(c.stream.output.is_empty(), "no OK line");
    // Anything but RESPONSE/RST while connecting resets.
    let mut c = Connection::new_local(stream(100), CID, 7, 52);
    c.next_packet(&mut [0u8; 16]).unwrap();
    c.recv_from_guest(&guest_hdr(op::RW, 1, 0, 0), b"x");
    assert_eq!(c.next_packet(&mut [0u8; 16]).unwrap().0.op, op::RST);
    assert!(c.is_finished());
}

#[test]
fn never_sends_more_than_peer_credit() {
    let mut c = established(0, 1000);
    c.stream.input.extend(vec![7u8; 5000]);
    let mut buf = [0u8; 600];
    let (h, n) = c.next_packet(&mut buf).unwrap();
    assert_eq!((h.op, n), (op::RW, 600));
    let (h, n) = c.next_packet(&mut buf).unwrap();
    assert_eq!((h.op, n), (op::RW, 400), "limited by the remaining credit");
    assert_eq!(c.peer_credit(), 0);
    // Out of credit: one CREDIT_REQUEST, then silence.
    let (h, _) = c.next_packet(&mut buf).unwrap();
    assert_eq!(h.op, op::CREDIT_REQUEST);
    assert!(c.next_packet(&mut buf).is_none());
    assert!(!c.has_rx());
    // The guest consumed 700 bytes.
    c.recv_from_guest(&guest_hdr(op::CREDIT_UPDATE, 0, 1000, 700), &[]);
    assert_eq!(c.peer_credit(), 700);
    let (h, n) = c.next_packet(&mut [0u8; 4096]).unwrap();
    assert_eq!((h.op, n), (op::RW, 700));
}

#[test]
fn credit_update_without_credit_does_not_ask_again() {
    // A guest that is not reading answers CREDIT_REQUEST with an update granting nothing: wait
    // for real credit instead of asking again at once (a busy request/update loop on both sides).
    let mut c = established(0, 1000);
    c.stream.input.extend(vec![7u8; 5000]);
    let mut buf = [0u8; 4096];
    assert_eq!(c.next_packet(&mut buf).unwrap().0.op, op::RW);
    assert_eq!(c.next_packet(&mut buf).unwrap().0.op, op::CREDIT_REQUEST);
    c.recv_from_guest(&guest_hdr(op::CREDIT_UPDATE, 0, 1000, 0), &[]);
    assert!(
        !c.has_rx(),
        "asked again for credit the guest just said it has not got"
    );
    assert!(c.next_packet(&mut buf).is_none());
    // Real credit resumes the flow.
    c.recv_from_guest(&guest_hdr(op::CREDIT_UPDATE, 0, 1000, 300), &[]);
    let (h, n) = c.next_packet(&mut buf).unwrap();
    assert_eq!((h.op, n), (op::RW, 300));
}

#[test]
fn credit_survives_counter_wrap() {
    let mut c = established(0, 1000);
    c.rx_cnt = u32::MAX - 100;
    c.peer_fwd_cnt = u32::MAX - 300;
    assert_eq!(c.peer_credit(), 800);
    c.stream.input.extend(vec![1u8; 900]);
    let (_, n) = c.next_packet(&mut [0u8; 4096]).unwrap();
    assert_eq!(n, 800);
    assert_eq!(c.rx_cnt, 699);
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn guest_data_is_forwarded_and_credit_advertised() {
    let mut c = established(usize::MAX, 4096);
    c.recv_from_guest(&guest_hdr(op::RW, 5, 4096, 0), b"hello");
    assert_eq!(c.stream.output, b"hello");
    // Every packet carries our fwd_cnt and buf_alloc.
    c.recv_from_guest(&guest_hdr(op::CREDIT_REQUEST, 0, 4096, 0), &[]);
    let (h, _) = c.next_packet(&mut [0u8; 16]).unwrap();
    assert_eq!(
        (h.op, h.fwd_cnt, h.buf_alloc),
        (op::CREDIT_UPDATE, 5, CONN_BUF_ALLOC)
    );
    // Past the threshold an update is sent unprompted.
    let chunk = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
    c.recv_from_guest(&guest_hdr(op::RW, chunk.len() as u32, 4096, 0), &chunk);
    let (h, _) = c.next_packet(&mut [0u8; 16]).unwrap();
    assert_eq!(h.op, op::CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt, 5 + CREDIT_UPDATE_THRESHOLD);
}

#[test]
fn slow_host_buffers_within_credit_then_drains() {
    let mut c = established(3, 4096);
    c.recv_from_guest(&guest_hdr(op::RW, 10, 4096, 0), b"0123456789");
    assert_eq!(c.stream.output, b"012");
    assert_eq!(c.buffered_to_host(), 7);
    assert_eq!(c.fwd_cnt, 3);
    c.stream.accept = 100;
    c.on_host_event(false, true, false, false);
    assert_eq!(c.stream.output, b"0123456789");
    assert_eq!(c.fwd_cnt, 10);
    assert_eq!(c.buffered_to_host(), 0);
}

#[test]
fn credit_overrun_resets() {
    let mut c = established(0, 4096);
    let big = vec![0u8; 64 * 1024];
    for _ in 0..(CONN_BUF_ALLOC as usize / big.len()) {
        c.recv_from_guest(&guest_hdr(op::RW, big.len() as u32, 4096, 0), &big);
        assert_eq!(c.state(), ConnState::Established);
    }
    assert_eq!(c.buffered_to_host(), CONN_BUF_ALLOC as usize);
    c.recv_from_guest(&guest_hdr(op::RW, 1, 4096, 0), b"x");
    assert_eq!(c.state(), ConnState::Closed);
    assert_eq!(c.buffered_to_host(), 0, "buffer released");
    assert_eq!(c.next_packet(&mut [0u8; 16]).unwrap().0.op, op::RST);
    assert!(c.is_finished());
}

#[test]
fn orderly_shutdown_from_guest() {
    let mut c = established(2, 4096);
    c.recv_from_guest(&guest_hdr(op::RW, 4, 4096, 0), b"abcd");
    let mut sd = guest_hdr(op::SHUTDOWN, 0, 4096, 0);
    sd.flags = SHUTDOWN_SEND;
    c.recv_from_guest(&sd, &[]);
    assert!(!c.stream.write_shut, "waits for buffered data");
    c.stream.accept = 10;
    c.flush_to_host();
    assert_eq!(c.stream.output, b"abcd");
    assert!(c.stream.write_shut);
    assert_eq!(c.state(), ConnState::Established, "host may still send");
    // Data after SHUTDOWN(SEND) is a protocol error.
    c.recv_from_guest(&guest_hdr(op::RW, 1, 4096, 0), b"x");
    assert_eq!(c.next_packet(&mut [0u8; 16]).unwrap().0.op, op::RST);

    // SHUTDOWN(both): the guest closed; we answer with RST.
    let mut c = established(10, 4096);
    sd.flags = SHUTDOWN_BOTH;
    c.recv_from_guest(&sd, &[]);
    assert_eq!(c.next_packet(&mut [0u8; 16]).unwrap().0.op, op::RST);
    assert!(c.is_finished());
}

#[test]
fn guest_shutdown_rcv_stops_host_reads() {
    let mut c = established(10, 4096);
    c.stream.input.extend(b"data");
    let mut sd = guest_hdr(op::SHUTDOWN, 0, 4096, 0);
    sd.flags = SHUTDOWN_RCV;
    c.recv_from_guest(&sd, &[]);
    assert!(drain(&mut c, &mut [0u8; 64]).is_empty());
    assert_eq!(c.stream.input.len(), 4);
}

#[test]
fn host_eof_sends_shutdown() {
    let mut c = established(10, 4096);
    c.stream.input.extend(b"bye");
    c.stream.input_eof = true;
    let pkts = drain(&mut c, &mut [0u8; 64]);
    let ops: Vec<_> = pkts.iter().map(|h| (h.op, h.flags)).collect();
    assert_eq!(ops, vec![(op::RW, 0), (op::SHUTDOWN, SHUTDOWN_SEND)]);
    // The host closed completely (hang-up): both directions.
    let mut c = established(10, 4096);
    c.stream.input_eof = true;
    c.on_host_event(false, false, true, false);
    let ops: Vec<_> = drain(&mut c, &mut [0u8; 64])
        .iter()
        .map(|h| (h.op, h.flags))
        .collect();
    assert_eq!(ops, vec![(op::SHUTDOWN, SHUTDOWN_BOTH)]);
    // The guest then resets; the connection is done.
    c.recv_from_guest(&guest_hdr(op::RST, 0, 0, 0), &[]);
    assert!(c.is_finished());
}

#[test]
fn host_errors_reset() {
    let mut c = established(10, 4096);
    c.stream.broken = true;
    c.on_host_event(true, false, false, false);
    assert_eq!(c.next_packet(&mut [0u8; 64]).unwrap().0.op, op::RST);
    assert!(c.is_finished());
    let mut c = established(10, 4096);
    c.stream.broken = true;
    c.recv_from_guest(&guest_hdr(op::RW, 1, 4096, 0), b"x");
    assert_eq!(c.next_packet(&mut [0u8; 64]).unwrap().0.op, op::RST);
    let mut c = established(10, 4096);
    c.on_host_event(false, false, false, true);
    assert_eq!(c.next_packet(&mut [0u8; 64]).unwrap().0.op, op::RST);
}

#[test]
fn unexpected_ops_reset_established() {
    for bad in [op::REQUEST, op::RESPONSE, 0, 99] {
        let mut c = established(10, 4096);
        c.recv_from_guest(&guest_hdr(bad, 0, 4096, 0), &[]);
        assert_eq!(c.state(), ConnState::Closed, "op {bad}");
        assert_eq!(c.next_packet(&mut [0u8; 64]).unwrap().0.op, op::RST);
    }
    // After close, further packets are ignored and produce nothing.
    let mut c = established(10, 4096);
    c.recv_from_guest(&guest_hdr(op::RST, 0, 0, 0), &[]);
    c.recv_from_guest(&guest_hdr(op::RW, 1, 4096, 0), b"x");
    assert!(c.next_packet(&mut [0u8; 64]).is_none());
    assert!(c.stream.output.is_empty());
}
