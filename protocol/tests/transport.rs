//! Hybrid vsock handshake and stdio attach against a fake VMM listening on a unix socket.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kiln_protocol::codec::read_frame_body;
use kiln_protocol::handshake::{open_connection, Opening};
use kiln_protocol::transport::{
    hybrid_vsock_attach, hybrid_vsock_connect, hybrid_vsock_connect_retry, TransportError,
};
use kiln_protocol::{write_frame, AgentMessage, ErrorKind, ErrorReply, StdioStream};

/// A socket path in a fresh directory under the system temp dir, removed on drop.
struct TempSocket {
    dir: PathBuf,
    path: PathBuf,
}

impl std::ops::Deref for TempSocket {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn socket_path(name: &str) -> TempSocket {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-protocol-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempSocket {
        path: dir.join(name),
        dir,
    }
}

/// Reads the `CONNECT <port>\n` line byte by byte.
fn read_connect_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// A fake VMM accepting one connection and answering the CONNECT line with `reply`, then
/// running `then` on the stream.
fn fake_vmm(
    reply: &'static [u8],
    then: impl FnOnce(UnixStream) + Send + 'static,
) -> (TempSocket, thread::JoinHandle<String>) {
    let path = socket_path("vsock.sock");
    let listener = UnixListener::bind(&*path).unwrap();
    let vmm = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let line = read_connect_line(&mut s);
        s.write_all(reply).unwrap();
        then(s);
        line
    });
    (path, vmm)
}

#[test]
fn connect_sends_the_port_and_leaves_stream_bytes_unread() {
    // The VMM answers OK and the guest's first bytes arrive in the same write.
    let (path, vmm) = fake_vmm(b"OK 1073741824\nguest bytes", |_| {});
    let mut stream = hybrid_vsock_connect(&path, 1024).unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "guest bytes");
    assert_eq!(vmm.join().unwrap(), "CONNECT 1024");
}

#[test]
fn bad_replies_are_clear_errors() {
    let (path, _vmm) = fake_vmm(b"", drop);
    let err = hybrid_vsock_connect(&path, 1024).unwrap_err();
    assert!(
        matches!(err, TransportError::NotListening { port: 1024, .. }),
        "{err}"
    );
    assert!(err.is_retryable());

    let (path, _vmm) = fake_vmm(b"NOPE\n", |_| {});
    let err = hybrid_vsock_connect(&path, 1024).unwrap_err();
    assert!(matches!(err, TransportError::BadReply { ref line, .. } if line == "NOPE"));
    assert!(!err.is_retryable());

    let (path, _vmm) = fake_vmm(b"OK x\n", |_| {});
    assert!(matches!(
        hybrid_vsock_connect(&path, 1024),
        Err(TransportError::BadReply { .. })
    ));

    let (path, _vmm) = fake_vmm(&[b'O'; 200], |_| {});
    assert!(matches!(
        hybrid_vsock_connect(&path, 1024),
        Err(TransportError::ReplyTooLong { .. })
    ));

    let missing = socket_path("missing.sock");
    let err = hybrid_vsock_connect(&missing, 1024).unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }));
    assert!(err.to_string().contains("missing.sock"), "{err}");
}

#[test]
fn retry_waits_for_the_socket_to_appear() {
    let path = socket_path("late.sock");
    let bind_path = path.to_path_buf();
    let vmm = thread::spawn(move || {
        thread::sleep(Duration::from_millis(150));
        let listener = UnixListener::bind(&bind_path).unwrap();
        // First attempt: guest not listening yet (closed without OK); second: OK.
        let (mut s, _) = listener.accept().unwrap();
        read_connect_line(&mut s);
        drop(s);
        let (mut s, _) = listener.accept().unwrap();
        read_connect_line(&mut s);
        s.write_all(b"OK 5\n").unwrap();
        s
    });
    let started = Instant::now();
    hybrid_vsock_connect_retry(&path, 1024, Duration::from_secs(5)).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    vmm.join().unwrap();

    let nowhere = socket_path("never.sock");
    let err = hybrid_vsock_connect_retry(&nowhere, 1024, Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, TransportError::GaveUp { .. }), "{err}");
}

#[test]
fn attach_then_raw_bytes() {
    let (path, _vmm) = fake_vmm(b"OK 7\n", |mut s| {
        let body = read_frame_body(&mut s).unwrap();
        match open_connection(&body).unwrap() {
            Opening::Stdio(attach) => {
                assert_eq!(attach.container_id, "c");
                assert_eq!(attach.exec_id, "e");
                assert_eq!(attach.stream, StdioStream::Stdout);
            }
            other => panic!("expected Attach, got {other:?}"),
        }
        write_frame(&mut s, &AgentMessage::AttachOk).unwrap();
        s.write_all(b"raw output").unwrap();
    });
    let mut stream = hybrid_vsock_attach(&path, 1024, "c", "e", StdioStream::Stdout).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    assert_eq!(out, "raw output");
}

#[test]
fn attach_refused() {
    let (path, _vmm) = fake_vmm(b"OK 7\n", |mut s| {
        read_frame_body(&mut s).unwrap();
        let reply = ErrorReply::new(ErrorKind::NotFound, "no process e");
        write_frame(&mut s, &AgentMessage::Error(reply)).unwrap();
    });
    match hybrid_vsock_attach(&path, 1024, "c", "e", StdioStream::Stdin) {
        Err(TransportError::AttachRefused { reply, stream, .. }) => {
            assert_eq!(reply.kind, ErrorKind::NotFound);
            assert_eq!(stream, StdioStream::Stdin);
        }
        other => panic!("expected AttachRefused, got {other:?}"),
    }
}
