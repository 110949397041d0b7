//! Moving a process's stdio between its pipes (or pty) and attached stdio connections.
//!
//! Output ([`OutStream`]): one pump thread per stream reads the pipe from the moment the process
//! starts. Until a connection attaches, output is kept (up to [`PENDING_LIMIT`], then the pump
//! stops reading and the process blocks on a full pipe, as it would on a slow terminal). At end of
//! output the attached connection is flushed and shut down for writing; only then is the stream
//! `done`, which the process table waits for before it reports the exit.
//!
//! Input ([`StdinSlot`]): an attached connection is copied into the pipe until it ends or
//! `CloseStdin` arrives; either closes the process's stdin.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Output kept for a stream nobody has attached to yet.
pub const PENDING_LIMIT: usize = 256 * 1024;

const CHUNK: usize = 64 * 1024;

/// Attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Someone already attached to this stream.
    #[error("stream already attached")]
    AlreadyAttached,
    /// Writing the `AttachOk` frame to the new connection failed.
    #[error("sending AttachOk: {0}")]
    Greeting(#[source] std::io::Error),
    /// Stdin was already closed.
    #[error("stdin already closed")]
    Closed,
    /// Creating the eventfd that lets `CloseStdin` stop the copier failed.
    #[error("creating the stdin cancel eventfd: {0}")]
    Cancel(#[source] std::io::Error),
}

/// Shuts down one direction of a socket given as a file (ignoring errors: the peer may be gone).
pub fn shutdown(f: &File, how: Shutdown) {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown on a descriptor we own; fails harmlessly if it is not a socket.
    unsafe { libc::shutdown(f.as_raw_fd(), how) };
}

/// Ends an output connection. Both directions: a pty connection's input side is useless once
/// the terminal is gone, and some hybrid-vsock bridges forward only a full close, not a
/// half-close, to the host.
fn end_of_output(conn: &File) {
    shutdown(conn, Shutdown::Both);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a stream's output goes.
#[derive(Default)]
enum Sink {
    /// Nobody attached yet: output is kept in `pending`.
    #[default]
    Unattached,
    /// A thread is writing to the connection without the lock; others wait.
    Busy,
    /// Attached and idle.
    Ready(File),
    /// The connection was closed (end of output, or the reader went away): output is dropped.
    Closed,
}

#[derive(Default)]
struct OutState {
    pending: Vec<u8>,
    sink: Sink,
    eof: bool,
    done: bool,
}

/// One output stream (stdout, stderr, or a pty's output).
pub struct OutStream {
    state: Mutex<OutState>,
    cond: Condvar,
    on_done: Box<dyn Fn() + Send + Sync>,
}

impl OutStream {
    /// Starts the pump thread on `source`; `on_done` runs once all output is delivered.
    pub fn start(
        name: String,
        source: OwnedFd,
        on_done: Box<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Arc<OutStream>> {
        let stream = Arc::new(OutStream {
            state: Mutex::new(OutState::default()),
            cond: Condvar::new(),
            on_done,
        });
        let pump = stream.clone();
        std::thread::Builder::new()
            .name(name)
            .stack_size(64 * 1024)
            .spawn(move || pump.pump(File::from(source)))?;
        Ok(stream)
    }

    /// Whether all output reached its connection (or there was none attached at the end).
    pub fn is_done(&self) -> bool {
        lock(&self.state).done
    }

    fn wait<'a>(&self, g: MutexGuard<'a, OutState>) -> MutexGuard<'a, OutState> {
        self.cond.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    fn pump(&self, mut source: File) {
        let mut chunk = vec![0u8; CHUNK];
        loop {
            let n = match source.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO: the pty's last slave descriptor closed.
                Err(_) => break,
            };
            self.deliver(&chunk[..n]);
        }
        drop(source);
        let mut st = lock(&self.state);
        st.eof = true;
        loop {
            match std::mem::take(&mut st.sink) {
                Sink::Busy => {
                    st.sink = Sink::Busy;
                    st = self.wait(st);
                }
                Sink::Ready(mut conn) => {
                    st.sink = Sink::Closed;
                    let pending = std::mem::take(&mut st.pending);
                    drop(st);
                    let _ = conn.write_all(&pending);
                    end_of_output(&conn);
                    st = lock(&self.state);
                    break;
                }
                // Unattached: the pending output waits for a late attach.
                other => {
                    st.sink = other;
                    break;
                }
            }
        }
        st.done = true;
        drop(st);
        self.cond.notify_all();
        (self.on_done)();
    }

    /// Writes `pending` then `data` to the attached connection (lock released meanwhile).
    fn write_out<'a>(
        &'a self,
        mut st: MutexGuard<'a, OutState>,
        mut conn: File,
        data: &[u8],
    ) -> MutexGuard<'a, OutState> {
        st.sink = Sink::Busy;
        let pending = std::mem::take(&mut st.pending);
        drop(st);
        let ok = conn.write_all(&pending).and_then(|_| conn.write_all(data));
        let mut st = lock(&self.state);
        st.sink = if ok.is_ok() {
            Sink::Ready(conn)
        } else {
            Sink::Closed
        };
        self.cond.notify_all();
        st
    }

    fn deliver(&self, data: &[u8]) {
        let mut st = lock(&self.state);
        loop {
            match std::mem::take(&mut st.sink) {
                Sink::Ready(conn) => {
                    drop(self.write_out(st, conn, data));
                    return;
                }
                Sink::Busy => {
                    st.sink = Sink::Busy;
                    st = self.wait(st);
                }
                Sink::Closed => {
                    st.sink = Sink::Closed;
                    return;
                }
                Sink::Unattached => {
                    if st.pending.len() + data.len() <= PENDING_LIMIT {
                        st.pending.extend_from_slice(data);
                        return;
                    }
                    // Full: block (and so the process) until someone attaches.
                    st = self.wait(st);
                }
            }
        }
    }

    /// Whether a connection was attached already.
    pub fn is_attached(&self) -> bool {
        !matches!(lock(&self.state).sink, Sink::Unattached)
    }

    /// Attaches a connection. Output kept so far is written to it first, by the caller (so this
    /// blocks until the peer has taken it).
    #[cfg(test)]
    pub fn attach(&self, conn: File) -> Result<(), AttachError> {
        self.attach_greeted(conn, |_| Ok(()))
    }

    /// Like `attach`, but first writes `greet` (the `AttachOk` frame) to `conn`
    /// while the stream is still locked, so a racing second attach can never be told OK too.
    pub fn attach_greeted(
        &self,
        mut conn: File,
        greet: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<(), AttachError> {
        let mut st = lock(&self.state);
        if !matches!(st.sink, Sink::Unattached) {
            return Err(AttachError::AlreadyAttached);
        }
        greet(&mut conn).map_err(AttachError::Greeting)?;
        if st.eof {
            st.sink = Sink::Closed;
            let pending = std::mem::take(&mut st.pending);
            drop(st);
            let mut conn = conn;
            let _ = conn.write_all(&pending);
            end_of_output(&conn);
            return Ok(());
        }
        drop(self.write_out(st, conn, &[]));
        Ok(())
    }
}

struct StdinState {
    target: Option<File>,
    attached: bool,
    closed: bool,
    /// An eventfd the attached copier polls beside its connection; `close` signals it.
    cancel: Option<Arc<OwnedFd>>,
}

/// The process's stdin (pipe write end or pty master duplicate).
pub struct StdinSlot {
    state: Mutex<StdinState>,
    /// For a pty, closing stdin sends the EOF character instead of closing the descriptor.
    pty: bool,
}

impl StdinSlot {
    /// Wraps the write side of a process's stdin.
    pub fn new(target: OwnedFd, pty: bool) -> Arc<StdinSlot> {
        Arc::new(StdinSlot {
            state: Mutex::new(StdinState {
                target: Some(File::from(target)),
                attached: false,
                closed: false,
                cancel: None,
            }),
            pty,
        })
    }

    /// Whether stdin can no longer be attached (attached before, or closed).
    pub fn is_taken(&self) -> bool {
        let st = lock(&self.state);
        st.attached || st.closed
    }

    /// Starts copying `conn` into stdin on a new thread.
    pub fn attach(self: &Arc<Self>, conn: File) -> Result<(), AttachError> {
        self.attach_greeted(conn, |_| Ok(()))
    }

    /// Like [`StdinSlot::attach`], but first writes `greet` (the `AttachOk` frame) to `conn`
    /// while the slot is still locked, so a racing second attach can never be told OK too.
    pub fn attach_greeted(
        self: &Arc<Self>,
        mut conn: File,
        greet: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<(), AttachError> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(AttachError::Closed);
        }
        if st.attached {
            return Err(AttachError::AlreadyAttached);
        }
        let cancel = Arc::new(eventfd().map_err(AttachError::Cancel)?);
        greet(&mut conn).map_err(AttachError::Greeting)?;
        let Some(mut target) = st.target.take() else {
            return Err(AttachError::Closed);
        };
        st.attached = true;
        st.cancel = Some(cancel.clone());
        drop(st);
        let slot = self.clone();
        let spawned = std::thread::Builder::new()
            .name("stdin".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                copy_until_cancelled(&mut conn, &mut target, &cancel);
                if slot.pty {
                    let _ = target.write_all(&[4]);
                }
                drop(target);
                let mut st = lock(&slot.state);
                st.closed = true;
                st.cancel = None;
            });
        if spawned.is_err() {
            lock(&self.state).closed = true;
        }
        Ok(())
    }

    /// Closes stdin: at once if nobody is attached, else by ending the attached copier.
    pub fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        if let Some(mut target) = st.target.take() {
            if self.pty {
                let _ = target.write_all(&[4]);
            }
        }
        if let Some(cancel) = st.cancel.take() {
            signal(&cancel);
        }
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(efd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an eventfd we hold.
    unsafe { libc::write(efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Waits until `fd` is ready for `events` or `cancel` fires; false when cancelled or on error.
fn wait_ready(fd: &File, events: libc::c_short, cancel: &OwnedFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: cancel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// Polls one fd for `events` for at most `timeout_ms` (-1: no limit); true when it is ready
/// (or in error or hung up, which the following read or write then reports).
fn poll_one(fd: &File, events: libc::c_short, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one live pollfd entry.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return rc > 0;
    }
}

/// After `CloseStdin`, how long the copier still waits for more input on the connection: the
/// host's last bytes travel on the stdin connection, `CloseStdin` on the control connection, and
/// the latter can arrive first (vsock queues are independent; under emulation by many ms).
const DRAIN_GRACE_MS: libc::c_int = 250;

/// Copies `conn` into `target` until the connection ends, a write fails, or `cancel` fires.
/// It never blocks anywhere but in `poll`, so `CloseStdin` ends it however it is stuck (a
/// blocked read or splice is not reliably woken by shutting the socket down). Writes are at
/// most `PIPE_BUF` bytes after `POLLOUT`, which a pipe or pty takes without blocking.
///
/// Once cancelled, what the connection already holds is still delivered (the host sends its
/// input, half-closes, then `CloseStdin`, which can overtake the last bytes): the copier reads
/// while data keeps coming (at most [`DRAIN_GRACE_MS`] apart), stops at the first quiet gap or
/// the connection's end, and finishes its writes waiting for the target alone (a process that
/// never reads ends them by exiting).
fn copy_until_cancelled(conn: &mut File, target: &mut File, cancel: &OwnedFd) {
    let mut buf = [0u8; libc::PIPE_BUF];
    let mut draining = false;
    loop {
        if !draining && !wait_ready(conn, libc::POLLIN, cancel) {
            draining = true;
        }
        if draining && !poll_one(conn, libc::POLLIN, DRAIN_GRACE_MS) {
            return;
        }
        let n = match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            if !draining && !wait_ready(target, libc::POLLOUT, cancel) {
                draining = true;
            }
            if draining && !poll_one(target, libc::POLLOUT, -1) {
                return;
            }
            match target.write(chunk) {
                Ok(0) => return,
                Ok(w) => chunk = &chunk[w..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn pipe() -> (File, OwnedFd) {
        let (r, w) = crate::spawn::pipe().unwrap();
        (File::from(w), r)
    }

    fn stream(source: OwnedFd) -> (Arc<OutStream>, Arc<AtomicUsize>) {
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let s = OutStream::start(
            "test".into(),
            source,
            Box::new(move || {
                d.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        (s, done)
    }

    fn read_to_end(mut s: UnixStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn output_written_before_attach_is_delivered_at_attach() {
        let (mut w, r) = pipe();
        let (s, done) = stream(r);
        w.write_all(b"early ").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (ours, theirs) = UnixStream::pair().unwrap();
        s.attach(File::from(OwnedFd::from(ours))).unwrap();
        // Delivered at once, not only with the next write.
        let mut buf = [0u8; 6];
        let mut theirs_r = theirs.try_clone().unwrap();
        theirs_r
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        theirs_r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"early ");
        w.write_all(b"late").unwrap();
        drop(w);
        assert_eq!(read_to_end(theirs), b"late");
        // The connection ends just before the stream is marked done and `on_done` runs: wait
        // (bounded) for that.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while done.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(s.is_done());
        assert_eq!(done.load(Ordering::SeqCst), 1);
        let (again, _) = UnixStream::pair().unwrap();
        assert!(s.attach(File::from(OwnedFd::from(again))).is_err());
    }

    #[test]
    fn attach_after_end_of_output_gets_everything() {
        let (mut w, r) = pipe();
        let (s, done) = stream(r);
        w.write_all(b"all of it").unwrap();
        drop(w);
        while done.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(s.is_done());
        let (ours, theirs) = UnixStream::pair().unwrap();
        s.attach(File::from(OwnedFd::from(ours))).unwrap();
        assert_eq!(read_to_end(theirs), b"all of it");
    }

    #[test]
    fn unattached_output_blocks_at_the_limit_then_flows() {
        let (mut w, r) = pipe();
        let (s, _) = stream(r);
        let total = PENDING_LIMIT * 3;
        let writer = std::thread::spawn(move || {
            w.write_all(&vec![7u8; total]).unwrap();
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !writer.is_finished(),
            "the writer should block without a reader"
        );
        let (ours, theirs) = UnixStream::pair().unwrap();
        // attach() writes the kept output itself, so the reader must already run.
        let reader = std::thread::spawn(move || read_to_end(theirs));
        s.attach(File::from(OwnedFd::from(ours))).unwrap();
        let got = reader.join().unwrap();
        writer.join().unwrap();
        assert_eq!(got.len(), total);
    }

    #[test]
    fn close_after_the_input_still_delivers_it() {
        // The host's order: input, half-close, CloseStdin. The close must not drop what the
        // connection still holds (it did: `wc -c` through host-vmm counted 0 of 5 bytes).
        for _ in 0..50 {
            let (w, r) = pipe();
            let slot = StdinSlot::new(OwnedFd::from(w), false);
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            slot.attach(File::from(OwnedFd::from(ours))).unwrap();
            let input: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
            theirs.write_all(&input).unwrap();
            theirs.shutdown(Shutdown::Write).unwrap();
            slot.close();
            let (tx, rx) = std::sync::mpsc::channel();
            let mut reader = File::from(r);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = tx.send(reader.read_to_end(&mut got).map(|_| got));
            });
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("stdin still open 10 s after close")
                .unwrap();
            assert_eq!(got, input);
        }
    }

    #[test]
    fn close_ends_stdin_even_while_attached() {
        let (w, r) = pipe();
        let slot = StdinSlot::new(OwnedFd::from(w), false);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        slot.attach(File::from(OwnedFd::from(ours))).unwrap();
        theirs.write_all(b"abc").unwrap();
        let mut reader = File::from(r);
        let mut buf = [0u8; 3];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        slot.close();
        // A bounded wait: a copier that ignores the close must fail the test, not hang it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = tx.send(reader.read_to_end(&mut rest).map(|_| rest));
        });
        let rest = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("stdin still open 10 s after close")
            .unwrap();
        assert!(rest.is_empty());
        assert!(slot.is_taken());
    }
}
