//! The 8250 UART on COM1 (0x3f8, IRQ 4), backed by vm-superio, with the guest's console output
//! forwarded to stdout.
//!
//! The interrupt is an eventfd registered as a KVM irqfd. Output is buffered and flushed at
//! each newline, when the buffer fills, when the guest writes the interrupt-enable register
//! (Linux does so at the end of every console write and when its TX queue drains, so prompts
//! without a newline still appear) and when the VM stops.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Interrupt-enable register offset.
const IER_OFFSET: u64 = 1;
/// Flush the output buffer when it holds this much.
const OUTPUT_BUFFER: usize = 4096;

/// An eventfd used as the UART's interrupt line.
pub struct IrqEventFd(pub EventFd);

impl Trigger for IrqEventFd {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest console goes.
pub enum ConsoleOutput {
    /// Buffered to the process's stdout.
    Stdout(Vec<u8>),
    /// Discarded (`--console off`).
    Sink,
    /// Kept in memory (tests).
    Capture(Vec<u8>),
    /// Buffered to the process's stderr (`host-vmm --console on -- CMD`: stdout is the
    /// command's).
    Stderr(Vec<u8>),
    /// Only the last bytes kept, for an error message (`host-vmm -- CMD` without a console).
    Tail(ConsoleTail),
}

/// The last [`ConsoleTail::CAPACITY`] bytes of console output, shared with whoever reports a
/// failed boot. Bounded: the guest cannot make the host hold more.
#[derive(Debug, Clone, Default)]
pub struct ConsoleTail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>);

impl ConsoleTail {
    /// Bytes kept.
    pub const CAPACITY: usize = 16 * 1024;

    fn push(&self, data: &[u8]) {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let data = &data[data.len().saturating_sub(Self::CAPACITY)..];
        let excess = (buf.len() + data.len()).saturating_sub(Self::CAPACITY);
        buf.drain(..excess);
        buf.extend(data);
    }

    /// The kept bytes, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        buf.iter().copied().collect()
    }
}

impl ConsoleOutput {
    /// Stdout with an empty buffer.
    pub fn stdout() -> Self {
        ConsoleOutput::Stdout(Vec::with_capacity(OUTPUT_BUFFER))
    }

    /// Writes buffered bytes to stdout. Errors (a closed stdout) drop the output: the guest
    /// must not stall because nobody reads its console.
    pub fn flush_now(&mut self) {
        match self {
            ConsoleOutput::Stdout(buf) if !buf.is_empty() => {
                let mut out = io::stdout().lock();
                let _ = out.write_all(buf).and_then(|()| out.flush());
                buf.clear();
            }
            ConsoleOutput::Stderr(buf) if !buf.is_empty() => {
                let mut out = io::stderr().lock();
                let _ = out.write_all(buf).and_then(|()| out.flush());
                buf.clear();
            }
            _ => {}
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOutput::Stdout(buf) | ConsoleOutput::Stderr(buf) => {
                buf.extend_from_slice(data);
                if buf.len() >= OUTPUT_BUFFER || data.contains(&b'\n') {
                    self.flush_now();
                }
            }
            ConsoleOutput::Capture(buf) => buf.extend_from_slice(data),
            ConsoleOutput::Tail(tail) => tail.push(data),
            ConsoleOutput::Sink => {}
        }
        Ok(data.len())
    }

    /// vm-superio flushes after every byte; buffering is handled in `write` instead.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1.
pub struct SerialConsole {
    serial: Serial<IrqEventFd, NoEvents, ConsoleOutput>,
}

impl SerialConsole {
    /// A UART raising `irq_evt` and writing to `out`.
    pub fn new(irq_evt: EventFd, out: ConsoleOutput) -> Self {
        Self {
            serial: Serial::new(IrqEventFd(irq_evt), out),
        }
    }

    /// Free room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes buffered console output.
    pub fn flush(&mut self) {
        self.serial.writer_mut().flush_now();
    }

    /// The output sink (tests inspect captured output).
    pub fn output(&self) -> &ConsoleOutput {
        self.serial.writer()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.serial.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [b]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(off, *b) {
            log::debug!("serial: write at offset {off}: {e:?}");
        }
        if offset == IER_OFFSET {
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn output_and_interrupt() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(evt.try_clone().unwrap(), ConsoleOutput::Capture(vec![]));
        s.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        match s.output() {
            ConsoleOutput::Capture(v) => assert_eq!(v, b"ok\n"),
            _ => unreachable!(),
        }
        assert!(evt.read().unwrap() >= 1, "THRE interrupts raised");
        // Bad sizes and offsets are ignored, never a panic.
        s.write(0, &[1, 2]);
        s.write(u64::MAX, &[1]);
        let mut two = [0u8; 2];
        s.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }

    #[test]
    fn input_reaches_the_receive_register() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(evt, ConsoleOutput::Sink);
        assert_eq!(s.enqueue_input(b"hi"), 2);
        let mut b = [0u8];
        s.read(5, &mut b); // LSR
        assert_eq!(b[0] & 1, 1, "data ready");
        s.read(0, &mut b);
        assert_eq!(b[0], b'h');
    }
}
