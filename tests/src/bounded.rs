//! Bounded waits for tests: nothing a test waits on may block forever.
//!
//! A hung test used to hang the whole CI run (one blocked read or wait, and `cargo test` never
//! ends). Every wait of a test goes through one of these instead, so a hang becomes a test
//! failure with a message naming what was awaited, within minutes:
//! - [`Watchdog`]: kills a process (an agent, a VM, QEMU) when it is still alive after a limit,
//!   which unblocks everything waiting on it (its sockets close, its pipes end, waits return);
//! - [`wait_child`] / [`wait_output`]: wait for a child process with a deadline, killing it on
//!   expiry;
//! - [`output`] / [`status`]: `Command::output` / `status` with a deadline;
//! - [`join`]: join a thread with a deadline; [`accept`]: accept a connection with a deadline;
//! - [`read_to_end`]: read a socket to its end with a read timeout.
//!
//! This module must not change what tests assert: on success every helper returns what the
//! unbounded call would have returned.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A generous default limit for one wait of a test that normally takes seconds.
pub const WAIT: Duration = Duration::from_secs(120);

/// The limit for one command that boots a Linux VM (a boot takes minutes on a PVM host).
pub const VM_WAIT: Duration = Duration::from_secs(600);

/// How often the polling waits look again.
const POLL: Duration = Duration::from_millis(5);

/// Kills a process when it is still alive after a limit; cancelled (joined) on drop.
///
/// The process is held by a pidfd taken at creation, so a late kill can never hit another
/// process that reused the pid after the child was reaped.
#[derive(Debug)]
pub struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `child`: after `limit` it is sent SIGKILL, with a message naming `what`.
    pub fn kill_after(child: &Child, limit: Duration, what: &str) -> Watchdog {
        Watchdog::kill_pid_after(child.id(), limit, what)
    }

    /// Like [`Watchdog::kill_after`] for a process id (which must be a live child of this
    /// process or otherwise not reaped before the watchdog is dropped).
    pub fn kill_pid_after(pid: u32, limit: Duration, what: &str) -> Watchdog {
        let pidfd = pidfd_open(pid);
        let what = what.to_string();
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kiln-test-watchdog".into())
            .spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    eprintln!(
                        "\n!!! TEST HANG: {what} still running after {limit:?}: killing process \
                         {pid} so the test fails instead of blocking forever\n"
                    );
                    kill(pid, pidfd);
                }
                if let Some(fd) = pidfd {
                    // SAFETY: `fd` is the pidfd this thread owns; closed exactly once.
                    unsafe { libc::close(fd) };
                }
            })
            .expect("spawning a watchdog thread");
        Watchdog {
            cancel: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pidfd_open(pid: u32) -> Option<libc::c_int> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    libc::c_int::try_from(fd).ok().filter(|fd| *fd >= 0)
}

fn kill(pid: u32, pidfd: Option<libc::c_int>) {
    match pidfd {
        Some(fd) => {
            // SAFETY: `fd` is a valid pidfd; a null siginfo is allowed; no memory is shared.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
        None => {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Waits for `child` at most `limit`. On expiry kills and reaps it and panics naming `what`.
pub fn wait_child(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("TEST HANG: {what} did not exit within {limit:?} (killed)");
        }
        std::thread::sleep(POLL);
    }
}

/// `child.wait_with_output()` with a deadline: kills the child and panics naming `what` when it
/// has not exited within `limit`. Its output pipes may stay open a little longer
/// ([`PIPE_GRACE`]); a process that inherited them and lives on (a daemon) cannot hang the
/// test: what was read by then is returned.
pub fn wait_output(mut child: Child, limit: Duration, what: &str) -> Output {
    let out = Collector::start(child.stdout.take());
    let err = Collector::start(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => panic!("waiting for {what}: {e}"),
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "TEST HANG: {what} did not exit within {limit:?} (killed); output so far:\n{}\n{}",
                String::from_utf8_lossy(&out.finish(Instant::now())),
                String::from_utf8_lossy(&err.finish(Instant::now()))
            );
        }
        std::thread::sleep(POLL);
    };
    let grace = Instant::now() + PIPE_GRACE;
    Output {
        status,
        stdout: out.finish(grace),
        stderr: err.finish(grace),
    }
}

/// How long output pipes may stay open after their process exited.
pub const PIPE_GRACE: Duration = Duration::from_secs(10);

/// A thread reading a pipe into a buffer that can be taken before the pipe ends.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Collector {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let acc = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let Some(mut pipe) = pipe else { return };
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                acc.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Collector { buf, thread }
    }

    /// What was read, once the pipe ended or `deadline` passed.
    fn finish(&self, deadline: Instant) -> Vec<u8> {
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        self.buf.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `cmd.output()` with a deadline: stdin is null, stdout and stderr are captured; the child is
/// killed and the test panics naming `what` when it has not finished within `limit`.
pub fn output(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    wait_output(child, limit, what)
}

/// `cmd.status()` with a deadline (stdio inherited, as `status()` does); kills the child and
/// panics naming `what` when it has not exited within `limit`.
pub fn status(cmd: &mut Command, limit: Duration, what: &str) -> ExitStatus {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    wait_child(&mut child, limit, what)
}

/// Accepts one connection on `listener` within `limit`; panics naming `what` on expiry. The
/// accepted stream is blocking, as from `accept()`.
pub fn accept(listener: &UnixListener, limit: Duration, what: &str) -> UnixStream {
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("making the listener for {what} non-blocking: {e}"));
    let start = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < limit,
                    "TEST HANG: no connection from {what} within {limit:?}"
                );
                std::thread::sleep(POLL);
            }
            Err(e) => panic!("accepting {what}: {e}"),
        }
    };
    listener
        .set_nonblocking(false)
        .unwrap_or_else(|e| panic!("making the listener for {what} blocking again: {e}"));
    stream
        .set_nonblocking(false)
        .unwrap_or_else(|e| panic!("making the connection from {what} blocking: {e}"));
    stream
}

/// Joins `handle` at most `limit`; panics naming `what` on expiry (the thread is left behind)
/// and re-raises the thread's panic.
pub fn join<T>(handle: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let start = Instant::now();
    while !handle.is_finished() {
        assert!(
            start.elapsed() < limit,
            "TEST HANG: {what} did not finish within {limit:?}"
        );
        std::thread::sleep(POLL);
    }
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Reads `s` to its end, each read waiting at most `limit`; panics naming `what` on a timeout.
pub fn read_to_end(mut s: &UnixStream, limit: Duration, what: &str) -> Vec<u8> {
    s.set_read_timeout(Some(limit))
        .unwrap_or_else(|e| panic!("setting a read timeout on {what}: {e}"));
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            panic!(
                "TEST HANG: no end of {what} within {limit:?} (got {} bytes: {:?})",
                out.len(),
                String::from_utf8_lossy(&out)
            );
        }
        panic!("reading {what}: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_kills_a_hanging_child() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let dog = Watchdog::kill_after(&child, Duration::from_millis(100), "sleep 30");
        let t = Instant::now();
        let status = child.wait().expect("wait");
        drop(dog);
        assert!(!status.success());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn watchdog_leaves_a_quick_child_alone() {
        let mut child = Command::new("true").spawn().expect("true");
        let dog = Watchdog::kill_after(&child, Duration::from_secs(30), "true");
        assert!(child.wait().expect("wait").success());
        let t = Instant::now();
        drop(dog);
        assert!(t.elapsed() < Duration::from_secs(1), "drop cancels at once");
    }

    #[test]
    fn wait_child_times_out_with_a_clear_panic() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_child(&mut child, Duration::from_millis(100), "sleep 30")
        }));
        let msg = *r.expect_err("timed out").downcast::<String>().unwrap();
        assert!(msg.contains("sleep 30 did not exit"), "{msg}");
        assert!(child.try_wait().unwrap().is_some(), "killed and reaped");
    }

    #[test]
    fn wait_output_returns_the_output() {
        let child = Command::new("echo")
            .arg("hi")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(child, Duration::from_secs(30), "echo");
        assert_eq!(out.stdout, b"hi\n");
    }

    #[test]
    fn wait_output_does_not_wait_for_a_grandchild_holding_the_pipe() {
        let child = Command::new("sh")
            .args(["-c", "echo out; sleep 30 & exit 3"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let out = wait_output(child, Duration::from_secs(60), "sh");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert!(t.elapsed() < PIPE_GRACE + Duration::from_secs(5));
    }

    #[test]
    fn join_and_read_time_out() {
        let (tx, rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || rx.recv().is_err());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            join(h, Duration::from_millis(50), "a blocked thread")
        }));
        assert!(r.is_err());
        drop(tx);

        let (a, b) = UnixStream::pair().unwrap();
        let r = std::panic::catch_unwind(|| read_to_end(&a, Duration::from_millis(50), "a"));
        assert!(r.is_err());
        drop(b);
        assert!(read_to_end(&a, Duration::from_millis(50), "a").is_empty());
    }
}
