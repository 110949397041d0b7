//! The VMM event loop: one thread (the main thread) waiting in `epoll_wait` on every device
//! eventfd, with no timeouts. It serves virtio queue notifications (KVM ioeventfds), devices'
//! own host fds, console input from stdin, and the exit eventfd that ends the VM.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::devices::serial::SerialConsole;
use crate::devices::virtio::MmioTransport;
use crate::exit::ExitHandle;

const TOKEN_EXIT: u64 = u64::MAX;
const TOKEN_STDIN: u64 = u64::MAX - 1;
/// Queue-index value of a device token that means "the device's host fd".
const HOST_EVENT: u64 = 0xffff;

fn device_token(device: usize, queue: u64) -> u64 {
    ((device as u64) << 16) | queue
}

/// Devices served by the loop.
pub struct EventLoop {
    epoll: Epoll,
    exit: ExitHandle,
    serial: Arc<Mutex<SerialConsole>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl EventLoop {
    /// Registers the exit eventfd, every virtio queue and host fd, and (when `console_input`)
    /// stdin. A stdin that epoll refuses (a regular file, /dev/null) is simply not forwarded.
    pub fn new(
        exit: ExitHandle,
        serial: Arc<Mutex<SerialConsole>>,
        virtio: Vec<Arc<Mutex<MmioTransport>>>,
        console_input: bool,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
        for (i, dev) in virtio.iter().enumerate() {
            let dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            for (q, evt) in dev.queue_evts().iter().enumerate() {
                add(evt.as_raw_fd(), device_token(i, q as u64))?;
            }
            if let Some(fd) = dev.host_event_fd() {
                add(fd, device_token(i, HOST_EVENT))?;
            }
        }
        if console_input {
            if let Err(e) = add(libc::STDIN_FILENO, TOKEN_STDIN) {
                log::debug!("console input not forwarded: stdin cannot be polled: {e}");
            }
        }
        Ok(Self {
            epoll,
            exit,
            serial,
            virtio,
        })
    }

    /// Serves events until the VM is asked to stop.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit.eventfd().read();
                        return Ok(());
                    }
                    TOKEN_STDIN => self.forward_stdin(),
                    token => self.serve_device((token >> 16) as usize, token & 0xffff),
                }
            }
            if self.exit.is_stopping() {
                return Ok(());
            }
        }
    }

    fn serve_device(&mut self, index: usize, queue: u64) {
        let Some(dev) = self.virtio.get(index) else {
            return;
        };
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        if queue == HOST_EVENT {
            dev.process_host_event();
            return;
        }
        let q = queue as usize;
        if let Some(evt) = dev.queue_evts().get(q) {
            // Drains the counter; EAGAIN (already drained) is harmless.
            let _ = evt.read();
            dev.process_queue(q);
        }
    }

    fn forward_stdin(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = [0u8; 64];
        // SAFETY: reads at most `buf.len()` bytes into a live local buffer from fd 0. A raw read
        // (not `io::stdin()`, which buffers) keeps epoll readiness and our view in step.
        let r = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(r) {
            Ok(0) | Err(_) => {
                // EOF or error: stop watching stdin (the guest simply gets no more input).
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    libc::STDIN_FILENO,
                    EpollEvent::default(),
                );
            }
            Ok(n) => {
                let taken = serial.enqueue_input(&buf[..n]);
                if taken < n {
                    log::debug!(
                        "serial: receive FIFO full, dropped {} input bytes",
                        n - taken
                    );
                }
            }
        }
    }
}
