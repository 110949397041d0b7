//! Boot-timer port: the guest writes [`BOOT_TIMER_MAGIC`] once to port 0x440 when userspace
//! starts; host-vmm logs the time since the process started. Exact and free of console parsing.

use std::time::{Duration, Instant};

use super::bus::BusDevice;

/// The value the guest writes.
pub const BOOT_TIMER_MAGIC: u8 = 0x7b;

/// The device.
pub struct BootTimer {
    start: Instant,
    fired: Option<Duration>,
}

impl BootTimer {
    /// A timer counting from `start` (the process start).
    pub fn new(start: Instant) -> Self {
        Self { start, fired: None }
    }

    /// Time from start to the guest's write, once it happened.
    pub fn elapsed(&self) -> Option<Duration> {
        self.fired
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            log::debug!("boot-timer: ignored write {data:02x?} at offset {offset}");
            return;
        }
        if self.fired.is_none() {
            let t = self.start.elapsed();
            self.fired = Some(t);
            log::info!(
                "boot-timer: guest userspace started after {}.{:03} ms",
                t.as_micros() / 1000,
                t.as_micros() % 1000
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_on_magic() {
        let mut t = BootTimer::new(Instant::now());
        t.write(0, &[0x12]);
        assert!(t.elapsed().is_none());
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = t.elapsed().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.elapsed(), Some(first));
    }
}
