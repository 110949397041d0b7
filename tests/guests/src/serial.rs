//! Polled 8250 UART output on COM1 (0x3f8): no interrupts, no input.

use crate::arch::{inb, outb};
use core::fmt;

const COM1: u16 = 0x3f8;
/// Line status register; bit 5 = transmit holding register empty.
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;
/// Bounded wait for the transmitter, so a missing UART cannot hang the guest.
const MAX_POLLS: u32 = 100_000;

/// Sets 8N1 and enables the FIFO; harmless on an emulated UART, needed on a real one.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0x07); // FIFO on and cleared
}

fn put_byte(b: u8) {
    let mut polls = 0;
    while inb(LSR) & LSR_THR_EMPTY == 0 && polls < MAX_POLLS {
        polls += 1;
        crate::arch::pause();
    }
    outb(COM1, b);
}

/// Writes raw bytes, translating `\n` to `\r\n`.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            put_byte(b'\r');
        }
        put_byte(b);
    }
}

/// `core::fmt` sink for the serial port.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints one `KILN-TEST <formatted>` line.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, "KILN-TEST {}\n", format_args!($($arg)*));
    }};
}
