//! Byte relays between the host's stdio (the fds the client gave `create`/`exec`, or a host pty
//! slave) and the agent's stdio connections. One thread per direction; plain blocking copies.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// Copies `from` into `to` until end of input, flushing after every chunk (a container's output
/// must reach the client as it is produced). Errors end the copy quietly: the reader or the
/// guest is gone.
fn pump(mut from: impl Read, mut to: impl Write) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
            break;
        }
        total += n as u64;
    }
    total
}

/// Host input → guest: copies `input` into `stream` and then closes the stream for writing, which
/// closes the process's stdin in the guest.
pub fn spawn_input(name: &str, input: File, stream: UnixStream) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("in-{name}"))
        .spawn(move || {
            let writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            pump(input, &writer);
            let _ = stream.shutdown(Shutdown::Write);
        })
}

/// Guest output → host: copies `stream` into `output` until the agent closes the stream.
pub fn spawn_output(name: &str, stream: UnixStream, output: File) -> io::Result<JoinHandle<u64>> {
    std::thread::Builder::new()
        .name(format!("out-{name}"))
        .spawn(move || pump(stream, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_input_relays_copy_everything_and_close() {
        let (guest, host_side) = UnixStream::pair().unwrap();
        let (mut reader, writer) = UnixStream::pair().unwrap();
        let writer: File = std::os::fd::OwnedFd::from(writer).into();
        let t = spawn_output("stdout", host_side, writer).unwrap();
        let r = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        let data = vec![7u8; 300_000];
        let mut g = guest;
        let d2 = data.clone();
        let w = std::thread::spawn(move || {
            g.write_all(&d2).unwrap();
        });
        w.join().unwrap();
        assert_eq!(t.join().unwrap(), data.len() as u64);
        assert_eq!(r.join().unwrap(), data);

        let (mut guest_in, host_in) = UnixStream::pair().unwrap();
        let (src_r, mut src_w) = UnixStream::pair().unwrap();
        let src: File = std::os::fd::OwnedFd::from(src_r).into();
        let t = spawn_input("stdin", src, host_in).unwrap();
        src_w.write_all(b"hello").unwrap();
        drop(src_w);
        t.join().unwrap();
        let mut got = Vec::new();
        guest_in.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
    }
}
